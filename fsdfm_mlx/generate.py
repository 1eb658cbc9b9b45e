"""Generation in layers, as in mlx-lm: ``generate_step`` -> ``stream_generate`` -> ``generate``.

FS-DFM writes the whole passage at once: every step runs the model on all ``L`` positions and the
solver moves some of them. ``generate_step`` yields the state after each step; ``stream_generate``
adds text, timing and memory; ``generate`` returns the final text. A prompt is a frozen prefix and a
suffix a frozen tail (infilling): frozen positions never change. Shape letters: B batch, L length.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
import weakref
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .solvers import (
    SOLVERS,
    STUDENT_SOLVERS,
    SamplerOptions,
    initial_tokens,
    sample_step,
    uniform_time_grid,
    validate_time_grid,
)

MASK_PLACEHOLDER = "\u2591"  # how a still-masked position is shown in text


@dataclass
class StepState:
    """The state after one solver step.

    Attributes:
        tokens: [B, L] int32 tokens ``x_{t+h}`` (evaluated).
        step: 1-based index of the step just taken.
        steps: total number of steps n.
        t: the time ``t_i`` the model saw at this step.
        h: the step size ``h_i``; the tokens are now at ``t + h``.
        changed: [B, L] bool, True where this step changed the token.
        last_changed: [B, L] int32, the step (1..n) at which each token last changed; 0 = never
            (still the source sample, or a frozen prompt/suffix token).
        editable: [B, L] bool, False at frozen (prompt / suffix) positions.
        model_ms: time of the model call (only with ``profile=True``, else None).
        sampler_ms: time of the solver update (only with ``profile=True``, else None).
        step_ms: wall time of the whole step.
    """

    tokens: mx.array
    step: int
    steps: int
    t: float
    h: float
    changed: mx.array
    last_changed: mx.array
    editable: mx.array
    model_ms: float | None
    sampler_ms: float | None
    step_ms: float


def _as_token_list(tokens, what: str) -> list[int]:
    if tokens is None:
        return []
    arr = np.array(tokens)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must hold integer token ids")
    return [int(v) for v in arr]


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_solver(model, solver: str) -> None:
    """Raise ValueError unless ``solver`` exists and suits the model (student vs teacher)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of: {', '.join(SOLVERS)}")
    student = bool(model.args.dt_conditioned)
    if solver in STUDENT_SOLVERS and not student:
        raise ValueError(
            f"solver {solver} needs a step-size conditioned model (an FS-DFM student); "
            "this model is a DFM teacher: use dfm_euler"
        )
    if solver not in STUDENT_SOLVERS and student:
        raise ValueError(
            f"solver {solver} needs a model without step-size conditioning (a DFM teacher); "
            f"this model is a step-size conditioned student: use one of {', '.join(STUDENT_SOLVERS)}"
        )


def generate_step(
    model,
    *,
    batch_size: int = 1,
    length: int | None = None,
    steps: int | None = None,
    time_grid: Sequence[float] | None = None,
    solver: str | None = None,
    seed: int | None = None,
    key: mx.array | None = None,
    prompt_tokens: Sequence[int] | mx.array | None = None,
    suffix_tokens: Sequence[int] | mx.array | None = None,
    temp: float | None = None,
    top_k: int | None = None,
    top_p: float = 1.0,
    profile: bool = False,
    compile: bool | None = None,
    lookahead: bool = True,
    blocks_per_eval: int | None = None,
) -> Generator[StepState, None, None]:
    """Run the solver and yield the state after every step.

    Inputs are checked when this is called (not at the first ``next``).

    Args:
        model: ``model(tokens [B, L], t [B], dt [B] | None) -> logits [B, L, V]`` with ``.args``
            (a :class:`fsdfm_mlx.model.ModelArgs`).
        batch_size: B, passages written in parallel.
        length: L, tokens per passage (default: the model's training length).
        steps: number of steps n on the uniform grid ``t_i = i / n`` (default: the model's
            ``default_steps``). Give either ``steps`` or ``time_grid``.
        time_grid: explicit increasing times ``t_0 < ... < t_n`` in [0, 1].
        solver: one of ``fsdfm_mlx.solvers.SOLVERS`` (default: the model's ``default_solver``).
        seed: integer seed; same seed, model and options give the same tokens on the same device.
            None draws a fresh seed (see :func:`resolve_seed`).
        key: a PRNG key, instead of ``seed``.
        prompt_tokens: token ids frozen at the start of every passage.
        suffix_tokens: token ids frozen at the end of every passage (infilling).
        temp: temperature on the logits (1 = off, 0 = argmax posterior; default: the model's
            ``default_temp``, 1.0 unless its config says otherwise).
        top_k: keep only the k most likely tokens of each posterior (None = off).
        top_p: nucleus filter on each posterior (1 = off).
        profile: also evaluate the logits before the update, so that ``model_ms`` and
            ``sampler_ms`` are measured apart (one extra ``mx.eval`` per step).
        compile: run the model's forward under ``mx.compile`` (see :func:`compiled_forward`);
            None = on GPU devices only (on this project's 2-core CPU the compiled 170M forward
            was ~10% slower than the eager one).
        lookahead: queue each step on the device before waiting for the previous one, so the
            device never waits for Python (False: wait for every step before building the next;
            less memory in flight).
        blocks_per_eval: queue the transformer blocks this many at a time and keep at most two
            such groups in flight on the device, which bounds the activation memory a step holds
            (see :func:`make_forward`); 0 = each forward is queued whole; None = the default of
            :func:`default_blocks_per_eval` (on a GPU 1 for a quantized model, else 2; 0 on the CPU).

    Returns:
        A generator of :class:`StepState`. Without ``profile`` each step is queued on the device
        before the previous state is yielded, so the device never waits for Python.

    Raises:
        ValueError: bad sizes, unknown or unsuitable solver, bad filters, prompt too long.
    """
    args = model.args
    _check_positive_int(batch_size, "batch_size")
    length = args.length if length is None else length
    _check_positive_int(length, "length")
    if steps is not None and time_grid is not None:
        raise ValueError("give either steps or time_grid, not both")
    if time_grid is not None:
        grid = validate_time_grid(time_grid)
    else:
        grid = uniform_time_grid(args.default_steps if steps is None else steps)
    solver = args.default_solver if solver is None else solver
    check_solver(model, solver)
    temp = args.default_temp if temp is None else temp
    options = SamplerOptions(temperature=temp, top_k=top_k, top_p=top_p)
    check_blocks_per_eval(blocks_per_eval)

    prompt = _as_token_list(prompt_tokens, "prompt_tokens")
    suffix = _as_token_list(suffix_tokens, "suffix_tokens")
    if len(prompt) + len(suffix) > length:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) and suffix ({len(suffix)} tokens) do not fit in "
            f"length {length}"
        )
    bad = [v for v in prompt + suffix if not 0 <= v < args.vocab_size]
    if bad:
        raise ValueError(
            f"token id {bad[0]} in the prompt/suffix is outside the model's vocabulary "
            f"(0..{args.vocab_size - 1})"
        )
    if key is None:
        key = mx.random.key(resolve_seed(seed))

    return _run(
        model,
        batch_size,
        length,
        grid,
        solver,
        key,
        prompt,
        suffix,
        options,
        profile,
        compile,
        lookahead,
        blocks_per_eval,
    )


def _run(
    model, B, L, grid, solver, key, prompt, suffix, options, profile, compile, lookahead, per_eval
):
    args = model.args
    mask_id = args.mask_token_id
    student = bool(args.dt_conditioned)
    exponent = float(args.scheduler.get("exponent", 1.0)) if args.scheduler else 1.0
    n = len(grid) - 1
    h_grid = grid[1:] - grid[:-1]  # float32, as the official code subtracts
    ts, hs = mx.array(grid[:-1]), mx.array(h_grid)

    keys = mx.random.split(key, n + 1)
    x = initial_tokens(B, L, args.vocab_size, mask_id, keys[0])
    frozen = np.zeros(L, dtype=bool)
    fixed = np.zeros(L, dtype=np.int32)
    if prompt:
        frozen[: len(prompt)] = True
        fixed[: len(prompt)] = prompt
    if suffix:
        frozen[L - len(suffix) :] = True
        fixed[L - len(suffix) :] = suffix
    # a contiguous [B, L] array (not a broadcast view), so no step has to copy it
    editable = mx.array(np.ascontiguousarray(np.broadcast_to(~frozen, (B, L))))
    x = mx.where(editable, x, mx.array(fixed)[None])
    last_changed = mx.zeros((B, L), dtype=mx.int32)
    mx.eval(x, editable, last_changed)

    if compile is None:
        compile = mx.default_device().type == mx.gpu
    if per_eval is None:
        per_eval = default_blocks_per_eval(model)
    forward = make_forward(model, compile=compile, blocks_per_eval=per_eval)
    pending = None  # the previous step's state: queued on the device, not yet waited for
    tic = time.perf_counter()
    for i in range(n):
        t_b = mx.broadcast_to(ts[i], (B,))
        dt_b = mx.broadcast_to(hs[i], (B,)) if student else None
        logits = forward(x, t_b, dt_b) if student else forward(x, t_b)
        if profile:
            mx.eval(logits)
        mid = time.perf_counter()
        x_new = sample_step(
            logits,
            x,
            ts[i],
            hs[i],
            keys[i + 1],
            solver=solver,
            final=i == n - 1,
            mask_id=mask_id,
            editable=editable,
            options=options,
            exponent=exponent,
        )
        del logits  # the step's graph holds it; nothing else should
        changed = x_new != x
        last_changed = mx.where(changed, i + 1, last_changed)
        x = x_new
        state = _state(x, i, n, grid, h_grid, changed, last_changed, editable)
        if profile or not lookahead:
            mx.eval(x, changed, last_changed)
            toc = time.perf_counter()
            if profile:
                state.model_ms, state.sampler_ms = (mid - tic) * 1e3, (toc - mid) * 1e3
            state.step_ms = (toc - tic) * 1e3
            yield state
            tic = time.perf_counter()
            continue
        # Queue this step, then wait for the previous one: the device always has the next step
        # to run while Python builds the one after it, and at most two steps are in flight.
        mx.async_eval(x, changed, last_changed)
        if pending is not None:
            yield _finish(pending, tic)
            tic = time.perf_counter()
        pending = state
    if pending is not None:
        yield _finish(pending, tic)


def _state(x, i, n, grid, h_grid, changed, last_changed, editable) -> StepState:
    """The state after step ``i`` (0-based); the caller fills in the timings."""
    return StepState(
        tokens=x,
        step=i + 1,
        steps=n,
        t=float(grid[i]),
        h=float(h_grid[i]),
        changed=changed,
        last_changed=last_changed,
        editable=editable,
        model_ms=None,
        sampler_ms=None,
        step_ms=0.0,
    )


def _finish(state: StepState, tic: float) -> StepState:
    """Wait for a queued step's arrays and stamp its wall time."""
    mx.eval(state.tokens, state.changed, state.last_changed)
    state.step_ms = (time.perf_counter() - tic) * 1e3
    return state


def compiled_forward(model):
    """``model``'s forward pass under ``mx.compile`` (cached on the model).

    Elementwise work between the matmuls (adaLN modulation, casts, gates, residual adds) is fused
    and the graph is traced once per input shape instead of rebuilt every step. The compiled graph
    holds the weights it was traced with, so it is rebuilt when the model's parameter arrays are
    replaced (e.g. by ``load_weights``); it refers to the model only weakly, so a model that is
    dropped frees its memory at once. Objects that are not MLX modules (e.g. a Core ML runner)
    are returned unchanged.
    """
    if not isinstance(model, nn.Module):
        return model

    def build(ref):
        return mx.compile(lambda *args: ref()(*args))

    return _cached_on_model(model, "compiled", build)


def _cached_on_model(model, key, build):
    """``build(weakref to model)``, cached on the model under ``key`` until its parameter arrays
    are replaced (a compiled graph holds the arrays it was traced with)."""
    weights = tuple(id(v) for _, v in tree_flatten(model.parameters()))
    cache = model.__dict__.setdefault("_fsdfm_forwards", {})
    cached = cache.get(key)
    if cached is None or cached[0] != weights:
        cached = cache[key] = (weights, build(weakref.ref(model)))
    return cached[1]


def check_blocks_per_eval(value) -> None:
    """Raise ValueError unless ``value`` is None or a non-negative int."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"blocks_per_eval must be a non-negative integer, got {value!r}")


def default_blocks_per_eval(model) -> int:
    """How many blocks :func:`make_forward` queues at a time by default on a GPU device: 1 for a
    quantized model, 2 for a dense one; 0 (the whole forward at once) on the CPU.

    On the H100 (1.3B, L = 1,024, B = 1, 8 steps; ``fsdfm-mlx profile --repeats 10`` in fresh
    processes) whole forwards peaked at 5.8 GB (bf16) and 4.5 GB (4-bit); two blocks at a time
    at 3.1 GB (bf16, 66.5 ms vs 66.8 ms) and one block at a time at 1.23 GB (4-bit, 180.6 ms vs
    182.5 ms; two blocks: 1.33-1.43 GB). On the CPU buffers are freed as soon as they are used,
    so it buys nothing there.
    """
    if mx.default_device().type != mx.gpu:
        return 0
    blocks = getattr(model, "blocks", None)
    if not blocks:
        return 0
    return 1 if "scales" in blocks[0].qw else 2


def make_forward(model, *, compile: bool = True, blocks_per_eval: int | None = None):
    """The forward pass a step calls: ``forward(tokens, t[, dt]) -> logits``.

    MLX's GPU backends keep every input of a queued kernel alive until the device has finished
    the command buffer that holds it, and Python queues a whole forward pass far faster than the
    device runs it, so by default all of a pass's intermediate activations are alive at once
    (on the H100 about 0.7 GB for the 1.3B model at L = 1,024, more than the 4-bit weights).
    With ``blocks_per_eval = N`` the blocks are queued N at a time: each group is queued with
    ``mx.async_eval`` and then the group before it is waited for, so the device always has the
    next group to run while at most two groups' buffers are alive. The logits are the same (bit for
    bit on the CPU; on a GPU up to float rounding, as the groups' elementwise work may fuse
    differently).

    Args:
        model: a :class:`fsdfm_mlx.model.Model` (anything else callable is returned unchanged).
        compile: run each piece under ``mx.compile`` (see :func:`compiled_forward`).
        blocks_per_eval: blocks per queued group; None or 0 = the whole forward as one graph.

    Returns:
        The callable.
    """
    n_blocks = len(getattr(model, "blocks", ()))
    if not blocks_per_eval or not hasattr(model, "run_blocks") or blocks_per_eval >= n_blocks:
        return compiled_forward(model) if compile else model
    key = ("segments", blocks_per_eval, bool(compile))
    return _cached_on_model(
        model, key, lambda ref: _segmented(ref, n_blocks, blocks_per_eval, compile)
    )


def _segmented(ref, n_blocks: int, blocks_per_eval: int, compile: bool):
    """The forward of :func:`make_forward` over ``ref()`` with the blocks in groups."""
    wrap = mx.compile if compile else (lambda f: f)

    def group(start: int, stop: int):
        return wrap(lambda x, c: ref().run_blocks(x, c, start, stop))

    embed = wrap(lambda *a: ref().embed(*a))
    head = wrap(lambda x, c: ref().head(x, c))
    groups = [
        group(i, min(i + blocks_per_eval, n_blocks)) for i in range(0, n_blocks, blocks_per_eval)
    ]

    def forward(tokens, t, dt=None):
        x, c = embed(tokens, t, dt) if dt is not None else embed(tokens, t)
        queued = None
        for run in groups:
            x = run(x, c)
            mx.async_eval(x)
            if queued is not None:
                mx.eval(queued)  # the group before: its buffers are freed when it completes
            queued = x
        return head(x, c)

    return forward


def resolve_seed(seed: int | None) -> int:
    """The seed to use: ``seed`` itself, or a fresh random 32-bit seed when None."""
    if seed is None:
        return secrets.randbits(32)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


# ----------------------------------------------------------------------------------------------
# Text layer
# ----------------------------------------------------------------------------------------------


def decode(tokenizer, tokens, mask_id: int | None = None) -> list[str]:
    """Decode [B, L] ids to B strings; mask tokens (``mask_id``) show as a placeholder."""
    rows = np.array(tokens).tolist()
    out = []
    for row in rows:
        if mask_id is None or mask_id not in row:
            out.append(tokenizer.decode(row))
            continue
        parts, run = [], []
        for tok in row:
            if tok == mask_id:
                if run:
                    parts.append(tokenizer.decode(run))
                    run = []
                parts.append(MASK_PLACEHOLDER)
            else:
                run.append(tok)
        if run:
            parts.append(tokenizer.decode(run))
        out.append("".join(parts))
    return out


@dataclass
class GenerationResponse:
    """What ``stream_generate`` yields after every step.

    Attributes:
        tokens: [B, L] int32 tokens after this step.
        step: 1-based index of the step just taken; ``steps``: total n.
        t: the time ``t_i`` the model saw; ``h``: the step size (tokens are now at ``t + h``).
        model_ms / sampler_ms: this step's model and solver time (None unless ``profile``).
        step_ms: this step's wall time.
        elapsed_s: wall time since generation began (first-step compilation included).
        tokens_per_sec: generated (editable) tokens of the batch / ``elapsed_s``.
        peak_memory: peak memory so far in GB (``mx.get_peak_memory``).
        changed / last_changed / editable: see :class:`StepState`.
        seed: the seed used (None when a key was given).
        solver: the solver used.
        temp: the sampling temperature used (the model's ``default_temp`` unless one was given).
        finished: True on the last step.
        text: the B passages decoded (property; decoded on first access).
    """

    tokens: mx.array
    step: int
    steps: int
    t: float
    h: float
    model_ms: float | None
    sampler_ms: float | None
    step_ms: float
    elapsed_s: float
    tokens_per_sec: float
    peak_memory: float
    changed: mx.array
    last_changed: mx.array
    editable: mx.array
    seed: int | None
    solver: str
    finished: bool
    temp: float = 1.0
    tokenizer: Any = field(default=None, repr=False)
    mask_id: int | None = field(default=None, repr=False)

    @cached_property
    def text(self) -> list[str]:
        return decode(self.tokenizer, self.tokens, self.mask_id)


def stream_generate(
    model,
    tokenizer,
    prompt: str | Sequence[int] | None = None,
    suffix: str | Sequence[int] | None = None,
    *,
    seed: int | None = None,
    solver: str | None = None,
    **kwargs,
) -> Generator[GenerationResponse, None, None]:
    """Generate and yield a :class:`GenerationResponse` after every step.

    Args:
        model: the FS-DFM model.
        tokenizer: an mlx-lm ``TokenizerWrapper`` (anything with ``encode`` / ``decode``).
        prompt: text (or token ids) frozen at the start of every passage.
        suffix: text (or token ids) frozen at the end of every passage.
        seed: integer seed (None = fresh random seed, reported in the responses).
        solver: solver name (default: the model's).
        **kwargs: the other keyword arguments of :func:`generate_step`.

    Raises:
        ValueError: as :func:`generate_step`.
    """
    prompt_tokens = _encode(tokenizer, prompt)
    suffix_tokens = _encode(tokenizer, suffix)
    if kwargs.get("key") is None:
        seed = resolve_seed(seed)
    solver = model.args.default_solver if solver is None else solver
    if kwargs.get("temp") is None:
        kwargs["temp"] = model.args.default_temp
    gen = generate_step(
        model,
        prompt_tokens=prompt_tokens,
        suffix_tokens=suffix_tokens,
        seed=seed,
        solver=solver,
        **kwargs,
    )
    return _stream(gen, model, tokenizer, seed, solver, kwargs["temp"])


def _stream(gen, model, tokenizer, seed, solver, temp):
    mx.reset_peak_memory()
    start = time.perf_counter()
    n_gen = None
    for state in gen:
        elapsed = time.perf_counter() - start
        if n_gen is None:
            n_gen = int(np.array(state.editable).sum())  # generated (editable) tokens
        yield GenerationResponse(
            tokens=state.tokens,
            step=state.step,
            steps=state.steps,
            t=state.t,
            h=state.h,
            model_ms=state.model_ms,
            sampler_ms=state.sampler_ms,
            step_ms=state.step_ms,
            elapsed_s=elapsed,
            tokens_per_sec=n_gen / elapsed if elapsed > 0 else float("inf"),
            peak_memory=mx.get_peak_memory() / 1e9,
            changed=state.changed,
            last_changed=state.last_changed,
            editable=state.editable,
            seed=seed,
            solver=solver,
            finished=state.step == state.steps,
            temp=temp,
            tokenizer=tokenizer,
            mask_id=model.args.mask_token_id,
        )


def _encode(tokenizer, text) -> list[int]:
    if text is None:
        return []
    if isinstance(text, str):
        return list(tokenizer.encode(text)) if text else []
    return _as_token_list(text, "prompt/suffix")


def generate(
    model,
    tokenizer,
    prompt: str | Sequence[int] | None = None,
    suffix: str | Sequence[int] | None = None,
    *,
    verbose: bool = False,
    **kwargs,
) -> str | list[str]:
    """Generate passages and return the text (a string when ``batch_size`` is 1, else a list).

    Args:
        model: the FS-DFM model.
        tokenizer: an mlx-lm ``TokenizerWrapper``.
        prompt: text frozen at the start of every passage.
        suffix: text frozen at the end of every passage.
        verbose: print the text(s) and a summary line.
        **kwargs: the keyword arguments of :func:`stream_generate` / :func:`generate_step`.
    """
    response, per_step = None, []
    for response in stream_generate(model, tokenizer, prompt, suffix, **kwargs):
        per_step.append((response.model_ms, response.sampler_ms, response.step_ms))
    texts = response.text
    if verbose:
        for i, text in enumerate(texts):
            if len(texts) > 1:
                print(f"=== sample {i} ===")
            print(text)
        print("=" * 10)
        print(format_summary(response, per_step))
    return texts[0] if len(texts) == 1 else texts


def summary(response: GenerationResponse, steps_ms: Sequence[tuple] | None = None) -> dict:
    """Machine-readable figures of a finished run (``steps_ms``: per-step (model, sampler, step))."""
    out = {
        "batch_size": int(response.tokens.shape[0]),
        "length": int(response.tokens.shape[1]),
        "steps": response.steps,
        "solver": response.solver,
        "temp": response.temp,
        "seed": response.seed,
        "elapsed_s": response.elapsed_s,
        "tokens_per_sec": response.tokens_per_sec,
        "peak_memory_gb": response.peak_memory,
    }
    if steps_ms:
        arr = np.array([[np.nan if v is None else v for v in row] for row in steps_ms], float)
        out["model_ms_per_step"] = None if np.isnan(arr[:, 0]).any() else float(arr[:, 0].mean())
        out["sampler_ms_per_step"] = None if np.isnan(arr[:, 1]).any() else float(arr[:, 1].mean())
        out["step_ms"] = float(arr[:, 2].mean())
    return out


def temperature_note(temp: float) -> str:
    """``" at temperature T"`` for the summary lines, empty at 1 (no temperature)."""
    return "" if temp == 1.0 else f" at temperature {temp:g}"


def format_summary(response: GenerationResponse, steps_ms: Sequence[tuple] | None = None) -> str:
    """One line: tokens, steps, tokens/s, per-step ms (model / sampler), peak memory."""
    s = summary(response, steps_ms)
    line = (
        f"{s['batch_size']} x {s['length']} tokens, {s['steps']} steps{temperature_note(s['temp'])} "
        f"({s['solver']}), {s['tokens_per_sec']:.1f} tokens/s"
    )
    if s.get("model_ms_per_step") is not None:
        line += (
            f", per step {s['model_ms_per_step']:.2f} ms model + "
            f"{s['sampler_ms_per_step']:.2f} ms sampler"
        )
    elif "step_ms" in s:
        line += f", {s['step_ms']:.2f} ms per step"
    peak = s["peak_memory_gb"]
    return line + (
        f", peak memory {peak:.2f} GB" if peak >= 1 else f", peak memory {peak * 1e3:.1f} MB"
    )


def save_tokens(path: str | os.PathLike, tokens, *, force: bool = False) -> Path:
    """Save [B, L] token ids as int32 ``.npy`` atomically (temp file + ``os.replace``).

    Raises:
        FileExistsError: ``path`` exists and ``force`` is False.
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass force to overwrite")
    arr = np.array(tokens).astype(np.int32)
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", suffix=".npy.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
