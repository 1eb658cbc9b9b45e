"""Measure FS-DFM sampling speed against its two baselines, and estimate it for Apple silicon.

:func:`profile` times the whole few-step sampler (``generate_step``) at several step counts and, in
the same process, the two things FS-DFM is meant to beat: the 1,024-step ``dfm_euler`` sampler on a
same-size DFM teacher, and an autoregressive (AR) model of about the same size writing the same
number of tokens with a KV cache through mlx-lm. Models built from a preset have random weights:
latency does not depend on weight values.

:func:`apple_silicon_estimate` is a roofline ESTIMATE from FLOPs and bytes, not a measurement.
"""

from __future__ import annotations

import math
import platform
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import _cpu_blas
from .generate import (
    check_blocks_per_eval,
    check_solver,
    default_blocks_per_eval,
    generate_step,
)
from .load import CUDA_DENSE_MAX_IN, cuda_backend
from .model import Model, ModelArgs
from .solvers import DFM_EULER, uniform_time_grid

DEFAULT_STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
GPT2_VOCAB = 50257
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

# Apple-silicon figures used by apple_silicon_estimate. ASSUMPTIONS: memory bandwidth is Apple's
# published figure for that chip configuration; the GPU FLOP/s are the commonly quoted fp32 peaks
# (GPU cores x 128 ALUs x 2 FLOP x clock; Apple does not publish all of them), and M-series GPUs run
# bf16/fp16 matmuls at about the fp32 rate.
APPLE_SILICON = {
    "M2 Max (38-core GPU)": {"bf16_tflops": 13.6, "bandwidth_gb_s": 400.0},
    "M3 Max (40-core GPU)": {"bf16_tflops": 16.4, "bandwidth_gb_s": 400.0},
    "M4 Pro (20-core GPU)": {"bf16_tflops": 9.2, "bandwidth_gb_s": 273.0},
    "M4 Max (40-core GPU)": {"bf16_tflops": 18.4, "bandwidth_gb_s": 546.0},
}


def _presets() -> dict[str, dict[str, int]]:
    from .convert.checkpoint import PRESETS

    return PRESETS


def _resolve_dtype(dtype) -> mx.Dtype | None:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _default_dtype() -> mx.Dtype:
    # MLX's CPU backend runs half-precision matmuls ~100x slower than float32
    return mx.float32 if mx.default_device().type == mx.cpu else mx.bfloat16


def _dtype_name(dtype: mx.Dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))


def _check_quantize(bits, group_size) -> None:
    if bits is None:
        return
    if bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"quantize bits must be one of 2, 3, 4, 5, 6, 8, got {bits!r}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"q_group_size must be 32, 64 or 128, got {group_size!r}")


def _quantizable(hidden: int, group_size: int) -> Callable:
    # nn.quantize needs the input width divisible by the group size; on MLX's CUDA backend narrow
    # layers stay dense (see fsdfm_mlx.load.CUDA_DENSE_MAX_IN)
    narrow = CUDA_DENSE_MAX_IN if cuda_backend() else 0

    def pred(path, module):
        if isinstance(module, nn.Linear):
            K = module.weight.shape[-1]
            return K % group_size == 0 and K > narrow
        if isinstance(module, nn.Embedding):
            return hidden % group_size == 0
        return False

    return pred


def _prepare(model: nn.Module, dtype: mx.Dtype, bits, group_size) -> nn.Module:
    model.set_dtype(dtype)
    if bits is not None:
        nn.quantize(
            model,
            group_size=group_size,
            bits=bits,
            class_predicate=_quantizable(model.args.hidden_size, group_size),
        )
    mx.eval(model.parameters())
    model.eval()
    return model


def random_model(
    shape: str | dict,
    *,
    length: int = 1024,
    vocab_size: int = GPT2_VOCAB,
    dt_conditioned: bool = True,
    dtype=None,
    quantize: int | None = None,
    q_group_size: int = 64,
) -> Model:
    """An FS-DFM model with random weights, evaluated (for timing; weight values do not matter).

    Args:
        shape: a preset name (``170m`` | ``1.3b`` | ``1.7b``) or a dict of ``ModelArgs`` fields
            (``hidden_size``, ``cond_dim``, ``n_blocks``, ``n_heads``, optionally ``vocab_size``).
        length: the model's training length.
        vocab_size: V (GPT-2's 50,257 by default).
        dt_conditioned: True for an FS-DFM student, False for a DFM teacher.
        dtype: ``float32`` | ``float16`` | ``bfloat16`` (default: float32 on CPU, else bfloat16).
        quantize: quantize linear and embedding weights to this many bits (None = dense).
        q_group_size: quantization group size.

    Raises:
        ValueError: unknown preset or dtype, bad quantization options.
    """
    if isinstance(shape, str):
        presets = _presets()
        if shape.lower() not in presets:
            raise ValueError(f"unknown preset {shape!r}: choose from {', '.join(presets)}")
        fields = dict(presets[shape.lower()])
    else:
        fields = dict(shape)
    fields.setdefault("vocab_size", vocab_size)
    fields["dt_conditioned"] = dt_conditioned
    fields["length"] = length
    _check_quantize(quantize, q_group_size)
    dtype = _resolve_dtype(dtype) or _default_dtype()
    return _prepare(Model(ModelArgs(**fields)), dtype, quantize, q_group_size)


def parameter_count(args: ModelArgs) -> tuple[int, int]:
    """(all parameters, parameters of the matmuls) of a dense model with these args."""
    flat = Model(args).checkpoint_weights()  # lazy: nothing is allocated; no row padding
    total = sum(v.size for v in flat.values())
    embed = args.num_tokens * args.hidden_size
    small = sum(v.size for v in flat.values() if v.ndim < 2)  # biases and norms
    return int(total), int(total - embed - small)


def forward_flops(args: ModelArgs, batch: int, length: int) -> float:
    """FLOPs of one forward pass: 2 x matmul params x tokens + attention (QK^T and AV)."""
    _, matmul = parameter_count(args)
    attention = 4.0 * args.n_blocks * batch * length * length * args.hidden_size
    return 2.0 * matmul * batch * length + attention


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters as held in memory (packed, for a quantized model)."""
    return int(sum(v.nbytes for _, v in tree_flatten(model.parameters())))


def matmul_tflops(n: int = 8192, dtype="bfloat16", repeats: int = 10) -> float:
    """Measured TFLOP/s of an ``n x n x n`` matmul in MLX on the default device (a peak to compare)."""
    dt = _resolve_dtype(dtype)
    a = mx.random.normal((n, n)).astype(dt)
    b = mx.random.normal((n, n)).astype(dt)
    mx.eval(a, b)
    for _ in range(2):
        mx.eval(a @ b)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - tic)
    return 2.0 * n**3 / min(times) / 1e12


def _machine() -> dict:
    import mlx_lm

    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": getattr(mlx_lm, "__version__", None),
        "device": str(mx.default_device()),
        "cpu_blas": _cpu_blas.STATE["blas"],
    }
    try:
        info["device_info"] = {
            k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))
        }
    except Exception:  # not every backend reports it
        pass
    return info


class _Progress:
    def __init__(self, progress):
        if progress is True:
            self.fn = lambda msg: print(msg, file=sys.stderr, flush=True)
        elif callable(progress):
            self.fn = progress
        else:
            self.fn = None

    def __call__(self, msg: str) -> None:
        if self.fn is not None:
            self.fn(msg)


def _run_sampler(
    model,
    *,
    batch,
    length,
    seed,
    solver,
    steps=None,
    time_grid=None,
    lookahead=True,
    blocks_per_eval=None,
) -> float:
    """Seconds for one whole sampling run (no profiling syncs beyond the generator's own)."""
    gen = generate_step(
        model,
        lookahead=lookahead,
        blocks_per_eval=blocks_per_eval,
        batch_size=batch,
        length=length,
        steps=steps,
        time_grid=time_grid,
        solver=solver,
        seed=seed,
    )
    tic = time.perf_counter()
    last = deque(gen, maxlen=1)  # run every step, keep the final state
    mx.eval(last[0].tokens)
    return time.perf_counter() - tic


def _profile_split(
    model, *, batch, length, seed, solver, steps, passes, blocks_per_eval=None
) -> dict:
    model_ms, sampler_ms, step_ms = [], [], []
    for p in range(passes):
        for state in generate_step(
            model,
            blocks_per_eval=blocks_per_eval,
            batch_size=batch,
            length=length,
            steps=steps,
            solver=solver,
            seed=seed + p,
            profile=True,
        ):
            model_ms.append(state.model_ms)
            sampler_ms.append(state.sampler_ms)
            step_ms.append(state.step_ms)
    return {
        "model_ms_per_step": statistics.fmean(model_ms),
        "sampler_ms_per_step": statistics.fmean(sampler_ms),
        "step_ms_profiled": statistics.fmean(step_ms),
    }


def _time_steps(
    model,
    steps,
    *,
    batch,
    length,
    seed,
    solver,
    warmup,
    repeats,
    lookahead=True,
    blocks_per_eval=None,
) -> dict:
    tic = time.perf_counter()
    for w in range(warmup):
        _run_sampler(
            model,
            batch=batch,
            length=length,
            seed=seed + w,
            solver=solver,
            steps=steps,
            lookahead=lookahead,
            blocks_per_eval=blocks_per_eval,
        )
    warmup_s = time.perf_counter() - tic
    mx.synchronize()
    mx.reset_peak_memory()
    times = [
        _run_sampler(
            model,
            batch=batch,
            length=length,
            seed=seed + r,
            solver=solver,
            steps=steps,
            lookahead=lookahead,
            blocks_per_eval=blocks_per_eval,
        )
        for r in range(repeats)
    ]
    peak = mx.get_peak_memory()
    latency = statistics.median(times)
    return {
        "steps": steps,
        "latency_s": latency,
        "latency_min_s": min(times),
        "latencies_s": times,
        "warmup_s": warmup_s,
        "warmup_runs": warmup,
        "tokens_per_s": batch * length / latency,
        "peak_memory_bytes": int(peak),
    }


def _measure_long(
    run: Callable[[int], float], total: int, *, budget_s: float, probe: int, repeats: int
) -> dict:
    """Time ``run(n)`` for n = total, or for fewer units extrapolated linearly if over budget.

    ``run(n)`` returns the seconds for n units (steps or tokens) and is already warmed up.
    """
    probe = min(probe, total)
    per_unit = run(probe) / probe
    n = total if per_unit * total <= budget_s else max(probe, int(budget_s / per_unit))
    n = min(n, total)
    reps = repeats if per_unit * n * repeats <= budget_s else 1
    times = [run(n) for _ in range(reps)]
    measured = statistics.median(times)
    return {
        "latency_s": measured * total / n,
        "measured_units": n,
        "measured_latency_s": measured,
        "extrapolated": n < total,
        "runs": reps,
    }


def dfm_baseline(
    args: ModelArgs,
    *,
    steps: int = 1024,
    batch: int = 1,
    length: int = 1024,
    dtype=None,
    quantize: int | None = None,
    q_group_size: int = 64,
    seed: int = 0,
    repeats: int = 1,
    budget_s: float = 120.0,
) -> dict:
    """Time the ``dfm_euler`` sampler for ``steps`` steps on a random same-size DFM teacher.

    If the run would take longer than ``budget_s``, a prefix of the same time grid is timed and the
    latency extrapolated linearly (``extrapolated_from_steps`` says how many steps ran).
    """
    fields = {
        k: getattr(args, k)
        for k in ("hidden_size", "cond_dim", "n_blocks", "n_heads", "vocab_size", "mlp_ratio")
    }
    fields["source_distribution"] = args.source_distribution
    teacher = random_model(
        fields,
        length=length,
        dt_conditioned=False,
        dtype=dtype,
        quantize=quantize,
        q_group_size=q_group_size,
    )
    grid = uniform_time_grid(steps)

    def run(n: int) -> float:
        return _run_sampler(
            teacher,
            batch=batch,
            length=length,
            seed=seed,
            solver=DFM_EULER,
            time_grid=grid[: n + 1],
        )

    run(min(2, steps))  # compile + warm-up
    mx.synchronize()
    mx.reset_peak_memory()
    m = _measure_long(run, steps, budget_s=budget_s, probe=min(8, steps), repeats=repeats)
    out = {
        "kind": "dfm",
        "solver": DFM_EULER,
        "steps": steps,
        "latency_s": m["latency_s"],
        "tokens_per_s": batch * length / m["latency_s"],
        "runs": m["runs"],
        "peak_memory_bytes": int(mx.get_peak_memory()),
        "extrapolated_from_steps": m["measured_units"] if m["extrapolated"] else None,
    }
    if m["extrapolated"]:
        out["note"] = (
            f"ran {m['measured_units']} of {steps} steps ({m['measured_latency_s']:.3f} s) and "
            "extrapolated linearly"
        )
    mx.clear_cache()
    return out


def ar_model_args(args: ModelArgs) -> dict:
    """An mlx-lm llama config with about the same parameter count as the FS-DFM model.

    Same width, heads and vocabulary; SwiGLU width ~8/3 D; untied embeddings; the layer count is
    chosen so the totals match.
    """
    D, V = args.hidden_size, args.vocab_size
    inter = max(64, int(round(8 * D / 3 / 64)) * 64)
    per_layer = 4 * D * D + 3 * D * inter + 2 * D
    target, _ = parameter_count(args)
    layers = max(1, round((target - 2 * V * D) / per_layer))
    return {
        "model_type": "llama",
        "hidden_size": D,
        "num_hidden_layers": layers,
        "intermediate_size": inter,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": V,
        "tie_word_embeddings": False,
    }


def ar_baseline(
    args: ModelArgs,
    *,
    batch: int = 1,
    length: int = 1024,
    dtype=None,
    quantize: int | None = None,
    q_group_size: int = 64,
    seed: int = 0,
    repeats: int = 1,
    budget_s: float = 120.0,
) -> dict:
    """Time an mlx-lm llama of about the same size writing ``length`` new tokens with a KV cache.

    Batch 1 uses ``mlx_lm.generate.generate_step`` (1-token prompt, greedy); a batch uses the same
    model and ``make_prompt_cache`` in a plain decode loop. Over ``budget_s``, fewer tokens are
    timed and the latency extrapolated linearly (``extrapolated_from_tokens``); since attention
    cost grows with the position, this slightly favours the AR baseline.
    """
    import sys as _sys

    import mlx_lm.generate  # noqa: F401  (the package re-exports a function of the same name)
    from mlx_lm.models import llama
    from mlx_lm.models.cache import make_prompt_cache

    lm_generate_step = _sys.modules["mlx_lm.generate"].generate_step
    dtype = _resolve_dtype(dtype) or _default_dtype()
    cfg = ar_model_args(args)
    model = llama.Model(llama.ModelArgs(**cfg))
    model.set_dtype(dtype)
    if quantize is not None:
        nn.quantize(
            model,
            group_size=q_group_size,
            bits=quantize,
            class_predicate=lambda p, m: (
                hasattr(m, "to_quantized") and m.weight.shape[-1] % q_group_size == 0
            ),
        )
    mx.eval(model.parameters())
    params = sum(v.size for _, v in tree_flatten(llama.Model(llama.ModelArgs(**cfg)).parameters()))
    mx.random.seed(seed)
    prompt = mx.random.randint(0, args.vocab_size, (batch, 1)).astype(mx.int32)

    def run(n: int) -> float:
        tic = time.perf_counter()
        if batch == 1:
            deque(lm_generate_step(prompt[0], model, max_tokens=n), maxlen=0)
        else:
            cache = make_prompt_cache(model)
            y = prompt
            toks = []
            for _ in range(n):
                y = mx.argmax(model(y, cache=cache)[:, -1, :], axis=-1)[:, None]
                mx.async_eval(y)
                toks.append(y)
            mx.eval(toks)
        return time.perf_counter() - tic

    run(min(8, length))  # warm-up
    mx.synchronize()
    mx.reset_peak_memory()
    m = _measure_long(run, length, budget_s=budget_s, probe=min(32, length), repeats=repeats)
    out = {
        "kind": "ar",
        "architecture": "mlx-lm llama, KV cache, greedy",
        "method": "mlx_lm.generate.generate_step"
        if batch == 1
        else "decode loop, make_prompt_cache",
        "config": cfg,
        "params": int(params),
        "new_tokens_per_sequence": length,
        "latency_s": m["latency_s"],
        "tokens_per_s": batch * length / m["latency_s"],
        "runs": m["runs"],
        "peak_memory_bytes": int(mx.get_peak_memory()),
        "extrapolated_from_tokens": m["measured_units"] if m["extrapolated"] else None,
    }
    if m["extrapolated"]:
        out["note"] = (
            f"generated {m['measured_units']} of {length} tokens "
            f"({m['measured_latency_s']:.3f} s) and extrapolated linearly"
        )
    mx.clear_cache()
    return out


def _guarded(fn: Callable[[], dict]) -> dict:
    """Run one baseline; a failure (e.g. mlx-lm missing) becomes ``{"error": ...}``."""
    try:
        return fn()
    except (ImportError, RuntimeError, ValueError, MemoryError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return {"error": f"{type(e).__name__}: {first}"}


def _parse_steps(steps) -> list[int]:
    if isinstance(steps, str):
        try:
            steps = [int(s) for s in steps.split(",") if s.strip()]
        except ValueError:
            raise ValueError(
                f"steps must be comma-separated positive integers, got {steps!r}"
            ) from None
    if isinstance(steps, int):
        steps = [steps]
    steps = list(steps)
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in steps):
        raise ValueError(f"steps must be positive integers, got {steps!r}")
    return sorted(dict.fromkeys(steps))


def profile(
    model: str | Model | None = None,
    *,
    preset: str | dict | None = None,
    steps: Sequence[int] | str = DEFAULT_STEPS,
    length: int = 1024,
    batch_size: int = 1,
    dtype: str | None = None,
    quantize: int | None = None,
    q_group_size: int = 64,
    solver: str | None = None,
    warmup: int = 1,
    repeats: int = 3,
    baselines: bool = True,
    baseline_steps: int = 1024,
    baseline_budget_s: float = 120.0,
    seed: int = 0,
    lookahead: bool = True,
    blocks_per_eval: int | None = None,
    progress: bool | Callable[[str], None] = True,
) -> dict:
    """Time FS-DFM sampling at several step counts, with the DFM-1024 and AR baselines.

    For each step count: end-to-end latency of ``generate_step`` (median of ``repeats`` runs after
    ``warmup`` runs, whose time is reported apart), tokens/s (``batch_size * length / latency``),
    per-step model and sampler ms (from a separate ``profile=True`` pass, so the end-to-end runs
    carry no extra syncs), achieved model TFLOP/s, and peak memory over the timed runs.

    Args:
        model: a converted model folder (or Hugging Face repo), or a loaded :class:`Model`.
        preset: instead of ``model``: ``170m`` | ``1.3b`` | ``1.7b`` (or a dict of ``ModelArgs``
            shape fields) with random weights.
        steps: step counts to time (a list, or ``"1,2,4,8"``).
        length: L, tokens per passage.
        batch_size: B, passages per run.
        dtype: ``float32`` | ``float16`` | ``bfloat16`` (default: float32 on CPU, bfloat16 on GPU;
            for a folder: as :func:`fsdfm_mlx.load.load` chooses).
        quantize: quantize dense weights to this many bits (None = as loaded / dense).
        q_group_size: quantization group size.
        solver: solver (default: the model's).
        warmup: untimed runs before the timed ones, per step count.
        repeats: timed runs per step count.
        baselines: also time the DFM teacher and the AR model.
        baseline_steps: the DFM baseline's step count.
        baseline_budget_s: seconds a baseline may run before it is timed on a prefix and
            extrapolated linearly.
        seed: base seed.
        lookahead: queue each step before waiting for the previous one (faster; on MLX's CUDA
            backend it also holds a second step's buffers, so the peak memory is higher).
        blocks_per_eval: queue the blocks this many at a time, at most two groups in flight
            (lower peak memory on GPUs; see :func:`fsdfm_mlx.generate.make_forward`); 0 = whole
            forwards; None = :func:`fsdfm_mlx.generate.default_blocks_per_eval`.
        progress: print progress lines to stderr (True), or call this function with each line.

    Returns:
        A JSON-serialisable dict: ``machine``, ``config``, ``results`` (one row per step count,
        with ``speedup_vs_ar`` and ``speedup_vs_dfm`` latency ratios when baselines ran),
        ``baselines``.

    Raises:
        ValueError: bad options (neither or both of model / preset, bad steps, sizes, dtype,
            quantization or solver).
        FileNotFoundError: no model at ``model``.
    """
    say = _Progress(progress)
    if (model is None) == (preset is None):
        raise ValueError("give either a model or a preset")
    for name, v in (("length", length), ("batch_size", batch_size), ("repeats", repeats)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    check_blocks_per_eval(blocks_per_eval)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
    if (
        isinstance(baseline_steps, bool)
        or not isinstance(baseline_steps, int)
        or baseline_steps <= 0
    ):
        raise ValueError(f"baseline_steps must be a positive integer, got {baseline_steps!r}")
    step_list = _parse_steps(steps)
    _check_quantize(quantize, q_group_size)
    req_dtype = _resolve_dtype(dtype)

    tic = time.perf_counter()
    if isinstance(model, Model):
        source = "given model"
    elif model is not None:
        from .load import load_model, resolve_model_path

        path = resolve_model_path(model)
        say(f"loading {path}")
        model, _ = load_model(path, dtype=req_dtype)
        source = str(path)
        if quantize is not None and "scales" not in model.blocks[0].qw:
            nn.quantize(
                model,
                group_size=q_group_size,
                bits=quantize,
                class_predicate=_quantizable(model.args.hidden_size, q_group_size),
            )
            mx.eval(model.parameters())
    else:
        if isinstance(preset, str) and preset.lower() not in _presets():
            raise ValueError(f"unknown preset {preset!r}: choose from {', '.join(_presets())}")
        source = f"preset {preset}" if isinstance(preset, str) else "random model"
        say(f"building {source} with random weights")
        model = random_model(
            preset,
            length=length,
            dtype=req_dtype,
            quantize=quantize,
            q_group_size=q_group_size,
        )
    load_s = time.perf_counter() - tic
    args = model.args
    solver = args.default_solver if solver is None else solver
    check_solver(model, solver)
    compute = model.dtype
    total_params, matmul_params = parameter_count(args)
    flops = forward_flops(args, batch_size, length)

    results = []
    for n in step_list:
        say(f"FS-DFM: {n} step{'s' if n > 1 else ''}, B={batch_size}, L={length}")
        row = _time_steps(
            model,
            n,
            batch=batch_size,
            length=length,
            seed=seed,
            solver=solver,
            warmup=warmup,
            repeats=repeats,
            lookahead=lookahead,
            blocks_per_eval=blocks_per_eval,
        )
        passes = max(1, min(repeats, math.ceil(16 / n)))
        row.update(
            _profile_split(
                model,
                batch=batch_size,
                length=length,
                seed=seed,
                solver=solver,
                steps=n,
                passes=passes,
                blocks_per_eval=blocks_per_eval,
            )
        )
        row["model_tflops"] = flops / (row["model_ms_per_step"] / 1e3) / 1e12
        results.append(row)

    base: dict[str, Any] = {}
    if baselines:
        mx.clear_cache()
        common = dict(
            batch=batch_size,
            length=length,
            dtype=compute,
            quantize=quantize,
            q_group_size=q_group_size,
            seed=seed,
            repeats=repeats,
            budget_s=baseline_budget_s,
        )
        say(f"baseline: DFM teacher, {baseline_steps} steps of {DFM_EULER}")
        base["dfm"] = _guarded(lambda: dfm_baseline(args, steps=baseline_steps, **common))
        say(f"baseline: autoregressive (mlx-lm llama, KV cache), {length} new tokens")
        base["ar"] = _guarded(lambda: ar_baseline(args, **common))
        for row in results:
            for key, name in (("speedup_vs_ar", "ar"), ("speedup_vs_dfm", "dfm")):
                lat = base[name].get("latency_s")
                row[key] = lat / row["latency_s"] if lat else None

    q = getattr(model.blocks[0].qw, "bits", None) if args.n_blocks else None
    return {
        "benchmark": "fsdfm_profile",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "config": {
            "model": source,
            "parameters": total_params,
            "matmul_parameters": matmul_params,
            "weights_bytes": weight_bytes(model),
            "hidden_size": args.hidden_size,
            "cond_dim": args.cond_dim,
            "n_blocks": args.n_blocks,
            "n_heads": args.n_heads,
            "vocab_size": args.vocab_size,
            "dt_conditioned": bool(args.dt_conditioned),
            "dtype": _dtype_name(compute),
            "quantization": (
                {"bits": q, "group_size": model.blocks[0].qw.group_size} if q is not None else None
            ),
            "batch_size": batch_size,
            "length": length,
            "solver": solver,
            "warmup": warmup,
            "repeats": repeats,
            "seed": seed,
            "lookahead": lookahead,
            "blocks_per_eval": (
                default_blocks_per_eval(model) if blocks_per_eval is None else blocks_per_eval
            ),
            "forward_flops": flops,
            "load_s": load_s,
        },
        "results": results,
        "baselines": base or None,
    }


def apple_silicon_estimate(
    preset: str | dict = "1.3b",
    steps: int = 8,
    length: int = 1024,
    batch: int = 1,
    *,
    bits: int | None = None,
    compute_efficiency: float = 0.5,
    bandwidth_efficiency: float = 0.8,
    chips: dict | None = None,
) -> dict:
    """A paper-style ESTIMATE (not a measurement) of FS-DFM tokens/s on M-series GPUs.

    Per step, a roofline: ``max(FLOPs / peak FLOP/s, bytes / bandwidth)``. FLOPs are
    ``2 x matmul params x B x L`` plus attention ``4 x blocks x B x L^2 x D``; bytes are the weights
    (bf16, or ``bits``-bit with group-64 fp16 scales and biases) plus the logits written in bf16
    and read once in float32 by the sampler. The AR row is the same roofline for ``L`` decode
    steps of a same-size model (weights read once per token). ``upper_bound`` uses 100% of the
    assumed peaks; ``estimate`` uses ``compute_efficiency`` and ``bandwidth_efficiency``
    (assumptions too). Chip figures: :data:`APPLE_SILICON` (assumptions; see its comment).

    Returns:
        A JSON-serialisable dict with ``label`` "ESTIMATE", the assumptions, and one row per chip.
    """
    if isinstance(preset, str):
        presets = _presets()
        if preset.lower() not in presets:
            raise ValueError(f"unknown preset {preset!r}: choose from {', '.join(presets)}")
        fields = dict(presets[preset.lower()])
    else:
        fields = dict(preset)
    fields.setdefault("vocab_size", GPT2_VOCAB)
    args = ModelArgs(**fields, dt_conditioned=True, length=length)
    total, matmul = parameter_count(args)
    flops_step = forward_flops(args, batch, length)
    bytes_per_param = 2.0 if bits is None else bits / 8 + 4.0 / 64
    w_bytes = total * bytes_per_param
    logits_bytes = batch * length * args.num_tokens * (2 + 4)
    step_bytes = w_bytes + logits_bytes
    rows = []
    for chip, spec in (chips or APPLE_SILICON).items():
        peak = spec["bf16_tflops"] * 1e12
        bw = spec["bandwidth_gb_s"] * 1e9
        row = {"chip": chip, **spec}
        for label, ce, be in (
            ("upper_bound", 1.0, 1.0),
            ("estimate", compute_efficiency, bandwidth_efficiency),
        ):
            t_compute = flops_step / (peak * ce)
            t_memory = step_bytes / (bw * be)
            latency = steps * max(t_compute, t_memory)
            ar_latency = length * (w_bytes / (bw * be))  # decode is bandwidth-bound
            ar_latency = max(ar_latency, 2.0 * matmul * batch * length / (peak * ce))
            row[label] = {
                "step_ms": max(t_compute, t_memory) * 1e3,
                "bound": "compute" if t_compute >= t_memory else "memory",
                "latency_s": latency,
                "tokens_per_s": batch * length / latency,
                "ar_tokens_per_s": batch * length / ar_latency,
            }
        rows.append(row)
    return {
        "label": "ESTIMATE (roofline from assumed peak FLOP/s and bandwidth; not a measurement)",
        "preset": preset if isinstance(preset, str) else fields,
        "steps": steps,
        "length": length,
        "batch": batch,
        "bits": bits,
        "parameters": total,
        "flops_per_step": flops_step,
        "bytes_per_step": step_bytes,
        "assumptions": {
            "chips": "APPLE_SILICON: bandwidth from Apple's published specs; bf16 TFLOP/s are "
            "commonly quoted fp32 GPU peaks (assumed equal for bf16)",
            "compute_efficiency": compute_efficiency,
            "bandwidth_efficiency": bandwidth_efficiency,
        },
        "chips": rows,
    }
