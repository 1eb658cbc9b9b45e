"""The `fsdfm-mlx` command line (Typer)."""


def blocks_per_eval_option():
    """The ``--blocks-per-eval`` option shared by ``generate`` and ``profile``."""
    import typer

    return typer.Option(
        None,
        "--blocks-per-eval",
        help="Queue the blocks N at a time, two groups in flight (less GPU memory); "
        "0 = whole forwards; default on a GPU: 1 quantized, 2 dense; 0 on CPU.",
    )
