"""``fsdfm-mlx generate``: write passages with a converted FS-DFM model and show how they refine."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import typer
from fsdfm_mlx.cli import blocks_per_eval_option

_FROZEN_STYLE = "bold underline"
_UNCHANGED_STYLE = "grey50"


def _fail(message: str) -> None:
    """One ``Error: ...`` line on stderr, exit code 1."""
    lines = str(message).strip().splitlines()
    typer.echo(f"Error: {lines[0] if lines else 'generation failed'}", err=True)
    raise typer.Exit(1)


def _step_style(step: int, steps: int) -> str:
    """Colour of a token that last changed at ``step`` (1..steps): blue (early) to red (late)."""
    f = 0.0 if steps <= 1 else (step - 1) / (steps - 1)
    early, late = (80, 140, 255), (255, 70, 50)
    r, g, b = (round(a + (c - a) * f) for a, c in zip(early, late, strict=True))
    return f"rgb({r},{g},{b})"


class _Pieces:
    """Per-token text for the visual view (cached per id)."""

    def __init__(self, tokenizer, mask_id):
        from fsdfm_mlx.generate import MASK_PLACEHOLDER

        self.tokenizer, self.mask_id, self.cache = tokenizer, mask_id, {}
        self.placeholder = MASK_PLACEHOLDER

    def __call__(self, tok: int) -> str:
        if tok == self.mask_id:
            return self.placeholder
        if tok not in self.cache:
            self.cache[tok] = self.tokenizer.decode([tok])
        return self.cache[tok]


def _render(response, pieces: _Pieces):
    """A rich renderable of every passage, each token coloured by the step it last changed."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.text import Text

    tokens = np.array(response.tokens)
    last = np.array(response.last_changed)
    editable = np.array(response.editable)
    panels = []
    for b in range(tokens.shape[0]):
        text = Text()
        for tok, step, ed in zip(
            tokens[b].tolist(), last[b].tolist(), editable[b].tolist(), strict=True
        ):
            if not ed:
                style = _FROZEN_STYLE
            elif step == 0:
                style = _UNCHANGED_STYLE
            else:
                style = _step_style(step, response.steps)
            text.append(pieces(tok), style=style)
        title = f"sample {b}" if tokens.shape[0] > 1 else None
        panels.append(Panel(text, title=title, subtitle=f"step {response.step}/{response.steps}"))
    legend = Text("last changed at step: ")
    for s in range(1, response.steps + 1):
        legend.append(f"{s} ", style=_step_style(s, response.steps))
    legend.append(" unchanged", style=_UNCHANGED_STYLE)
    legend.append("  frozen", style=_FROZEN_STYLE)
    return Group(*panels, legend)


def generate_command(
    ctx: typer.Context,
    model: str | None = typer.Option(None, "--model", help="Converted model folder or HF repo."),
    prompt: str | None = typer.Option(None, "--prompt", help="Text frozen at the start."),
    suffix: str | None = typer.Option(None, "--suffix", help="Text frozen at the end (infill)."),
    steps: int | None = typer.Option(None, "--steps", help="Solver steps (default: the model's)."),
    length: int | None = typer.Option(None, "--length", help="Tokens per passage."),
    batch_size: int = typer.Option(1, "--batch-size", help="Passages written in parallel."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed (default: fresh)."),
    solver: str | None = typer.Option(
        None,
        "--solver",
        help="mixture_euler_with_cumulative_scalar | mixture_euler | dfm_euler "
        "(default: the model's).",
    ),
    temp: float | None = typer.Option(
        None,
        "--temp",
        help="Temperature on the logits (0 = argmax; default: the model's, 1.0 unless its "
        "config sets default_temp).",
    ),
    top_k: int | None = typer.Option(None, "--top-k", help="Keep the k most likely tokens."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus filter, in (0, 1]."),
    blocks_per_eval: int | None = blocks_per_eval_option(),
    visual: bool = typer.Option(False, "--visual", help="Show the passage refining, live."),
    html: str | None = typer.Option(None, "--html", help="Save the coloured view as HTML."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON result only."),
    tokens_out: str | None = typer.Option(
        None, "--tokens-out", help="Save the [B, L] int32 token ids to FILE.npy."
    ),
    verbose: bool = typer.Option(False, "--verbose", help="Per-step lines on stderr."),
    coreml: str | None = typer.Option(
        None, "--coreml", help="Run a Core ML package (macOS only) with the same sampler."
    ),
    check: bool = typer.Option(
        False, "--check", help="With --coreml: compare its logits with --model's MLX logits first."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite --tokens-out / --html files."),
    num_samples: int | None = typer.Option(
        None,
        "--num-samples",
        help="Passages in all, written --batch-size at a time (default: --batch-size). Under "
        "mlx.launch the batches are shared among the ranks; the result does not depend on how many.",
    ),
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
    """Generate passages with an FS-DFM model (few parallel refinement steps)."""
    if hosts or hostfile:
        from fsdfm_mlx.distributed import rebuild_args, relaunch

        args = rebuild_args(ctx, {"hosts", "hostfile", "launch_args"})
        raise typer.Exit(relaunch(args, hosts=hosts, hostfile=hostfile, launch_args=launch_args))
    try:
        params = dict(locals())
        for name in ("ctx", "hosts", "hostfile", "launch_args"):
            params.pop(name)
        _generate(**params)
    except typer.Exit:
        raise
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, RuntimeError) as e:
        _fail(str(e) or type(e).__name__)
    except OSError as e:
        _fail(f"{e.strerror or e}: {e.filename}" if getattr(e, "filename", None) else str(e))
    except KeyboardInterrupt:
        _fail("interrupted")


def _generate(
    model,
    prompt,
    suffix,
    steps,
    length,
    batch_size,
    seed,
    solver,
    temp,
    top_k,
    top_p,
    visual,
    html,
    json_out,
    tokens_out,
    verbose,
    coreml,
    force,
    num_samples=None,
    check=False,
    blocks_per_eval=None,
) -> None:
    from fsdfm_mlx.generate import format_summary, save_tokens, stream_generate, summary

    if check and coreml is None:
        raise ValueError("--check compares a Core ML package with --model: pass --coreml too")
    if model is None:
        import fsdfm_mlx

        model = str(fsdfm_mlx.default_model_path())  # the shipped demo model: no download
    if num_samples is not None and (isinstance(num_samples, bool) or num_samples <= 0):
        raise ValueError(f"--num-samples must be a positive integer, got {num_samples}")
    from fsdfm_mlx import distributed

    group = distributed.init() if distributed.is_launched() else None
    if (group is not None and group.size() > 1) or (num_samples or batch_size) > batch_size:
        if coreml is not None:  # the chunked/distributed path drives MLX models only
            raise ValueError("--coreml runs one batch: drop --num-samples and mlx.launch")
        return _generate_chunked(**locals())
    for path in (tokens_out, html):
        if path is not None and Path(path).exists() and not force:
            raise FileExistsError(f"{path} exists; pass --force to overwrite")

    import fsdfm_mlx

    if coreml is not None:
        # macOS only: the package computes the logits, our sampler does the rest
        from fsdfm_mlx.coreml_runner import CoreMLModel, ParityError, check_parity
        from fsdfm_mlx.load import load_tokenizer

        mlx_model = CoreMLModel(coreml)  # raises a one-line RuntimeError off macOS
        if check:
            try:
                res = check_parity(coreml, model)
            except ParityError as e:
                raise ValueError(str(e)) from None
            print(f"Core ML parity: max abs logit diff {res['max_abs_diff']:.3g}", file=sys.stderr)
        tok_dir = Path(coreml).with_suffix(".tokenizer")
        tokenizer = load_tokenizer(tok_dir if tok_dir.is_dir() else fsdfm_mlx.default_model_path())
    else:
        mlx_model, tokenizer = fsdfm_mlx.load(model)
    stream = stream_generate(
        mlx_model,
        tokenizer,
        prompt,
        suffix,
        batch_size=batch_size,
        length=length,
        steps=steps,
        solver=solver,
        seed=seed,
        temp=temp,
        top_k=top_k,
        top_p=top_p,
        blocks_per_eval=blocks_per_eval,
        profile=True,
    )
    pieces = _Pieces(tokenizer, mlx_model.args.mask_token_id)
    per_step, response = [], None

    live = None
    if visual and not json_out:
        from rich.console import Console
        from rich.live import Live

        live = Live(console=Console(), auto_refresh=False, transient=False)
        live.start()
    try:
        for response in stream:
            per_step.append((response.model_ms, response.sampler_ms, response.step_ms))
            if verbose:
                n_changed = int(np.array(response.changed).sum())
                typer.echo(
                    f"step {response.step}/{response.steps} t={response.t:.4f} h={response.h:.4f} "
                    f"changed={n_changed} model={response.model_ms:.2f}ms "
                    f"sampler={response.sampler_ms:.2f}ms",
                    err=True,
                )
            if live is not None:
                live.update(_render(response, pieces), refresh=True)
    finally:
        if live is not None:
            live.stop()

    if tokens_out is not None:
        save_tokens(tokens_out, response.tokens, force=force)
    if html is not None:
        from rich.console import Console

        console = Console(record=True, file=io.StringIO(), width=100)
        console.print(_render(response, pieces))
        console.save_html(html)

    if json_out:
        out = summary(response, per_step)
        out["texts"] = response.text
        out["tokens"] = np.array(response.tokens).tolist()
        out["per_step"] = [
            {"step": i + 1, "model_ms": m, "sampler_ms": s, "step_ms": w}
            for i, (m, s, w) in enumerate(per_step)
        ]
        typer.echo(json.dumps(out))
        return
    if live is None:
        texts = response.text
        for i, text in enumerate(texts):
            if len(texts) > 1:
                typer.echo(f"=== sample {i} ===")
            typer.echo(text)
    typer.echo(format_summary(response, per_step), err=False)
    sys.stdout.flush()


def _generate_chunked(
    *,
    model,
    prompt,
    suffix,
    steps,
    length,
    batch_size,
    seed,
    solver,
    temp,
    top_k,
    top_p,
    visual,
    html,
    json_out,
    tokens_out,
    verbose,
    force,
    num_samples,
    group,
    blocks_per_eval=None,
    **_,
) -> None:
    """--num-samples in chunks of --batch-size, shared among the ranks when run by mlx.launch."""
    import time

    import fsdfm_mlx
    from fsdfm_mlx import distributed
    from fsdfm_mlx.generate import decode, resolve_seed, save_tokens, temperature_note

    group = distributed.init() if group is None else group
    rank, size = group.rank(), group.size()
    prefix = f"rank {rank}: " if size > 1 else ""
    try:
        if visual or html:
            raise ValueError(
                "--visual/--html show a single batch: not available with --num-samples above "
                "--batch-size or on several ranks"
            )
        num_samples = num_samples or batch_size
        seed = distributed.broadcast_seed(resolve_seed(seed), group)
        sizes = distributed.chunk_sizes(num_samples, batch_size)
        if size > 1 and len(sizes) < size and rank == 0:
            typer.echo(
                f"Note: {len(sizes)} batch(es) of {batch_size} for {size} ranks; some ranks idle "
                "(raise --num-samples or lower --batch-size)",
                err=True,
            )

        def work():
            if rank == 0 and tokens_out is not None and Path(tokens_out).exists() and not force:
                raise FileExistsError(f"{tokens_out} exists; pass --force to overwrite")
            mlx_model, tokenizer = fsdfm_mlx.load(model)
            local, per_step, r, tic = {}, [], None, time.perf_counter()
            for c, r in distributed.iter_chunks(
                mlx_model,
                tokenizer,
                chunks=distributed.my_chunks(len(sizes), group),
                num_samples=num_samples,
                batch_size=batch_size,
                prompt=prompt,
                suffix=suffix,
                seed=seed,
                steps=steps,
                length=length,
                solver=solver,
                temp=temp,
                top_k=top_k,
                top_p=top_p,
                blocks_per_eval=blocks_per_eval,
                profile=True,
            ):
                per_step.append((r.model_ms, r.sampler_ms, r.step_ms))
                if r.finished:
                    local[c] = np.array(r.tokens, dtype=np.int32)
                    if verbose:
                        typer.echo(
                            f"{prefix}batch {c + 1}/{len(sizes)}: {r.tokens.shape[0]} x "
                            f"{r.tokens.shape[1]} tokens, {r.steps} steps, {r.elapsed_s:.2f} s",
                            err=True,
                        )
            return mlx_model, tokenizer, local, per_step, time.perf_counter() - tic, r

        mlx_model, tokenizer, local, per_step, seconds, last = distributed.all_or_nothing(
            work, group
        )
        L = last.tokens.shape[1] if local else int(length or mlx_model.args.length)
        parts = distributed.gather_chunks(
            local, len(sizes), group, chunk_size=batch_size, tail=(L,)
        )
        seconds = distributed.gather_max(seconds, group)
    except typer.Exit:
        raise
    except Exception as e:  # one line per rank, never a traceback
        lines = str(e).strip().splitlines()
        _fail(f"{prefix}{lines[0] if lines else type(e).__name__}")
    if rank != 0:
        return

    tokens = np.concatenate(parts, axis=0)
    n_gen = int(np.array(last.editable)[0].sum()) * num_samples
    arr = np.array(per_step, dtype=float)
    out = {
        "batch_size": batch_size,
        "num_samples": num_samples,
        "ranks": size,
        "length": int(tokens.shape[1]),
        "steps": last.steps,
        "solver": last.solver,
        "temp": last.temp,
        "seed": seed,
        "elapsed_s": seconds,
        "tokens_per_sec": n_gen / seconds if seconds > 0 else float("inf"),
        "peak_memory_gb": last.peak_memory,
        "model_ms_per_step": float(arr[:, 0].mean()),
        "sampler_ms_per_step": float(arr[:, 1].mean()),
        "step_ms": float(arr[:, 2].mean()),
    }
    if tokens_out is not None:
        save_tokens(tokens_out, tokens, force=force)
    texts = decode(tokenizer, tokens, mlx_model.args.mask_token_id)
    if json_out:
        typer.echo(json.dumps({**out, "texts": texts, "tokens": tokens.tolist()}))
        return
    for i, text in enumerate(texts):
        typer.echo(f"=== sample {i} ===")
        typer.echo(text)
    typer.echo(
        f"{num_samples} x {out['length']} tokens ({len(sizes)} batches of {batch_size} on {size} "
        f"rank(s)), {out['steps']} steps{temperature_note(out['temp'])} ({out['solver']}), "
        f"{out['tokens_per_sec']:.1f} tokens/s, "
        f"{seconds:.2f} s"
    )
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    """Add the ``generate`` command to ``app``."""
    app.command("generate")(generate_command)
