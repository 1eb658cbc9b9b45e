"""``fsdfm-mlx profile``: FS-DFM sampling speed against the DFM-1024 and autoregressive baselines."""

from __future__ import annotations

import json

import typer
from fsdfm_mlx.cli import blocks_per_eval_option

DTYPE_CHOICES = ("float32", "float16", "bfloat16")


def _fail(message: str) -> None:
    """One ``Error: ...`` line on stderr, exit code 1."""
    lines = str(message).strip().splitlines()
    typer.echo(f"Error: {lines[0] if lines else 'profile failed'}", err=True)
    raise typer.Exit(1)


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _fmt_x(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}x"


def _fmt_s(s: float) -> str:
    return f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.1f} ms"


def results_table(res: dict):
    """A rich table of a :func:`fsdfm_mlx.profile.profile` result."""
    from rich.table import Table

    cfg = res["config"]
    q = cfg["quantization"]
    qtext = f", {q['bits']}-bit" if q else ""
    title = (
        f"{cfg['model']}: {cfg['parameters'] / 1e6:.0f}M params, {cfg['dtype']}{qtext}, "
        f"B={cfg['batch_size']}, L={cfg['length']}, "
        f"{cfg['solver']} on {res['machine']['device']}"
    )
    t = Table(title=title)
    for col in (
        "steps",
        "latency",
        "tokens/s",
        "model ms/step",
        "sampler ms/step",
        "TFLOP/s",
        "peak mem",
        "warm-up",
    ):
        t.add_column(col, justify="right")
    base = res.get("baselines")
    if base:
        t.add_column("x AR", justify="right")
        t.add_column(f"x DFM-{base['dfm'].get('steps', '')}", justify="right")
    for r in res["results"]:
        row = [
            str(r["steps"]),
            _fmt_s(r["latency_s"]),
            f"{r['tokens_per_s']:,.0f}",
            f"{r['model_ms_per_step']:.2f}",
            f"{r['sampler_ms_per_step']:.2f}",
            f"{r['model_tflops']:.2f}",
            _fmt_bytes(r["peak_memory_bytes"]),
            _fmt_s(r["warmup_s"]),
        ]
        if base:
            row += [_fmt_x(r.get("speedup_vs_ar")), _fmt_x(r.get("speedup_vs_dfm"))]
        t.add_row(*row)
    return t


def baselines_table(res: dict):
    from rich.table import Table

    t = Table(title="baselines (same process, same device)")
    for col in ("baseline", "latency", "tokens/s", "peak mem", "note"):
        t.add_column(col, justify="left" if col in ("baseline", "note") else "right")
    d, a = res["baselines"]["dfm"], res["baselines"]["ar"]
    if "error" in d:
        t.add_row("DFM teacher", "-", "-", "-", d["error"])
    else:
        t.add_row(
            f"DFM teacher, {d['steps']} steps dfm_euler",
            _fmt_s(d["latency_s"]),
            f"{d['tokens_per_s']:,.1f}",
            _fmt_bytes(d["peak_memory_bytes"]),
            d.get("note", ""),
        )
    if "error" in a:
        t.add_row("autoregressive (mlx-lm)", "-", "-", "-", a["error"])
    else:
        t.add_row(
            f"AR llama {a['params'] / 1e6:.0f}M, KV cache, {a['new_tokens_per_sequence']} tokens",
            _fmt_s(a["latency_s"]),
            f"{a['tokens_per_s']:,.1f}",
            _fmt_bytes(a["peak_memory_bytes"]),
            a.get("note", ""),
        )
    return t


def estimate_table(ests: list[dict]):
    """One table of Apple-silicon ESTIMATES: a row per chip, a column per step count."""
    from rich.table import Table

    e0 = ests[0]
    t = Table(title=f"{e0['label']}\n{e0['preset']}, L={e0['length']}, B={e0['batch']}")
    t.add_column("chip")
    t.add_column("bf16 TFLOP/s*", justify="right")
    t.add_column("GB/s*", justify="right")
    for e in ests:
        t.add_column(f"{e['steps']} steps tok/s", justify="right")
    t.add_column("AR tok/s", justify="right")
    for i, r in enumerate(e0["chips"]):
        cells = [r["chip"], f"{r['bf16_tflops']:.1f}", f"{r['bandwidth_gb_s']:.0f}"]
        for e in ests:
            c = e["chips"][i]
            cells.append(
                f"{c['estimate']['tokens_per_s']:,.0f} "
                f"(<= {c['upper_bound']['tokens_per_s']:,.0f}, {c['estimate']['bound'][:3]})"
            )
        cells.append(f"{r['estimate']['ar_tokens_per_s']:,.0f}")
        t.add_row(*cells)
    a = e0["assumptions"]
    t.caption = (
        f"* assumed: {a['chips']}. Cells: estimate at {a['compute_efficiency']:.0%} of peak "
        f"FLOP/s and {a['bandwidth_efficiency']:.0%} of bandwidth (<= roofline upper bound; "
        "com = compute-bound, mem = memory-bound)"
    )
    return t


def plot(res: dict, path: str) -> None:
    """Latency and tokens/s against steps (log-log), with the baselines as horizontal lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    steps = [r["steps"] for r in res["results"]]
    lat = [r["latency_s"] for r in res["results"]]
    tps = [r["tokens_per_s"] for r in res["results"]]
    base = res.get("baselines") or {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, ys, key, label in (
        (axes[0], lat, "latency_s", "latency (s)"),
        (axes[1], tps, "tokens_per_s", "tokens/s"),
    ):
        ax.loglog(steps, ys, "o-", label="FS-DFM")
        if "latency_s" in base.get("ar", {}):
            ax.axhline(base["ar"][key], color="C3", ls="--", label="AR (KV cache)")
        if "latency_s" in base.get("dfm", {}):
            ax.axhline(
                base["dfm"][key], color="C2", ls=":", label=f"DFM {base['dfm']['steps']} steps"
            )
        ax.set_xlabel("steps")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    cfg = res["config"]
    fig.suptitle(
        f"{cfg['model']}, {cfg['dtype']}, B={cfg['batch_size']}, L={cfg['length']} "
        f"({res['machine']['device']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def register(app: typer.Typer) -> None:
    """Add the ``profile`` command to the ``fsdfm-mlx`` app."""

    @app.command("profile")
    def profile_cmd(
        model: str | None = typer.Option(
            None, "--model", help="Converted model folder or Hugging Face repo."
        ),
        preset: str | None = typer.Option(
            None, "--preset", help="170m | 1.3b | 1.7b with random weights (instead of --model)."
        ),
        steps: str = typer.Option(
            "1,2,4,8,16,32,64,128,256,512,1024", "--steps", help="Comma-separated step counts."
        ),
        length: int = typer.Option(1024, "--length", help="Tokens per passage."),
        batch_size: int = typer.Option(1, "--batch-size", help="Passages per run."),
        dtype: str | None = typer.Option(
            None,
            "--dtype",
            help="float32 | float16 | bfloat16 (default: float32 on CPU, else bfloat16).",
        ),
        quantize: bool = typer.Option(False, "-q", "--quantize", help="Quantize the weights."),
        q_bits: int = typer.Option(4, "--q-bits", help="Bits for --quantize."),
        q_group_size: int = typer.Option(64, "--q-group-size", help="Group size for --quantize."),
        solver: str | None = typer.Option(None, "--solver", help="Solver (default: the model's)."),
        repeats: int = typer.Option(3, "--repeats", help="Timed runs per step count."),
        warmup: int = typer.Option(1, "--warmup", help="Untimed runs per step count."),
        no_baselines: bool = typer.Option(
            False, "--no-baselines", help="Skip the DFM-1024 and autoregressive baselines."
        ),
        baseline_steps: int = typer.Option(
            1024, "--baseline-steps", help="Steps of the DFM teacher baseline."
        ),
        baseline_budget: float = typer.Option(
            120.0,
            "--baseline-budget",
            help="Seconds per baseline; beyond it a prefix is timed and extrapolated.",
        ),
        lookahead: bool = typer.Option(
            True,
            "--lookahead/--no-lookahead",
            help="Queue each step before waiting for the previous one (faster; more memory).",
        ),
        blocks_per_eval: int | None = blocks_per_eval_option(),
        json_out: bool = typer.Option(False, "--json", help="Print JSON only."),
        plot_file: str | None = typer.Option(
            None, "--plot", help="Write latency and tokens/s against steps to this PNG."
        ),
        estimate: bool = typer.Option(
            False, "--estimate", help="Also print the Apple-silicon roofline ESTIMATE."
        ),
    ):
        """Time few-step sampling against the DFM-1024 and autoregressive baselines."""
        from fsdfm_mlx.profile import apple_silicon_estimate
        from fsdfm_mlx.profile import profile as run_profile

        if dtype is not None and dtype not in DTYPE_CHOICES:
            _fail(f"unknown --dtype {dtype!r}: choose from {', '.join(DTYPE_CHOICES)}")
        if baseline_budget <= 0:
            _fail("--baseline-budget must be positive")
        if plot_file is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                _fail("--plot needs matplotlib: pip install matplotlib")
        try:
            step_list = [int(s) for s in steps.split(",") if s.strip()]
        except ValueError:
            _fail(f"--steps must be comma-separated positive integers, got {steps!r}")

        from rich.console import Console

        err = Console(stderr=True)
        try:
            with err.status("profiling", spinner="dots") as status:

                def progress(msg: str) -> None:
                    status.update(msg)
                    if not json_out:
                        err.log(msg)

                res = run_profile(
                    model,
                    preset=preset,
                    steps=step_list,
                    length=length,
                    batch_size=batch_size,
                    dtype=dtype,
                    quantize=q_bits if quantize else None,
                    lookahead=lookahead,
                    blocks_per_eval=blocks_per_eval,
                    q_group_size=q_group_size,
                    solver=solver,
                    warmup=warmup,
                    repeats=repeats,
                    baselines=not no_baselines,
                    baseline_steps=baseline_steps,
                    baseline_budget_s=baseline_budget,
                    progress=progress,
                )
                est = None
                if estimate:
                    shape = (
                        preset
                        if preset is not None
                        else {
                            k: res["config"][k]
                            for k in (
                                "hidden_size",
                                "cond_dim",
                                "n_blocks",
                                "n_heads",
                                "vocab_size",
                            )
                        }
                    )
                    est = [
                        apple_silicon_estimate(
                            shape, n, length, batch_size, bits=q_bits if quantize else None
                        )
                        for n in step_list
                    ]
            if plot_file is not None:
                plot(res, plot_file)
        except typer.Exit:
            raise
        except (ValueError, FileNotFoundError, NotADirectoryError, RuntimeError, OSError) as e:
            _fail(str(e) or type(e).__name__)
        except KeyboardInterrupt:
            _fail("interrupted")

        if est is not None:
            res["apple_silicon_estimate"] = est
        if json_out:
            typer.echo(json.dumps(res, indent=2))
            return
        out = Console()
        out.print(results_table(res))
        if res.get("baselines"):
            out.print(baselines_table(res))
        if est:
            out.print(estimate_table(est))
        if plot_file is not None:
            out.print(f"wrote {plot_file}")
