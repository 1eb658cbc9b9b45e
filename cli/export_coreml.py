"""``fsdfm-mlx export-coreml``: export a model to a Core ML package for iOS / macOS apps."""

from __future__ import annotations

import typer


def _parse_lengths(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--lengths must be comma-separated integers, got {value!r}") from None


def _fail(message: str) -> None:
    """One ``Error: ...`` line on stderr, exit code 1."""
    lines = message.strip().splitlines()
    typer.echo(f"Error: {lines[0] if lines else 'export failed'}", err=True)
    raise typer.Exit(1)


def export_coreml_command(
    model: str = typer.Option(
        ..., "--model", help="Converted MLX folder or official .pth checkpoint."
    ),
    output: str = typer.Option(..., "--output", help="Package to write, NAME.mlpackage."),
    length: int | None = typer.Option(None, "--length", help="(Default) sequence length."),
    lengths: str | None = typer.Option(
        None, "--lengths", help="Enumerated lengths the package accepts, e.g. 128,256,512,1024."
    ),
    batch_size: int = typer.Option(1, "--batch-size", help="Fixed batch size."),
    precision: str = typer.Option("float16", "--precision", help="float16 or float32."),
    compute_units: str = typer.Option(
        "all", "--compute-units", help="all, cpu_only, cpu_and_gpu or cpu_and_ne."
    ),
    min_deployment_target: str = typer.Option(
        "iOS17", "--min-deployment-target", help="iOS17, iOS18, macOS14 or macOS15."
    ),
    quantize: str = typer.Option(
        "none", "--quantize", help="none, int8, int4 (iOS18/macOS15), palettize4 or palettize6."
    ),
    attention: str = typer.Option(
        "split_einsum", "--attention", help="split_einsum (Neural Engine layout) or original."
    ),
    allow_longer: bool = typer.Option(
        False, "--allow-longer", help="Allow lengths above the training length."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    weights: str | None = typer.Option(
        None, "--weights", help=".pth only: student, student_ema or teacher."
    ),
    config: str | None = typer.Option(None, "--config", help=".pth only: training config yaml."),
    n_heads: int | None = typer.Option(None, "--n-heads", help=".pth only: attention heads."),
    preset: str | None = typer.Option(None, "--preset", help=".pth only: size preset."),
    source: str | None = typer.Option(None, "--source", help=".pth only: uniform or mask."),
) -> None:
    """Export a model to a Core ML .mlpackage (tokenizer written next to it)."""
    from rich.console import Console
    from rich.table import Table

    try:
        from fsdfm_mlx.convert.checkpoint import CheckpointError
    except ImportError:  # the lead's checkpoint reader is not there yet
        CheckpointError = ValueError  # noqa: N806
    try:
        from fsdfm_mlx.convert.to_coreml import export_coreml

        summary = export_coreml(
            model,
            output,
            length=length,
            lengths=_parse_lengths(lengths),
            batch_size=batch_size,
            precision=precision,
            compute_units=compute_units,
            min_deployment_target=min_deployment_target,
            quantize=quantize,
            attention=attention,
            allow_longer=allow_longer,
            force=force,
            weights=weights,
            config=config,
            n_heads=n_heads,
            preset=preset,
            source=source,
        )
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        _fail(str(e))
    except ImportError as e:
        _fail(f"{e} (install the coreml extra: pip install 'fsdfm-mlx[coreml]')")

    table = Table(title="Core ML export", show_header=False)
    rows = [
        ("package", summary["path"]),
        ("tokenizer", summary["tokenizer"]),
        ("size", f"{summary['size_bytes'] / 2**20:.1f} MiB"),
        ("parameters", f"{summary['params']:,}"),
        ("bytes / parameter", f"{summary['bytes_per_param']:.3f}"),
        ("lengths", ",".join(str(n) for n in summary["lengths"])),
        ("batch size", str(summary["batch_size"])),
        ("precision / quantize", f"{summary['precision']} / {summary['quantize']}"),
        ("attention", summary["attention"]),
        ("ops (non-const / total)", f"{summary['ops_non_const']} / {summary['ops_total']}"),
        ("time", f"{summary['seconds']:.1f} s"),
        ("peak RSS", f"{summary['peak_rss_bytes'] / 2**30:.2f} GiB"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add the ``export-coreml`` command to ``app``."""
    app.command("export-coreml")(export_coreml_command)
