"""Few-step samplers for FS-DFM / DFM: the time grid and one fused, compiled update per solver.

Paper notation: ``x_t`` the current tokens, ``p_1t = p_{1|t}(. | x_t)`` the model's posterior
(softmax of the logits), ``k_t = kappa(t)`` the scheduler (polynomial, ``k_t = t ** exponent``;
the published models use exponent 1, so ``k_t = t``), ``h`` the step size and ``z`` the current token
of a position. Shape letters: B batch, L length, V rows of the logits (vocabulary, +1 with a mask
source).

Every update works from the logits alone: ``logsumexp`` over V, the current token's logit
(a gather), and ONE Gumbel-max draw over the logits with ``z`` excluded for the destination. No
[B, L, V] one-hot is built and nothing leaves the device: the step is a pure function of
``(logits, x_t, editable, t, h, key)`` compiled with ``mx.compile``; random keys are passed in.
``mixture_euler_with_cumulative_scalar`` and ``dfm_euler`` (with a temperature, but without top-k /
top-p) instead run the whole step in one fused pass per position (:mod:`fsdfm_mlx.kernels`: a CUDA/Metal kernel on a GPU, NumPy on
a CPU device; inverse-CDF draws): same distribution, a different random stream.

Draws are in float32 (the official code draws categoricals with ``torch.multinomial`` in float64).
The two agree in distribution up to events of probability ~1e-7 per draw (the float32 Gumbel noise
of the portable path is bounded above by ~16.6; the fused path's uniforms have 24 bits).

Extensions (all off by default) act on the logits *before* ``p_1t`` is formed, at every step and
for every quantity derived from ``p_1t`` (the jump probability as well as the destination):
``logits / temperature`` (``temperature == 0`` keeps only the argmax), then top-k (keep the ``k``
largest logits; ties at the k-th value are kept), then top-p (keep the smallest set of most likely
tokens whose probability reaches ``top_p``). Removed tokens get probability 0 and, for
``mixture_euler``, no 1e-9 rate floor either. At the final step of an FS-DFM solver with a mask
source the mask column is removed before the filters, so a filter can never leave only the mask.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from . import kernels

CUMULATIVE = "mixture_euler_with_cumulative_scalar"
MIXTURE_EULER = "mixture_euler"
DFM_EULER = "dfm_euler"

#: Solvers that feed ``dt = h`` to the model and so need a step-size conditioned student.
STUDENT_SOLVERS = (CUMULATIVE, MIXTURE_EULER)
#: Solvers for models without step-size conditioning (DFM teachers).
TEACHER_SOLVERS = (DFM_EULER,)
SOLVERS = STUDENT_SOLVERS + TEACHER_SOLVERS

# Constants of the official solvers (apple/ml-fs-dfm, flow_matching/solver/*).
_RATE_FLOOR = 1e-9  # mixture_euler: every rate, the diagonal included, is floored here
_LAMBDA_MIN = 1e-8  # mixture_euler: total rate floor
_MAX_MEAN_JUMPS = 50.0  # mixture_euler: the Poisson mean is clamped here
_H_MIN = 1e-8  # mixture_euler: step size floor in u = p / h
_KAPPA_EPS = 1e-8  # cumulative scalar: clamp of 1 - k and the 1e-8 added to h
_INTENSITY_MIN = 1e-12  # cumulative scalar: total intensity floor


@dataclass(frozen=True)
class SamplerOptions:
    """Optional changes to the posterior, applied to the logits before ``p_1t`` is formed.

    Attributes:
        temperature: divide the logits by this (``1.0`` = off; ``0.0`` = keep only the argmax).
        top_k: keep the ``top_k`` largest logits per position (``None`` = off).
        top_p: keep the smallest set of most likely tokens with total probability >= ``top_p``
            (``1.0`` = off).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def filters(self) -> bool:
        """True when some tokens can be removed (probability exactly 0)."""
        return self.temperature == 0 or self.top_k is not None or self.top_p < 1.0

    @property
    def active(self) -> bool:
        return self.temperature != 1.0 or self.filters


# ----------------------------------------------------------------------------------------------
# Time grid and start state
# ----------------------------------------------------------------------------------------------


def uniform_time_grid(steps: int) -> np.ndarray:
    """The official grid for ``steps`` steps: ``t_i = i / steps`` for i < steps, then ``t_n = 1``.

    Args:
        steps: number of model evaluations n (>= 1).

    Returns:
        [n + 1] float32 times (computed in float64 as ``i * (1 / n)``, then rounded, as the
        official code does).
    """
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    step_size = 1.0 / steps
    return np.array([step_size * i for i in range(steps)] + [1.0], dtype=np.float32)


def validate_time_grid(grid) -> np.ndarray:
    """Check an explicit time grid: >= 2 strictly increasing times within [0, 1].

    Args:
        grid: a sequence of times ``t_0 < t_1 < ... < t_n``.

    Returns:
        [n + 1] float32 times.
    """
    g = np.asarray(grid, dtype=np.float32)
    if g.ndim != 1 or g.size < 2:
        raise ValueError("time_grid must be a 1-D sequence of at least 2 times")
    if not np.all(np.isfinite(g)) or g[0] < 0.0 or g[-1] > 1.0:
        raise ValueError(f"time_grid must lie within [0, 1], got [{g[0]}, {g[-1]}]")
    if np.any(np.diff(g) <= 0):
        raise ValueError("time_grid must be strictly increasing")
    return g


def initial_tokens(
    batch_size: int, length: int, vocab_size: int, mask_id: int | None, key: mx.array
) -> mx.array:
    """The source sample ``x_0``: uniform over [0, vocab_size), or every token = ``mask_id``.

    Returns:
        [B, L] int32 tokens.
    """
    if mask_id is not None:
        return mx.full((batch_size, length), mask_id, dtype=mx.int32)
    return mx.random.randint(0, vocab_size, (batch_size, length), dtype=mx.int32, key=key)


# ----------------------------------------------------------------------------------------------
# Pieces shared by the fused step and the rate-matrix view
# ----------------------------------------------------------------------------------------------


def _kappa(t: mx.array, exponent: float) -> mx.array:
    return t if exponent == 1.0 else mx.power(t, exponent)


def _kappa_dot(t: mx.array, exponent: float) -> mx.array:
    return mx.ones_like(t) if exponent == 1.0 else exponent * mx.power(t, exponent - 1.0)


def filter_logits(logits: mx.array, options: SamplerOptions) -> mx.array:
    """Temperature, then top-k, then top-p on [..., V] float32 logits (removed -> -inf)."""
    neg_inf = mx.array(-mx.inf, dtype=logits.dtype)
    if options.temperature == 0:
        # keep only the argmax (several on exact ties)
        logits = mx.where(logits == logits.max(axis=-1, keepdims=True), 0.0, neg_inf)
    elif options.temperature != 1.0:
        logits = logits / options.temperature
    V = logits.shape[-1]
    if options.top_k is not None and options.top_k < V:
        kth = mx.topk(logits, options.top_k, axis=-1).min(axis=-1, keepdims=True)
        logits = mx.where(logits < kth, neg_inf, logits)
    if options.top_p < 1.0:
        desc = -mx.sort(-logits, axis=-1)  # [..., V] sorted, largest first
        p_sorted = mx.softmax(desc, axis=-1)
        mass_before = mx.cumsum(p_sorted, axis=-1) - p_sorted
        n_keep = (mass_before < options.top_p).sum(axis=-1, keepdims=True)  # >= 1
        cutoff = mx.take_along_axis(desc, n_keep - 1, axis=-1)
        logits = mx.where(logits < cutoff, neg_inf, logits)
    return logits


def _jump_probability(
    solver: str,
    logits: mx.array,
    lse: mx.array,
    log_p_z: mx.array,
    t: mx.array,
    h: mx.array,
    exponent: float,
    filtered: bool,
) -> mx.array:
    """P(position jumps this step) for a non-final step: [B, L] float32.

    ``logits`` [B, L, V] and ``lse`` [B, L, 1] are only read by ``mixture_euler`` (rate floor).
    """
    one_minus_p_z = -mx.expm1(log_p_z)  # 1 - p_1t(z), accurate when p_1t(z) ~ 1
    if solver == CUMULATIVE:
        # alpha = (ln(1 - k_t) - ln(1 - k_{t+h})) / (h + 1e-8); each 1 - k clamped to [1e-8, 1]
        k_t, k_th = _kappa(t, exponent), _kappa(t + h, exponent)
        log_stay_t = mx.log(mx.clip(1.0 - k_t, _KAPPA_EPS, 1.0))
        log_stay_th = mx.log(mx.clip(1.0 - k_th, _KAPPA_EPS, 1.0))
        alpha = (log_stay_t - log_stay_th) / (h + _KAPPA_EPS)
        # u(x) = alpha p_1t(x) for x != z, so lambda = alpha (1 - p_1t(z)); P = 1 - exp(-h lambda)
        intensity = mx.maximum(alpha * one_minus_p_z, _INTENSITY_MIN)
        return -mx.expm1(-h * intensity)
    if solver == MIXTURE_EULER:
        # u(x) = max(p_1t(x) / h, 1e-9) for x != z, u(z) = 1e-9; lambda = sum_x u(x) (>= 1e-8)
        h_c = mx.maximum(h, _H_MIN)
        gap = mx.maximum(_RATE_FLOOR - mx.exp(logits - lse) / h_c, 0.0)  # what the floor adds
        if filtered:
            gap = mx.where(logits == -mx.inf, 0.0, gap)  # removed tokens get no floor
        gap = gap.sum(axis=-1) - mx.maximum(_RATE_FLOOR - mx.exp(log_p_z) / h_c, 0.0)
        lam = mx.maximum(one_minus_p_z / h_c + gap + _RATE_FLOOR, _LAMBDA_MIN)
        # k ~ Poisson(min(lambda h, 50)); jump iff k > 0: P = 1 - exp(-min(lambda h, 50))
        return -mx.expm1(-mx.minimum(lam * h, _MAX_MEAN_JUMPS))
    if solver == DFM_EULER:
        # x_1 ~ p_1t; if x_1 != z jump with P = 1 - exp(-h kdot_t / (1 - k_t)): overall
        # P = (1 - p_1t(z)) (1 - exp(-h kdot_t / (1 - k_t))), destination p_1t without z
        rate = _kappa_dot(t, exponent) / (1.0 - _kappa(t, exponent))
        return one_minus_p_z * -mx.expm1(-h * rate)
    raise ValueError(f"unknown solver {solver!r}; choose one of: {', '.join(SOLVERS)}")


def _destination_scores(
    solver: str, logits: mx.array, lse: mx.array, is_z: mx.array, h: mx.array, filtered: bool
) -> mx.array:
    """Unnormalised log-weights of the destination of a jump: [B, L, V] (lazy, fused by compile)."""
    if solver == MIXTURE_EULER:
        log_floor = math.log(_RATE_FLOOR)
        # log u(x) = max(log p_1t(x) - log h, log 1e-9); the diagonal keeps its floor 1e-9
        scores = mx.maximum(logits - lse - mx.log(mx.maximum(h, _H_MIN)), log_floor)
        scores = mx.where(is_z, log_floor, scores)
        if filtered:
            scores = mx.where(logits == -mx.inf, -mx.inf, scores)
        return scores
    # p_1t restricted to x != z (renormalisation is implicit in the argmax)
    return mx.where(is_z, -mx.inf, logits)


# ----------------------------------------------------------------------------------------------
# The fused step
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StepConfig:
    solver: str
    final: bool
    mask_id: int | None
    options: SamplerOptions
    exponent: float


def _step(
    cfg: _StepConfig,
    logits: mx.array,
    x_t: mx.array,
    editable: mx.array,
    t: mx.array,
    h: mx.array,
    key: mx.array,
) -> mx.array:
    logits = logits.astype(mx.float32)
    V = logits.shape[-1]
    vocab_ids = mx.arange(V, dtype=x_t.dtype)
    x_t_ = x_t[..., None]  # [B, L, 1]
    fsdfm = cfg.solver in STUDENT_SOLVERS
    masked = cfg.mask_id is not None

    if cfg.final:
        if fsdfm and masked:
            # zero the mask column of p_1t and renormalise
            logits = mx.where(vocab_ids == cfg.mask_id, -mx.inf, logits)
        if cfg.options.active:
            logits = filter_logits(logits, cfg.options)
        # x_1 ~ p_1t (Gumbel-max)
        x_1 = mx.argmax(logits + mx.random.gumbel(logits.shape, key=key), axis=-1).astype(x_t.dtype)
        write = editable
        if fsdfm and masked:
            write = write & (x_t == cfg.mask_id)  # only positions still holding the mask
        return mx.where(write, x_1, x_t)

    if cfg.options.active:
        logits = filter_logits(logits, cfg.options)
    filtered = cfg.options.filters
    k_dest, k_jump = mx.random.split(key)
    lse = mx.logsumexp(logits, axis=-1, keepdims=True)  # [B, L, 1]
    log_p_z = (mx.take_along_axis(logits, x_t_, axis=-1) - lse)[..., 0]  # [B, L]
    jump_prob = _jump_probability(cfg.solver, logits, lse, log_p_z, t, h, cfg.exponent, filtered)
    # one Gumbel-max draw of the destination, z excluded: [B, L]
    scores = _destination_scores(cfg.solver, logits, lse, vocab_ids == x_t_, h, filtered)
    dest = mx.argmax(scores + mx.random.gumbel(scores.shape, key=k_dest), axis=-1)
    jump = (mx.random.uniform(shape=x_t.shape, key=k_jump) < jump_prob) & editable
    # a position whose p_1t(z) is exactly 1 has nowhere else to go
    jump = jump & (log_p_z < 0)
    if cfg.solver == MIXTURE_EULER and masked:
        jump = jump & (x_t == cfg.mask_id)  # mask source: only masked positions may jump
    return mx.where(jump, dest.astype(x_t.dtype), x_t)


@functools.lru_cache(maxsize=64)
def _compiled_step(cfg: _StepConfig):
    return mx.compile(functools.partial(_step, cfg))


#: Solvers whose destination is ``p_1t`` without ``z``: the fused row sampler covers them.
_KERNEL_SOLVERS = (CUMULATIVE, DFM_EULER)


def _kernel_applies(cfg: _StepConfig) -> bool:
    # temperature is applied inside the fused step; top-k / top-p / argmax are not
    return cfg.solver in _KERNEL_SOLVERS and not cfg.options.filters and kernels.available()


def _kernel_step(cfg: _StepConfig, logits, x_t, editable, t, h, key) -> mx.array:
    """The whole step in one fused pass per position (see :mod:`fsdfm_mlx.kernels`)."""
    temp = float(cfg.options.temperature)
    if cfg.final:
        # x_1 ~ p_1t; an FS-DFM solver with a mask source never draws the mask column and only
        # writes positions still holding the mask
        mask = cfg.mask_id if cfg.solver in STUDENT_SOLVERS else None
        out = kernels.fused_step(
            logits, x_t, editable, key, mode="final", ban=mask, mask_id=mask, temperature=temp
        )
    else:
        mode = "cumulative" if cfg.solver == CUMULATIVE else "dfm_euler"
        out = kernels.fused_step(
            logits, x_t, editable, key, mode=mode, t=t, h=h, exponent=cfg.exponent, temperature=temp
        )
    return out if out.dtype == x_t.dtype else out.astype(x_t.dtype)


def sample_step(
    logits: mx.array,
    x_t: mx.array,
    t: float | mx.array,
    h: float | mx.array,
    key: mx.array,
    *,
    solver: str,
    final: bool = False,
    mask_id: int | None = None,
    editable: mx.array | None = None,
    options: SamplerOptions | None = None,
    exponent: float = 1.0,
    compile: bool = True,
    fused: bool = True,
) -> mx.array:
    """One solver update ``x_t -> x_{t+h}`` from the model's logits (fused and compiled).

    Args:
        logits: [B, L, V] logits of ``p_1t`` at ``(x_t, t)`` (students: also ``dt = h``).
        x_t: [B, L] int current tokens.
        t: current time ``t_i``.
        h: step size ``h_i = t_{i+1} - t_i``.
        key: a PRNG key (``mx.random.key``); the step is a pure function of it.
        solver: one of ``SOLVERS``.
        final: True for the last step (``t_{i+1} = t_n``): collapse to ``x_1 ~ p_1t``.
        mask_id: the mask token id for a mask source, else None.
        editable: [B, L] bool, False where a position is frozen (prompt / suffix); frozen
            positions never change, including at the final step. None = all editable.
        options: temperature / top-k / top-p (see the module docstring).
        exponent: the polynomial scheduler's exponent (``k_t = t ** exponent``).
        compile: use the ``mx.compile``d step (False runs the same graph eagerly).
        fused: do the V-wide work in one fused pass per position (GPU kernel, or NumPy on a CPU
            device; see :mod:`fsdfm_mlx.kernels`) when the solver allows it
            (``mixture_euler_with_cumulative_scalar`` and ``dfm_euler``, with any temperature > 0
            but without top-k / top-p). Same distribution, different random stream from the
            portable path.

    Returns:
        [B, L] tokens ``x_{t+h}`` (same dtype as ``x_t``), lazy.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of: {', '.join(SOLVERS)}")
    cfg = _StepConfig(solver, bool(final), mask_id, options or SamplerOptions(), float(exponent))
    if editable is None:
        editable = mx.ones(x_t.shape, dtype=mx.bool_)
    t = mx.array(t, dtype=mx.float32)
    h = mx.array(h, dtype=mx.float32)
    if fused and _kernel_applies(cfg):
        return _kernel_step(cfg, logits, x_t, editable, t, h, key)
    fn = _compiled_step(cfg) if compile else functools.partial(_step, cfg)
    return fn(logits, x_t, editable, t, h, key)


def mixture_euler_with_cumulative_scalar(
    logits: mx.array, x_t: mx.array, t, h, key: mx.array, **kwargs
) -> mx.array:
    """FS-DFM's default update, for step-size conditioned students (the model saw ``dt = h``).

    Rule (non-final step), per position with current token ``z``:
    ``alpha = (ln(1 - k_t) - ln(1 - k_{t+h})) / (h + 1e-8)`` with each ``1 - k`` clamped to
    ``[1e-8, 1]``; the rates are ``u(x) = alpha p_1t(x)`` for ``x != z``; jump with probability
    ``1 - exp(-h max(alpha (1 - p_1t(z)), 1e-12))`` to ``x ~ p_1t`` restricted to ``x != z``.
    Every position may jump, mask source included. Final step: ``x_1 ~ p_1t`` (mask source: mask
    column zeroed, written only where the token is still the mask; uniform: written everywhere).

    Keyword arguments are those of :func:`sample_step`.
    """
    return sample_step(logits, x_t, t, h, key, solver=CUMULATIVE, **kwargs)


def mixture_euler(logits: mx.array, x_t: mx.array, t, h, key: mx.array, **kwargs) -> mx.array:
    """FS-DFM's Poisson update, for step-size conditioned students (the model saw ``dt = h``).

    Rule (non-final step), per position with current token ``z``: rates
    ``u(x) = max(p_1t(x) / max(h, 1e-8), 1e-9)`` for ``x != z`` and ``u(z) = 1e-9`` (the floor
    applies to the diagonal too); ``lambda = max(sum_x u(x), 1e-8)``; jump iff
    ``k ~ Poisson(min(lambda h, 50)) > 0``, i.e. with probability ``1 - exp(-min(lambda h, 50))``,
    to ``x ~ u / lambda``. With a mask source only positions still holding the mask may jump.
    Final step as :func:`mixture_euler_with_cumulative_scalar`.

    Keyword arguments are those of :func:`sample_step`.
    """
    return sample_step(logits, x_t, t, h, key, solver=MIXTURE_EULER, **kwargs)


def dfm_euler(logits: mx.array, x_t: mx.array, t, h, key: mx.array, **kwargs) -> mx.array:
    """Classic DFM Euler update (the 1,024-step teacher baseline; the model gets no ``dt``).

    Rule (non-final step): draw ``x_1 ~ p_1t``; if ``x_1 != z`` jump to ``x_1`` with probability
    ``1 - exp(-h kdot_t / (1 - k_t))`` (``= 1 - exp(-h / (1 - t))`` for ``k_t = t``). Sampled here
    in the equivalent fused form: jump with probability
    ``(1 - p_1t(z)) (1 - exp(-h kdot_t / (1 - k_t)))`` to ``x ~ p_1t`` restricted to ``x != z``.
    Final step: every position takes ``x_1 ~ p_1t`` (the mask column, if any, is kept).

    Keyword arguments are those of :func:`sample_step`.
    """
    return sample_step(logits, x_t, t, h, key, solver=DFM_EULER, **kwargs)


# ----------------------------------------------------------------------------------------------
# Rate-matrix view (for tests and analysis; materialises [B, L, V])
# ----------------------------------------------------------------------------------------------


class JumpDistribution(NamedTuple):
    """What one non-final step does at each position.

    Attributes:
        jump_prob: [B, L] probability that the position jumps this step.
        dest: [B, L, V] distribution of the destination given a jump (rows sum to 1; for
            ``mixture_euler`` it keeps the diagonal's 1e-9 rate floor, a jump to ``z`` itself).
    """

    jump_prob: mx.array
    dest: mx.array


def jump_distribution(
    probs: mx.array,
    x_t: mx.array,
    t: float | mx.array,
    h: float | mx.array,
    solver: str,
    *,
    mask_id: int | None = None,
    options: SamplerOptions | None = None,
    exponent: float = 1.0,
) -> JumpDistribution:
    """The jump probability and destination distribution of a non-final step, per position.

    Uses the same formulas as the fused step. For the FS-DFM solvers, the official rate matrix is
    ``u = lambda * dest`` off the diagonal with ``lambda = -log(1 - jump_prob) / h``.

    Args:
        probs: [B, L, V] posterior ``p_1t``.
        x_t: [B, L] current tokens.
        t: current time.
        h: step size.
        solver: one of ``SOLVERS``.
        mask_id: mask token id for a mask source, else None.
        options: temperature / top-k / top-p applied to ``log(probs)``.
        exponent: the scheduler's exponent.

    Returns:
        A :class:`JumpDistribution` (float32).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of: {', '.join(SOLVERS)}")
    options = options or SamplerOptions()
    logits = mx.log(probs.astype(mx.float32))
    if options.active:
        logits = filter_logits(logits, options)
    t = mx.array(t, dtype=mx.float32)
    h = mx.array(h, dtype=mx.float32)
    x_t_ = x_t[..., None]
    lse = mx.logsumexp(logits, axis=-1, keepdims=True)
    log_p_z = (mx.take_along_axis(logits, x_t_, axis=-1) - lse)[..., 0]
    jump_prob = _jump_probability(solver, logits, lse, log_p_z, t, h, exponent, options.filters)
    jump_prob = mx.where(log_p_z < 0, jump_prob, 0.0)
    if solver == MIXTURE_EULER and mask_id is not None:
        jump_prob = mx.where(x_t == mask_id, jump_prob, 0.0)
    is_z = mx.arange(logits.shape[-1], dtype=x_t.dtype) == x_t_
    scores = _destination_scores(solver, logits, lse, is_z, h, options.filters)
    return JumpDistribution(jump_prob, mx.softmax(scores, axis=-1))
