"""The `fsdfm-mlx` command line (Typer)."""
