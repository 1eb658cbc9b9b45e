"""A fused GPU kernel for the sampler's V-wide work: one pass over each row of logits.

Every FS-DFM / DFM update needs, per position, ``logsumexp`` of the logits, the current token's
logit and one categorical draw (Gumbel-max) with the current token excluded. Done with MLX ops that
is several passes over [B, L, V] plus V-wide random numbers; here one threadgroup reads a row once
and produces all three (``lse``, ``logit_z``, ``dest``), so the step is bound by reading the logits.

The Gumbel noise comes from a counter-based hash of ``(key, row, column)`` (lowbias32, a cheap
well-mixed 32-bit bijection; 23-bit uniforms), so a draw depends only on the key and the position,
never on the launch shape. A column whose logit is more
than the largest possible noise (``GUMBEL_MAX``) below the best score so far cannot win and is
skipped without drawing, which leaves the result exact.

Backends: CUDA (``mx.fast.cuda_kernel``) and Metal (``mx.fast.metal_kernel``) run the same
algorithm. On a CPU device the same three results come from NumPy instead (exp, cumulative sum and
one uniform per row: an inverse-CDF draw), because MLX's CPU ``exp`` and random-number kernels are
several times slower than NumPy's vectorised ones. With ``FSDFM_MLX_SAMPLER=portable``, or if the
kernel fails its first-use self-check, the solvers use their portable MLX-ops path.
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import mlx.core as mx
import numpy as np

#: Threads per row (one threadgroup per position).
THREADS = 256
#: Uniforms have 23 random bits: u in [2^-24, 1 - 2^-24], so the noise is at most this.
GUMBEL_MAX = -math.log(-math.log1p(-(2.0**-24)))

_HASH = """
// lowbias32 (Wellons / TheIronBorn constants): a cheap, well-mixed 32-bit bijection
HASH_INLINE unsigned fsdfm_mix32(unsigned x) {
    x ^= x >> 16; x *= 0x21f0aaadu;
    x ^= x >> 15; x *= 0x735a2d97u;
    return x ^ (x >> 15);
}
// Standard Gumbel noise for column j of a row whose stream is row_seed; 23-bit uniforms in (0, 1).
HASH_INLINE float fsdfm_gumbel(unsigned row_seed, unsigned j) {
    unsigned r = fsdfm_mix32(row_seed + j * 0x9E3779B9u);
    float u = (float)(r >> 9) * 1.1920928955078125e-07f + 5.9604644775390625e-08f;
    // the inner log must be accurate near u = 1 (a fast log can return 0 there: infinite noise);
    // the floor keeps the noise within GMAX whatever the library does
    return -FLOG(FMAX(-PRECISE_LOG(u), 5.9604645e-08f));
}
"""

# Shared body. Template parameters: T (logits dtype), V (row width), EXCLUDE_Z (bool: the current
# token may not be drawn), BAN (a column that is never drawn; V = none; the mask column at a
# mask-source final step). Template values must be non-negative: they become part of the kernel's
# name. Inputs: logits [R, V], z [R] int32, seed [2] uint32.
# Outputs: dest [R] int32, lse [R] float32, logit_z [R] float32.
_BODY = """
    const unsigned row = ROW_ID;
    const unsigned tid = THREAD_ID;
    const u64 base = (u64)row * (u64)V;
    const int zr = z[row];
    // one stream per (key, row): columns j -> distinct hash inputs row_seed + j * golden
    const unsigned s = fsdfm_mix32(fsdfm_mix32(row ^ fsdfm_mix32(seed[0])) + seed[1]);
    // NEG (a huge finite negative) stands for -inf: no infinities, so fast math stays exact
    float m = NEG;     // running max of the logits
    float acc = 0.0f;  // running sum of exp(logit - m)
    float best = NEG;
    int best_i = -1;
    for (unsigned j = tid; j < (unsigned)V; j += NTHREADS) {
        const float l = (float)logits[base + j];
        if (l <= NEG) continue;  // a removed column (-inf)
        if (l > m) { acc = acc * FEXP(m - l) + 1.0f; m = l; } else { acc += FEXP(l - m); }
        if ((EXCLUDE_Z && (int)j == zr) || (int)j == BAN) continue;
        if (l + GMAX <= best) continue;  // even the largest noise cannot make it win
        const float v = l + fsdfm_gumbel(s, j);
        if (v > best || (v == best && (int)j < best_i)) { best = v; best_i = (int)j; }
    }
    REDUCE
    if (tid == 0) {
        dest[row] = best_i;
        lse[row] = m + FLOG(acc);
        logit_z[row] = (float)logits[base + (u64)zr];
    }
"""

# One shuffle-down step of the (m, acc) / (best, best_i) combine, over offsets 16, 8, 4, 2, 1.
_COMBINE = """
    for (OFF_T off = 16; off > 0; off >>= 1) {
        float m2 = SHFL(m, off);
        float a2 = SHFL(acc, off);
        float b2 = SHFL(best, off);
        int i2 = SHFL(best_i, off);
        float mm = fmax(m, m2);
        if (mm > NEG) { acc = acc * FEXP(m - mm) + a2 * FEXP(m2 - mm); m = mm; }
        if (b2 > best || (b2 == best && i2 >= 0 && (best_i < 0 || i2 < best_i))) {
            best = b2; best_i = i2;
        }
    }
"""

# Warp (simdgroup) reduction, then across the warps through shared (threadgroup) memory.
_REDUCE = (
    """
    // warp, then block reduction of (m, acc) and (best, best_i)"""
    + _COMBINE
    + """    SHARED float sm_m[32], sm_a[32], sm_b[32];
    SHARED int sm_i[32];
    const unsigned lane = tid & 31u, warp = tid >> 5;
    if (lane == 0) { sm_m[warp] = m; sm_a[warp] = acc; sm_b[warp] = best; sm_i[warp] = best_i; }
    BARRIER;
    if (warp == 0) {
        const unsigned nw = NTHREADS / 32;
        m = lane < nw ? sm_m[lane] : NEG;
        acc = lane < nw ? sm_a[lane] : 0.0f;
        best = lane < nw ? sm_b[lane] : NEG;
        best_i = lane < nw ? sm_i[lane] : -1;"""
    + _COMBINE.replace("\n    ", "\n        ")
    + """    }
"""
)

_CUDA_REDUCE = (
    _REDUCE.replace("OFF_T", "int")
    .replace("SHFL(", "__shfl_down_sync(0xffffffffu, ")
    .replace("SHARED", "__shared__")
    .replace("BARRIER", "__syncthreads()")
)
_METAL_REDUCE = (
    _REDUCE.replace("OFF_T", "ushort")
    .replace("SHFL(", "simd_shuffle_down(")
    .replace("SHARED", "threadgroup")
    .replace("BARRIER", "threadgroup_barrier(mem_flags::mem_threadgroup)")
    .replace("warp, then block", "simdgroup, then threadgroup")
)


def _source(backend: str) -> tuple[str, str]:
    consts = (
        f"#define NTHREADS {THREADS}u\n#define GMAX {GUMBEL_MAX + 1e-3:.6f}f\n"
        "#define NEG (-3.0e38f)\n"
    )
    if backend == "cuda":
        header = (
            consts
            + "#define FEXP __expf\n#define FLOG __logf\n#define PRECISE_LOG logf\n"
            + "#define FMAX fmaxf\ntypedef unsigned long long u64;\n"
            + _HASH.replace("HASH_INLINE", "__device__ inline")
        )
        body = (
            _BODY.replace("ROW_ID", "blockIdx.x")
            .replace("THREAD_ID", "threadIdx.x")
            .replace("REDUCE", _CUDA_REDUCE)
        )
        return header, body
    header = (
        consts
        + "#define FEXP exp\n#define FLOG log\n#define PRECISE_LOG metal::precise::log\n"
        + "#define FMAX fmax\ntypedef ulong u64;\n"
        + _HASH.replace("HASH_INLINE", "inline")
    )
    body = (
        _BODY.replace("ROW_ID", "threadgroup_position_in_grid.x")
        .replace("THREAD_ID", "thread_position_in_threadgroup.x")
        .replace("REDUCE", _METAL_REDUCE)
        .replace("ull", "ul")
    )
    return header, body


def backend() -> str | None:
    """Where the fused row sampler runs: ``"cuda"``, ``"metal"``, ``"cpu"`` (NumPy), or None."""
    if os.environ.get("FSDFM_MLX_SAMPLER", "").lower() == "portable":
        return None
    if mx.default_device() != mx.gpu:
        return "cpu"
    if mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


def _cpu_row_sample(logits, z, key, exclude_z, ban):
    """The NumPy version: one inverse-CDF draw per row (float32 cumulative sums)."""
    *lead, V = logits.shape
    lg = np.asarray(logits.astype(mx.float32)).reshape(-1, V)
    zr = np.asarray(z).reshape(-1).astype(np.int64)
    rows = np.arange(lg.shape[0])
    m = lg.max(axis=-1, keepdims=True)
    e = np.exp(lg - m)  # [R, V]
    lse = m[:, 0] + np.log(e.sum(axis=-1))
    logit_z = lg[rows, zr]
    if exclude_z:
        e[rows, zr] = 0.0
    if ban is not None:
        e[:, ban] = 0.0
    c = np.cumsum(e, axis=-1, out=e)
    seed = np.asarray(key).astype(np.uint64)
    u = np.random.default_rng(seed).random(lg.shape[0], dtype=np.float32)
    # first column whose cumulative weight exceeds u * total (the scale keeps u below the total)
    target = (u * c[:, -1] * np.float32(1.0 - 2.0**-23))[:, None]
    dest = np.minimum((c <= target).sum(axis=-1), V - 1)
    return (
        mx.array(dest.astype(np.int32).reshape(lead)),
        mx.array(lse.astype(np.float32).reshape(lead)),
        mx.array(logit_z.astype(np.float32).reshape(lead)),
    )


@functools.lru_cache(maxsize=2)
def _kernel(which: str):
    header, body = _source(which)
    names = dict(
        name="fsdfm_row_sample",
        input_names=["logits", "z", "seed"],
        output_names=["dest", "lse", "logit_z"],
        source=body,
        header=header,
    )
    if which == "cuda":
        return mx.fast.cuda_kernel(**names)
    return mx.fast.metal_kernel(**names)


def row_sample(
    logits: mx.array, z: mx.array, key: mx.array, *, exclude_z: bool, ban: int | None = None
) -> tuple[mx.array, mx.array, mx.array]:
    """One fused pass per row: ``(dest, lse, logit_z)`` (GPU kernel, or NumPy on a CPU device).

    Args:
        logits: [..., V] logits (float32, float16 or bfloat16).
        z: [...] int current tokens.
        key: a PRNG key (``mx.random.key``), uint32 [2].
        exclude_z: draw ``dest`` from the logits with column ``z`` removed (a jump's destination);
            False draws from all columns (``x_1 ~ p_1t``).
        ban: a column never drawn (None = none).

    Returns:
        ``dest`` [...] int32 (a Gumbel-max draw), ``lse`` [...] float32 (logsumexp over V) and
        ``logit_z`` [...] float32 (the logit of ``z``).
    """
    which = backend()
    if which is None:
        raise RuntimeError("the fused row sampler is switched off (FSDFM_MLX_SAMPLER=portable)")
    if which == "cpu":
        return _cpu_row_sample(logits, z, key, exclude_z, ban)
    *lead, V = logits.shape
    R = math.prod(lead)
    out = _kernel(which)(
        inputs=[logits.reshape(R, V), z.reshape(R).astype(mx.int32), key.astype(mx.uint32)],
        template=[
            ("T", logits.dtype),
            ("V", V),
            ("EXCLUDE_Z", bool(exclude_z)),
            ("BAN", V if ban is None else int(ban)),
        ],
        grid=(R * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(R,), (R,), (R,)],
        output_dtypes=[mx.int32, mx.float32, mx.float32],
    )
    return tuple(o.reshape(lead) for o in out)


_CHECKED: dict[str, bool] = {}


def available() -> bool:
    """True when the fused kernel runs here and passed its first-use self-check.

    The self-check compares ``lse`` and ``logit_z`` with MLX ops on random logits, checks that
    ``dest`` is a valid column other than ``z``, and that a row with one dominant logit draws it.
    A kernel that fails (or does not compile) is reported once and the portable path is used.
    """
    which = backend()
    if which is None:
        return False
    if which not in _CHECKED:
        _CHECKED[which] = _self_check()
    return _CHECKED[which]


def _self_check() -> bool:
    try:
        k = mx.random.key(1234)
        R, V = 64, 1000
        logits = mx.random.normal((R, V), key=k) * 3.0
        z = mx.random.randint(0, V, (R,), key=mx.random.key(1))
        winner = (z + 1) % V
        # rows 0..7: one logit far above the rest, so the draw is (almost surely) that column
        boost = (mx.arange(V)[None] == winner[:, None]) & (mx.arange(R)[:, None] < 8)
        logits = mx.where(boost, 60.0, logits)
        dest, lse, logit_z = row_sample(logits, z, mx.random.key(7), exclude_z=True)
        ref_lse = mx.logsumexp(logits, axis=-1)
        ref_z = mx.take_along_axis(logits, z[:, None], axis=-1)[:, 0]
        mx.eval(dest, lse, logit_z, ref_lse, ref_z)
        ok = (
            bool(mx.allclose(lse, ref_lse, rtol=1e-4, atol=1e-3).item())
            and bool(mx.array_equal(logit_z, ref_z).item())
            and bool(((dest >= 0) & (dest < V) & (dest != z)).all().item())
            and bool(mx.array_equal(dest[:8], winner[:8]).item())
        )
        if not ok:
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
