"""``fsdfm-mlx eval``: generative perplexity and entropy for several step counts, as in the paper."""

from __future__ import annotations

import json
import sys

import typer


def _fail(message: str) -> None:
    """One ``Error: ...`` line on stderr, exit code 1."""
    lines = str(message).strip().splitlines()
    typer.echo(f"Error: {lines[0] if lines else 'evaluation failed'}", err=True)
    raise typer.Exit(1)


def _parse_steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--steps must be comma-separated integers, got {text!r}") from None
    if not steps or any(s <= 0 for s in steps):
        raise ValueError(f"--steps must be positive integers, got {text!r}")
    return steps


def _default_model() -> str:
    import fsdfm_mlx

    find = getattr(fsdfm_mlx, "default_model_path", None)
    if find is None:
        raise ValueError("--model is required (a converted model folder or Hugging Face repo)")
    return str(find())


def eval_command(
    ctx: typer.Context,
    model: str | None = typer.Option(
        None, "--model", help="Converted model folder or HF repo (default: the shipped model)."
    ),
    steps: str = typer.Option("1,2,4,8,16", "--steps", help="Step counts, comma-separated."),
    num_samples: int = typer.Option(64, "--num-samples", help="Passages per step count."),
    batch_size: int = typer.Option(16, "--batch-size", help="Passages generated at once."),
    length: int | None = typer.Option(None, "--length", help="Tokens per passage."),
    solver: str | None = typer.Option(None, "--solver", help="Solver (default: the model's)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    temp: float | None = typer.Option(
        None,
        "--temp",
        help="Temperature on the logits (0 = argmax; default: the model's, 1.0 unless its "
        "config sets default_temp).",
    ),
    top_k: int | None = typer.Option(None, "--top-k", help="Keep the k most likely tokens."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus filter, in (0, 1]."),
    evaluator: str = typer.Option(
        "gpt2-large",
        "--evaluator",
        help="AR evaluator: an mlx-lm model folder or HF repo (default: GPT-2 Large, as the paper).",
    ),
    reference: str | None = typer.Option(
        None, "--reference", help="Held-out text (.npy of token ids or .txt) for a reference row."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON result only."),
    out: str | None = typer.Option(None, "--out", help="Also save the JSON result to FILE."),
    hosts: str | None = typer.Option(
        None, "--hosts", help="Re-run on these hosts through mlx.launch (comma-separated)."
    ),
    hostfile: str | None = typer.Option(
        None, "--hostfile", help="Re-run on the hosts of this mlx.launch host file."
    ),
    launch_args: str | None = typer.Option(
        None, "--launch-args", help='Extra mlx.launch arguments, e.g. "--backend ring -p 40000".'
    ),
) -> None:
    """Generative perplexity (AR evaluator) and token entropy for several step counts."""
    from fsdfm_mlx import distributed

    if hosts or hostfile:
        args = distributed.rebuild_args(ctx, {"hosts", "hostfile", "launch_args"})
        code = distributed.relaunch(args, hosts=hosts, hostfile=hostfile, launch_args=launch_args)
        raise typer.Exit(code)

    group = distributed.init() if distributed.is_launched() else None
    rank = 0 if group is None else group.rank()
    prefix = f"rank {rank}: " if group is not None and group.size() > 1 else ""
    try:
        from fsdfm_mlx.evaluate import evaluate

        step_list = _parse_steps(steps)
        result = evaluate(
            model if model is not None else _default_model(),
            steps=step_list,
            num_samples=num_samples,
            length=length,
            batch_size=batch_size,
            solver=solver,
            seed=seed,
            evaluator=evaluator,
            reference_text=reference,
            temp=temp,
            top_k=top_k,
            top_p=top_p,
            progress=not json_out,
            group=group,
        )
        if rank == 0 and out is not None:
            distributed.atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        _fail(f"{prefix}interrupted")
    except Exception as e:  # one line per rank, never a traceback
        lines = str(e).strip().splitlines()
        _fail(f"{prefix}{lines[0] if lines else type(e).__name__}")
    if rank != 0:
        return
    if json_out:
        typer.echo(json.dumps(result))
        return
    _print_table(result)
    sys.stdout.flush()


def _print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (
        f"{result['model'] or 'model'}: {result['num_samples']} x {result['length']} tokens, "
        f"{result['solver']}, seed {result['seed']}, evaluator {result['evaluator']}"
    )
    knobs = {k: v for k, v in (result.get("sampling") or {}).items() if v not in (None, 1.0)}
    if knobs:
        title += ", " + ", ".join(f"{k} {v}" for k, v in knobs.items())
    t = Table(title=title)
    for name in ("steps", "gen ppl", "entropy (bits)", "tokens/s", "seconds"):
        t.add_column(name, justify="right")
    for r in result["rows"]:
        speed = r["tokens_per_sec"]
        t.add_row(
            str(r["steps"]),
            f"{r['gen_ppl']:.2f}",
            f"{r['entropy_bits']:.3f}",
            "-" if speed is None else f"{speed:.1f}",
            f"{r['seconds']:.2f}",
        )
    ref = result.get("reference")
    if ref is not None:
        t.add_row("reference", f"{ref['gen_ppl']:.2f}", f"{ref['entropy_bits']:.3f}", "", "")
    Console().print(t)


def register(app: typer.Typer) -> None:
    """Add the ``eval`` command to ``app``."""
    app.command("eval")(eval_command)
