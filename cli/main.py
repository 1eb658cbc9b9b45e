"""`fsdfm-mlx`: convert official FS-DFM checkpoints, generate text, inspect and profile models.

Each command is a thin wrapper: it calls a library function with the same keyword arguments and only
prints. Bad input ends with one ``Error: ...`` line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import importlib
import json
import sys
from contextlib import contextmanager

import typer

app = typer.Typer(
    name="fsdfm-mlx",
    help="FS-DFM few-step discrete flow-matching language models on MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str) -> None:
    """Print one error line and exit 1."""
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(1)


@contextmanager
def user_errors():
    """Turn the library's input errors into one line and exit code 1."""
    try:
        yield
    except typer.Exit:
        raise
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, RuntimeError) as e:
        fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    except OSError as e:
        fail(f"{e.strerror or e}: {e.filename}" if getattr(e, "filename", None) else str(e))
    except KeyboardInterrupt:
        fail("interrupted")


@app.command()
def convert(
    model: str = typer.Option(
        ...,
        "--model",
        help="Official .pth checkpoint, or a Hugging Face repo id (with --filename).",
    ),
    mlx_path: str = typer.Option("mlx_model", "--mlx-path", help="Output folder."),
    filename: str | None = typer.Option(
        None, "--filename", help="Checkpoint file inside the Hugging Face repo."
    ),
    config: str | None = typer.Option(
        None,
        "--config",
        help="Training run's YAML config (model.n_heads, flow.source_distribution).",
    ),
    preset: str | None = typer.Option(
        None, "--preset", help="170m | 1.3b | 1.7b (gives the head count)."
    ),
    n_heads: int | None = typer.Option(
        None, "--n-heads", help="Attention heads (default: head_dim 64)."
    ),
    source: str | None = typer.Option(
        None, "--source", help="uniform | mask, when neither config nor shapes tell."
    ),
    weights: str | None = typer.Option(
        None,
        "--weights",
        help="student | student_ema | teacher (default: student_model, else model, else teacher).",
    ),
    dtype: str = typer.Option("bfloat16", "--dtype", help="float32 | float16 | bfloat16."),
    quantize: bool = typer.Option(
        False, "-q", "--quantize", help="MLX affine quantization of linear/embedding weights."
    ),
    q_bits: int = typer.Option(4, "--q-bits", help="4 | 8."),
    q_group_size: int = typer.Option(64, "--q-group-size", help="32 | 64 | 128."),
    tokenizer: str | None = typer.Option(
        None, "--tokenizer", help="Tokenizer folder or repo (default: the shipped GPT-2)."
    ),
    upload_repo: str | None = typer.Option(
        None, "--upload-repo", help="Upload the result to this Hugging Face repo."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing --mlx-path."),
    default_temp: float | None = typer.Option(
        None,
        "--default-temp",
        help="Sampling temperature stored in the config: generate/eval use it when no --temp "
        "is given (default 1.0).",
    ),
    verbose: bool = typer.Option(True, "--verbose/--quiet", help="Progress bar and summary."),
):
    """Convert an official FS-DFM / DFM PyTorch checkpoint to an MLX model folder."""
    with user_errors():
        try:
            to_mlx = importlib.import_module("fsdfm_mlx.convert.to_mlx")
        except ImportError as e:
            fail(f"conversion needs torch: pip install 'fsdfm-mlx[convert]' ({e})")
        result = to_mlx.convert(
            model,
            mlx_path,
            filename=filename,
            config=config,
            preset=preset,
            n_heads=n_heads,
            source=source,
            weights=weights,
            dtype=dtype,
            quantize=quantize,
            q_bits=q_bits,
            q_group_size=q_group_size,
            tokenizer=tokenizer,
            upload_repo=upload_repo,
            force=force,
            progress=verbose,
            default_temp=default_temp,
        )
    for note in result.notes:
        typer.secho(f"Note: {note}", fg="yellow", err=True)
    if verbose:
        a = result.args
        q = (
            f", {result.quantization['bits']}-bit q{result.quantization['group_size']}"
            if result.quantization
            else ""
        )
        kind = "student" if a["dt_conditioned"] else "teacher"
        typer.echo(
            f"Wrote {result.mlx_path}: {result.selection} ({kind}, {a['source_distribution']} source, "
            f"{a['n_blocks']} blocks, D={a['hidden_size']}, {a['n_heads']} heads), "
            f"{result.parameters / 1e6:.2f}M params, {result.dtype}{q}, "
            f"{result.bytes_written / 1e6:.1f} MB in {result.seconds:.1f} s"
        )


@app.command()
def info(
    model: str = typer.Argument(..., help="A converted model folder or Hugging Face repo."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Show a converted model's config, parameter count, size on disk and quantization."""
    from fsdfm_mlx.load import model_info

    with user_errors():
        res = model_info(model)
    if json_out:
        typer.echo(json.dumps(res, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    c = res["config"]
    t = Table(title=res["path"], show_header=False)
    kind = "FS-DFM student (dt-conditioned)" if c.get("dt_conditioned") else "DFM teacher"
    rows = [
        ("kind", kind),
        ("source distribution", c.get("source_distribution")),
        ("mask token id", c.get("mask_token_id")),
        ("blocks / hidden / cond", f"{c['n_blocks']} / {c['hidden_size']} / {c['cond_dim']}"),
        ("heads x head_dim", f"{c['n_heads']} x {c['hidden_size'] // c['n_heads']}"),
        ("vocab (+mask)", c.get("num_tokens", c.get("vocab_size"))),
        ("training length", c.get("length")),
        (
            "default solver / steps / temp",
            f"{c.get('default_solver')} / {c.get('default_steps')} / {c.get('default_temp', 1.0):g}",
        ),
        ("parameters", f"{res['parameters']:,} ({res['parameters'] / 1e6:.2f}M)"),
        ("dtype", res["dtype"]),
        (
            "quantization",
            "none"
            if not res["quantization"]
            else f"{res['quantization']['bits']}-bit, group {res['quantization']['group_size']}",
        ),
        (
            "weights on disk",
            f"{res['weights_bytes'] / 1e6:.2f} MB ({res['bits_per_parameter']:.2f} bits/param)",
        ),
        ("folder size", f"{res['size_on_disk_bytes'] / 1e6:.2f} MB"),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    Console().print(t)


def _register_optional() -> None:
    """Commands that live in their own modules (generate, export-coreml, profile, eval)."""
    for mod in ("generate", "export_coreml", "profile", "evaluate"):
        try:
            m = importlib.import_module(f"fsdfm_mlx.cli.{mod}")
        except ModuleNotFoundError as e:
            if e.name == f"fsdfm_mlx.cli.{mod}":
                continue
            raise
        m.register(app)


_register_optional()


def main() -> None:
    """Console-script entry point."""
    app(prog_name="fsdfm-mlx")


if __name__ == "__main__":
    sys.exit(main())
