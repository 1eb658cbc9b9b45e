"""A fused kernel for the whole solver step: one pass over each row of logits, one launch per step.

Every FS-DFM / DFM update needs, per position, the normaliser of ``p_1t``, the probability of the
current token ``z`` and one categorical draw with ``z`` excluded; then a jump decision. Done with
MLX ops that is several passes over [B, L, V] plus V-wide random numbers and a handful of small
launches; here one threadgroup per position reads its row of logits once and writes the new token.

The draw is by inverse CDF: each thread keeps a running (max, sum of exp) over its columns, the
threadgroup combines them into the row's normaliser and per-thread masses, one uniform picks the
thread whose mass bracket holds ``u * total``, and one simdgroup walks that thread's columns again
(from cache) to find the column. One ``exp`` per logit, no per-column noise, so the step is bound by
reading the logits. Uniforms come from a counter-based hash of ``(key, row, stream)`` (lowbias32, a
cheap well-mixed 32-bit bijection; 24-bit uniforms), so a draw depends on the key and the position,
never on the launch shape.

Backends: CUDA (``mx.fast.cuda_kernel``) and Metal (``mx.fast.metal_kernel``) run the same source
template. On a CPU device the same step runs in NumPy (exp, cumulative sum, one inverse-CDF draw per
row), because MLX's CPU ``exp`` and random-number kernels are several times slower than NumPy's.
With ``FSDFM_MLX_SAMPLER=portable``, or if the kernel fails its first-use self-check, the solvers use
their portable MLX-ops path.
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import mlx.core as mx
import numpy as np

#: Threads per row (one threadgroup per position); a multiple of 32 up to 1024.
THREADS = 256
#: Step kinds (the kernel's MODE).
MODES = {"cumulative": 0, "dfm_euler": 1, "final": 2}

_HASH = """
// lowbias32 (Wellons / TheIronBorn constants): a cheap, well-mixed 32-bit bijection
HASH_INLINE unsigned fsdfm_mix32(unsigned x) {
    x ^= x >> 16; x *= 0x21f0aaadu;
    x ^= x >> 15; x *= 0x735a2d97u;
    return x ^ (x >> 15);
}
// a uniform in (0, 1) with 24 random bits, stream k of a row whose seed is s
HASH_INLINE float fsdfm_uniform(unsigned s, unsigned k) {
    unsigned r = fsdfm_mix32(s + k * 0x9E3779B9u);
    return (float)(r >> 8) * 5.9604644775390625e-08f + 2.98023223876953125e-08f;
}
// 1 - exp(-x) for x >= 0, accurate for small x (a short series below 1e-2)
HASH_INLINE float fsdfm_one_minus_exp_neg(float x) {
    return x < 1e-2f ? x * (1.0f - x * (0.5f - x * (0.16666667f - x * 0.041666668f)))
                     : 1.0f - PRECISE_EXP(-x);
}
"""

# Template parameters: T (logits dtype), V (row width), MODE (0 cumulative scalar, 1 dfm_euler,
# 2 final), BAN (a column never drawn; V = none), MASK (final step: only positions holding this
# token are written; V = all), EXP1 (the scheduler exponent is 1). Template values must be
# non-negative: they become part of the kernel's name.
# Inputs: logits [R, V], z [R] int32, editable [R] bool, seed [2] uint32, t [1], h [1], expo [1],
# inv_temp [1] (the logits are multiplied by it: 1 / temperature).
# Output: out [R] int32, the position's token after the step.
_BODY = """
    const unsigned row = ROW_ID;
    const unsigned tid = THREAD_ID;
    const unsigned lane = tid & 31u, warp = tid >> 5;
    const u64 base = (u64)row * (u64)V;
    const int zr = z[row];
    const unsigned s = fsdfm_mix32(fsdfm_mix32(row ^ fsdfm_mix32(seed[0])) + seed[1]);
    SHARED float sm_m[NTHREADS / 32], sm_a[NTHREADS / 32], sm_w[NTHREADS];

    // 1. running max and sums of exp over this thread's columns: all (acc) and drawable (accd)
    // NEG (a huge finite negative) stands for -inf: no infinities, so fast math stays exact
    float m = NEG, acc = 0.0f, accd = 0.0f;
    for (unsigned j = tid; j < (unsigned)V; j += NTHREADS) {
        const float l = (float)logits[base + j] * inv_temp[0];
        if (l <= NEG) continue;  // a removed column (-inf)
        const bool d = !((MODE != 2 && (int)j == zr) || (int)j == BAN);
        if (l > m) {
            const float c = FEXP(m - l);
            acc = acc * c + 1.0f; accd = accd * c + (d ? 1.0f : 0.0f); m = l;
        } else {
            const float e = FEXP(l - m);
            acc += e; if (d) accd += e;
        }
    }

    // 2. the row max M, every thread's drawable mass w (relative to M) and the total A
    float M = m;
    for (int off = 16; off > 0; off >>= 1) M = fmax(M, SHFL_XOR(M, off));
    if (lane == 0) sm_m[warp] = M;
    BARRIER;
    M = NEG;
    for (unsigned i = 0; i < NTHREADS / 32; ++i) M = fmax(M, sm_m[i]);
    const float sc = m > NEG ? FEXP(m - M) : 0.0f;
    float a = acc * sc;
    sm_w[tid] = accd * sc;
    for (int off = 16; off > 0; off >>= 1) a += SHFL_XOR(a, off);
    if (lane == 0) sm_a[warp] = a;
    BARRIER;

    // 3. one simdgroup draws: the thread bracket holding u * W, then the column inside it
    if (warp == 0) {
        float A = 0.0f;
        for (unsigned i = 0; i < NTHREADS / 32; ++i) A += sm_a[i];
        const unsigned per = NTHREADS / 32;  // thread masses per lane
        float loc = 0.0f;
        for (unsigned i = 0; i < per; ++i) loc += sm_w[lane * per + i];
        float inc = loc;  // inclusive scan over lanes
        for (int off = 1; off < 32; off <<= 1) {
            const float o = SHFL_UP(inc, off);
            if ((int)lane >= off) inc += o;
        }
        const float W = SHFL_IDX(inc, 31);
        const float target = fsdfm_uniform(s, 0u) * W;
        // first lane whose inclusive mass passes the target (the last lane with mass if rounding
        // leaves none)
        int pick = (inc > target && loc > 0.0f) ? (int)lane : 32;
        int last = loc > 0.0f ? (int)lane : -1;
        for (int off = 16; off > 0; off >>= 1) {
            pick = min(pick, SHFL_XOR(pick, off));
            last = max(last, SHFL_XOR(last, off));
        }
        if (pick == 32) pick = last;
        int dest = -1;
        if (pick >= 0) {
            // lane `pick` walks its threads' masses; everyone gets the thread k and the residual r
            float r = target - (SHFL_IDX(inc, pick) - SHFL_IDX(loc, pick));
            int k = -1;
            if ((int)lane == pick) {
                float rr = r;
                for (unsigned i = 0; i < per; ++i) {
                    const float w = sm_w[lane * per + i];
                    if (w <= 0.0f) continue;
                    k = (int)(lane * per + i);
                    r = rr;
                    if (rr < w) break;
                    rr -= w;
                }
            }
            k = SHFL_IDX(k, pick);
            r = SHFL_IDX(r, pick);
            // the simdgroup walks thread k's columns (k, k + NTHREADS, ...) 32 at a time
            int seen = -1;
            for (unsigned i0 = 0; (u64)k + (u64)i0 * NTHREADS < (u64)V; i0 += 32) {
                const unsigned j = (unsigned)k + (i0 + lane) * NTHREADS;
                float e = 0.0f;
                if (j < (unsigned)V) {
                    const float l = (float)logits[base + j] * inv_temp[0];
                    const bool d = !((MODE != 2 && (int)j == zr) || (int)j == BAN);
                    if (l > NEG && d) e = FEXP(l - M);
                }
                float ps = e;
                for (int off = 1; off < 32; off <<= 1) {
                    const float o = SHFL_UP(ps, off);
                    if ((int)lane >= off) ps += o;
                }
                int hit = (ps > r && e > 0.0f) ? (int)lane : 32;
                int got = e > 0.0f ? (int)j : -1;
                for (int off = 16; off > 0; off >>= 1) {
                    hit = min(hit, SHFL_XOR(hit, off));
                    got = max(got, SHFL_XOR(got, off));
                }
                if (got >= 0) seen = got;
                if (hit < 32) { dest = (int)k + (int)((i0 + (unsigned)hit) * NTHREADS); break; }
                r -= SHFL_IDX(ps, 31);
            }
            if (dest < 0) dest = seen;  // rounding ran past the last drawable column
        }

        // 4. the jump decision and the new token
        if (lane == 0) {
            int o = zr;
            const bool ed = editable[row];
            if (MODE == 2) {
                if (ed && (MASK == V || zr == MASK) && dest >= 0) o = dest;
            } else if (ed && dest >= 0 && W > 0.0f) {
                const float one_minus_p_z = fmin(W / A, 1.0f);  // 1 - p_1t(z)
                const float tt = t[0], hh = h[0], ex = expo[0];
                const float k_t = EXP1 ? tt : PRECISE_POW(tt, ex);
                float P;
                if (MODE == 0) {
                    // alpha = (ln(1 - k_t) - ln(1 - k_{t+h})) / (h + 1e-8), each 1 - k in [1e-8, 1]
                    const float k_th = EXP1 ? tt + hh : PRECISE_POW(tt + hh, ex);
                    const float alpha = (PRECISE_LOG(fmin(fmax(1.0f - k_t, 1e-8f), 1.0f))
                                         - PRECISE_LOG(fmin(fmax(1.0f - k_th, 1e-8f), 1.0f)))
                                        / (hh + 1e-8f);
                    // P = 1 - exp(-h max(alpha (1 - p_z), 1e-12))
                    P = fsdfm_one_minus_exp_neg(hh * fmax(alpha * one_minus_p_z, 1e-12f));
                } else {
                    // P = (1 - p_z) (1 - exp(-h kdot_t / (1 - k_t)))
                    const float kdot = EXP1 ? 1.0f : ex * PRECISE_POW(tt, ex - 1.0f);
                    P = one_minus_p_z * fsdfm_one_minus_exp_neg(hh * kdot / (1.0f - k_t));
                }
                if (fsdfm_uniform(s, 1u) < P) o = dest;
            }
            out[row] = o;
        }
    }
"""


def _source(backend: str) -> tuple[str, str]:
    consts = f"#define NTHREADS {THREADS}u\n#define NEG (-3.0e38f)\n"
    if backend == "cuda":
        header = (
            consts
            + "#define FEXP __expf\n#define PRECISE_EXP expf\n#define PRECISE_LOG logf\n"
            + "#define PRECISE_POW powf\ntypedef unsigned long long u64;\n"
            + _HASH.replace("HASH_INLINE", "__device__ inline")
        )
        body = (
            _BODY.replace("ROW_ID", "blockIdx.x")
            .replace("THREAD_ID", "threadIdx.x")
            .replace("SHFL_XOR(", "__shfl_xor_sync(0xffffffffu, ")
            .replace("SHFL_UP(", "__shfl_up_sync(0xffffffffu, ")
            .replace("SHFL_IDX(", "__shfl_sync(0xffffffffu, ")
            .replace("SHARED", "__shared__")
            .replace("BARRIER", "__syncthreads()")
        )
        return header, body
    header = (
        consts
        + "#define FEXP metal::fast::exp\n#define PRECISE_EXP metal::precise::exp\n"
        + "#define PRECISE_LOG metal::precise::log\n#define PRECISE_POW metal::precise::pow\n"
        + "typedef ulong u64;\n"
        + _HASH.replace("HASH_INLINE", "inline")
    )
    body = (
        _BODY.replace("ROW_ID", "threadgroup_position_in_grid.x")
        .replace("THREAD_ID", "thread_position_in_threadgroup.x")
        .replace("SHFL_XOR(", "simd_shuffle_xor(")
        .replace("SHFL_UP(", "simd_shuffle_up(")
        .replace("SHFL_IDX(", "simd_shuffle(")
        .replace("SHARED", "threadgroup")
        .replace("BARRIER", "threadgroup_barrier(mem_flags::mem_threadgroup)")
    )
    return header, body


def backend() -> str | None:
    """Where the fused step runs: ``"cuda"``, ``"metal"``, ``"cpu"`` (NumPy), or None."""
    if os.environ.get("FSDFM_MLX_SAMPLER", "").lower() == "portable":
        return None
    if mx.default_device() != mx.gpu:
        return "cpu"
    if mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


_CPU_BLOCK = 512  # columns per block of the two-level inverse-CDF draw on the CPU


def _last_positive(a: np.ndarray) -> np.ndarray:
    """Per row of [R, N] ``a``, the index of the last entry > 0 (N - 1 for a row with none)."""
    return a.shape[1] - 1 - np.argmax((a > 0)[:, ::-1], axis=-1)


def _cpu_draw(e: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first column whose cumulative weight exceeds ``target`` times the row's total.

    Two levels (block sums, then one block's running sum) instead of a cumulative sum over the whole
    [R, V] array, which NumPy runs serially (~60% of the step before).

    Args:
        e: [R, V] non-negative float32 weights.
        target: [R] fractions in [0, 1).

    Returns:
        ([R] drawn columns, [R] row totals). A row whose total is 0 gets an arbitrary column.
    """
    R, V = e.shape
    S = _CPU_BLOCK
    nb, tail = divmod(V, S)
    sums = e[:, : nb * S].reshape(R, nb, S).sum(-1)  # [R, nb]
    if tail:
        sums = np.concatenate([sums, e[:, nb * S :].sum(-1, keepdims=True)], axis=-1)
    cum = np.cumsum(sums, axis=-1)  # [R, blocks]
    total = cum[:, -1]
    goal = target * total
    rows = np.arange(R)
    # the first block whose cumulative sum exceeds the goal; if rounding puts the goal past the
    # total, the last block that holds any weight
    b = np.minimum((cum <= goal[:, None]).sum(-1), _last_positive(sums))
    left = goal - np.where(b > 0, cum[rows, np.maximum(b - 1, 0)], 0)
    idx = b[:, None] * S + np.arange(S)[None]  # [R, S] the block's columns (the tail block: fewer)
    w = np.where(idx < V, e[rows[:, None], np.minimum(idx, V - 1)], np.float32(0))
    j = (np.cumsum(w, axis=-1) <= left[:, None]).sum(-1)
    return b * S + np.minimum(j, _last_positive(w)), total  # likewise within the block


def _cpu_step(logits, z, editable, key, mode, t, h, exponent, ban, mask_id, temperature):
    """The NumPy version: exp and one two-level inverse-CDF draw per row (float32)."""
    *lead, V = logits.shape
    e = np.array(logits.astype(mx.float32)).reshape(-1, V)  # a private copy, worked in place
    if temperature != 1.0:
        e *= np.float32(1.0 / temperature)
    zr = np.asarray(z).reshape(-1).astype(np.int64)
    ed = np.asarray(editable).reshape(-1).astype(bool)
    rows = np.arange(e.shape[0])
    e -= e.max(axis=-1, keepdims=True)
    np.exp(e, out=e)  # [R, V]
    total = e.sum(axis=-1)
    if mode != "final":
        e[rows, zr] = 0.0
    if ban is not None:
        e[:, ban] = 0.0
    rng = np.random.default_rng(np.asarray(key).astype(np.uint64))
    u = rng.random((2, e.shape[0]), dtype=np.float32)
    # the scale keeps the goal below the total
    dest, drawable = _cpu_draw(e, u[0] * np.float32(1.0 - 2.0**-23))
    if mode == "final":
        write = ed if mask_id is None else ed & (zr == mask_id)
    else:
        from .solvers import CUMULATIVE, DFM_EULER, _jump_probability  # (solvers imports us)

        # log p_1t(z) from the drawable mass: 1 - p_z = drawable / total, exact when p_z ~ 1
        with np.errstate(divide="ignore"):  # p_z = 0 -> log p_z = -inf, a sure jump rate
            log_p_z = np.log1p(-np.minimum(drawable.astype(np.float64) / total, 1.0))
        solver = CUMULATIVE if mode == "cumulative" else DFM_EULER
        f32 = functools.partial(mx.array, dtype=mx.float32)
        P = _jump_probability(solver, None, None, f32(log_p_z), f32(t), f32(h), exponent, False)
        P = np.asarray(P)
        write = ed & (drawable > 0) & (u[1] < P)
    out = np.where(write, dest, zr).astype(np.int32)
    return mx.array(out.reshape(lead))


@functools.lru_cache(maxsize=2)
def _kernel(which: str):
    header, body = _source(which)
    names = dict(
        name="fsdfm_step",
        input_names=["logits", "z", "editable", "seed", "t", "h", "expo", "inv_temp"],
        output_names=["out"],
        source=body,
        header=header,
    )
    if which == "cuda":
        return mx.fast.cuda_kernel(**names)
    return mx.fast.metal_kernel(**names)


@functools.lru_cache(maxsize=16)
def _scalar_array(value: float) -> mx.array:
    """A [1] float32 constant, made once per value (no per-step upload)."""
    return mx.array([value], dtype=mx.float32)


def fused_step(
    logits: mx.array,
    z: mx.array,
    editable: mx.array,
    key: mx.array,
    *,
    mode: str,
    t: float | mx.array = 0.0,
    h: float | mx.array = 0.0,
    exponent: float = 1.0,
    ban: int | None = None,
    mask_id: int | None = None,
    temperature: float = 1.0,
) -> mx.array:
    """One solver step for every position in one fused pass (GPU kernel, or NumPy on a CPU device).

    Args:
        logits: [..., V] logits of ``p_1t`` (float32, float16 or bfloat16).
        z: [...] int current tokens ``x_t``.
        editable: [...] bool, False where a position never changes.
        key: a PRNG key (``mx.random.key``), uint32 [2]; the step is a pure function of it.
        mode: ``"cumulative"`` (``mixture_euler_with_cumulative_scalar``), ``"dfm_euler"`` (a
            non-final step: jump with that solver's probability to ``x ~ p_1t`` without ``z``) or
            ``"final"`` (``x_1 ~ p_1t``).
        t: the current time (a float or a 0-d / [1] float32 array).
        h: the step size (likewise).
        exponent: the polynomial scheduler's exponent (``k_t = t ** exponent``).
        ban: a column never drawn (the mask column at a mask-source final step), or None.
        mask_id: final step only: write only positions that hold this token (None = all).
        temperature: ``p_1t`` is the softmax of ``logits / temperature`` (> 0), for the jump
            probability as well as the destination.

    Returns:
        [...] int32 tokens after the step (lazy).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    if not temperature > 0:
        raise ValueError(f"the fused step needs a temperature > 0, got {temperature!r}")
    which = backend()
    if which is None:
        raise RuntimeError("the fused sampler is switched off (FSDFM_MLX_SAMPLER=portable)")
    if which == "cpu":
        return _cpu_step(logits, z, editable, key, mode, t, h, exponent, ban, mask_id, temperature)
    *lead, V = logits.shape
    R = math.prod(lead)
    (out,) = _kernel(which)(
        inputs=[
            logits.reshape(R, V),
            z.reshape(R).astype(mx.int32),
            mx.broadcast_to(editable, z.shape).reshape(R),
            key.astype(mx.uint32),
            mx.array(t, dtype=mx.float32).reshape(1),
            mx.array(h, dtype=mx.float32).reshape(1),
            _scalar_array(float(exponent)),
            _scalar_array(1.0 / float(temperature)),
        ],
        template=[
            ("T", logits.dtype),
            ("V", V),
            ("MODE", MODES[mode]),
            ("BAN", V if ban is None else int(ban)),
            ("MASK", V if mask_id is None else int(mask_id)),
            ("EXP1", float(exponent) == 1.0),
        ],
        grid=(R * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(R,)],
        output_dtypes=[mx.int32],
    )
    return out.reshape(lead)


_CHECKED: dict[str, bool] = {}


def available() -> bool:
    """True when the fused step runs here and passed its first-use self-check.

    The self-check runs a cumulative-scalar step that must jump everywhere on rows whose current
    token has probability ~0, and must land on a dominant column; a final step on the same rows; and
    checks frozen positions stay. A kernel that fails (or does not compile) is reported once and the
    portable path is used.
    """
    which = backend()
    if which is None:
        return False
    if which not in _CHECKED:
        _CHECKED[which] = _self_check()
    return _CHECKED[which]


def _self_check() -> bool:
    try:
        R, V = 64, 1000
        logits = mx.random.normal((R, V), key=mx.random.key(1234)) * 3.0
        z = mx.random.randint(0, V, (R,), key=mx.random.key(1))
        winner = (z + 1) % V
        # one logit far above the rest: p(z) ~ 0, so a near-final step jumps, to that column
        logits = mx.where(mx.arange(V)[None] == winner[:, None], 60.0, logits)
        editable = mx.arange(R) != 5
        step = fused_step(logits, z, editable, mx.random.key(7), mode="cumulative", t=0.5, h=0.5)
        final = fused_step(logits, z, editable, mx.random.key(8), mode="final")
        mx.eval(step, final)
        want = mx.where(editable, winner, z)
        if not (mx.array_equal(step, want).item() and mx.array_equal(final, want).item()):
            raise RuntimeError("results differ from the reference")
        return True
    except Exception as e:  # noqa: BLE001 - any failure means: use the portable path
        warnings.warn(
            f"fsdfm-mlx: the fused sampler kernel is unusable here ({e}); "
            "using the portable MLX-ops sampler",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
