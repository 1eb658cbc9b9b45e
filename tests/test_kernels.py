"""The fused solver step (fsdfm_mlx.kernels): the CUDA/Metal kernel, or NumPy on a CPU device.

The same tests run on whichever backend the machine has: on CI and this CPU the NumPy path, on the
lent GPU (`pytest tests/test_kernels.py tests/test_solvers.py`) the CUDA kernel; the solvers'
statistical tests then exercise that path too. Each statistical test compares the empirical
distribution of the new token with the exact one (float64) in total variation, with fixed keys.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from conftest import report

from fsdfm_mlx import kernels, solvers


def _softmax(x):
    p = np.exp(x - x.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _exact(mode, base, z, t, h, temperature=1.0):
    """[R, V] float64: the distribution of the token after one step from z (the solvers' rules)."""
    p = _softmax(base.astype(np.float64) / temperature)
    rows = np.arange(len(z))
    if mode == "final":
        return p
    p_z = p[rows, z]
    if mode == "cumulative":
        alpha = (math.log(1 - t) - math.log(max(1 - t - h, 1e-8))) / (h + 1e-8)
        P = -np.expm1(-h * np.maximum(alpha * (1 - p_z), 1e-12))
    else:
        P = (1 - p_z) * -math.expm1(-h / (1 - t))
    dest = p.copy()
    dest[rows, z] = 0.0
    dest /= dest.sum(-1, keepdims=True)
    out = P[:, None] * dest
    out[rows, z] += 1 - P
    return out


def _draw_counts(base, z, n_calls, per_call, *, seed, **step):
    R, V = base.shape
    rows = mx.array(np.tile(base, (per_call, 1)))
    zs = mx.array(np.tile(z, per_call))
    ed = mx.ones((R * per_call,), mx.bool_)
    counts = np.zeros((R, V))
    for c in range(n_calls):
        out = kernels.fused_step(rows, zs, ed, mx.random.key(seed + c), **step)
        d = np.array(out).reshape(per_call, R)
        for r in range(R):
            counts[r] += np.bincount(d[:, r], minlength=V)
    return counts / (n_calls * per_call)


def test_cpu_device_uses_numpy():
    prev = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        assert kernels.backend() == "cpu"
        assert kernels.available()
    finally:
        mx.set_default_device(prev)


def test_portable_switch(monkeypatch):
    monkeypatch.setenv("FSDFM_MLX_SAMPLER", "portable")
    assert kernels.backend() is None
    assert not kernels.available()
    with pytest.raises(RuntimeError, match="switched off"):
        kernels.fused_step(
            mx.zeros((2, 3)),
            mx.zeros((2,), mx.int32),
            mx.ones((2,), mx.bool_),
            mx.random.key(0),
            mode="final",
        )
    # the solvers then take the portable MLX-ops path
    x = mx.zeros((1, 4), mx.int32)
    out = solvers.sample_step(
        mx.zeros((1, 4, 7)), x, 0.5, 0.25, mx.random.key(0), solver=solvers.CUMULATIVE
    )
    assert out.shape == (1, 4)


def test_self_check_passes():
    assert kernels.available()


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown mode"):
        kernels.fused_step(
            mx.zeros((1, 3)), mx.zeros((1,), mx.int32), mx.ones((1,), mx.bool_), mx.random.key(0),
            mode="euler",
        )  # fmt: skip


@pytest.mark.parametrize(
    ("mode", "t", "h", "temp"),
    [("final", 0.0, 0.0, 1.0), ("cumulative", 0.5, 0.125, 1.0), ("cumulative", 0.0, 0.5, 1.0),
     ("dfm_euler", 0.25, 0.25, 1.0), ("cumulative", 0.5, 0.125, 0.7), ("final", 0.0, 0.0, 1.5)],
)  # fmt: skip
def test_steps_follow_the_exact_distribution(mode, t, h, temp):
    # 4 rows with different shapes of p (the last two: z is the likeliest token); 200,000 draws each
    V = 11
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, V)).astype(np.float32) * np.array([[0.3], [1.0], [3.0], [8.0]])
    z = np.array([0, 3, int(base[2].argmax()), int(base[3].argmax())], dtype=np.int32)
    got = _draw_counts(base, z, 4, 50_000, seed=100, mode=mode, t=t, h=h, temperature=temp)
    tv = 0.5 * np.abs(got - _exact(mode, base, z, t, h, temp)).sum(-1)
    which = kernels.backend()
    report(
        f"fused step ({which}, {mode}, t={t}, h={h}, temp={temp}, 200k draws/row): "
        f"max TV {tv.max():.4f}"
    )
    assert tv.max() < 0.01  # 200k draws over 11 columns: sampling noise is ~0.003


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_wide_rows_draw_the_right_columns(dtype):
    # V = 50,257: every thread of a threadgroup owns ~196 columns, so the draw walks the thread
    # brackets and then a thread's columns; the mass sits on 8 columns spread over the row
    V = 50257
    cols = np.array([0, 255, 256, 8191, 8192 + 256 * 33 + 3, 25_000, 50_000, V - 1])
    w = np.array([1.0, 2.0, 0.5, 3.0, 1.5, 0.25, 2.5, 1.0])
    base = np.full((2, V), -60.0, np.float32)
    base[:, cols] = np.log(w)
    z = np.array([cols[3], 7], dtype=np.int32)  # row 0: z is a likely column; row 1: z has p ~ 0
    rows = mx.array(np.tile(base, (1000, 1))).astype(dtype)
    zs = mx.array(np.tile(z, 1000))
    ed = mx.ones((2000,), mx.bool_)
    counts = np.zeros((2, V))
    for c in range(8):
        out = kernels.fused_step(
            rows, zs, ed, mx.random.key(50 + c), mode="cumulative", t=0.5, h=0.5
        )
        d = np.array(out).reshape(1000, 2)
        for r in range(2):
            counts[r] += np.bincount(d[:, r], minlength=V)
    got = counts / 8000
    exact = _exact("cumulative", np.asarray(rows[:2].astype(mx.float32)), z, 0.5, 0.5)
    tv = 0.5 * np.abs(got - exact).sum(-1)
    report(
        f"fused step ({kernels.backend()}, V=50257, {dtype}, 8k draws/row): max TV {tv.max():.4f}"
    )
    assert got[:, np.setdiff1d(np.arange(V), np.append(cols, 7))].sum() == 0
    assert tv.max() < 0.04  # 8k draws over 8 columns: sampling noise is ~0.013


def test_frozen_positions_and_mask_source_final_step():
    V, R = 9, 6
    logits = mx.zeros((R, V))
    logits = mx.where(mx.arange(V) == V - 1, 5.0, logits)  # the mask column is the likeliest
    z = mx.array([V - 1, V - 1, 2, 3, V - 1, 4], dtype=mx.int32)
    editable = mx.array([True, True, True, True, False, False])
    out = np.array(
        kernels.fused_step(logits, z, editable, mx.random.key(3), mode="final", ban=V - 1, mask_id=V - 1)
    )  # fmt: skip
    # written: editable positions still holding the mask, never with the mask itself
    assert out[0] < V - 1 and out[1] < V - 1
    assert out[2:].tolist() == [2, 3, V - 1, 4]
    step = np.array(
        kernels.fused_step(logits, z, editable, mx.random.key(4), mode="cumulative", t=0.5, h=0.5)
    )
    assert step[4:].tolist() == [V - 1, 4]


def test_ban_column_is_never_drawn():
    V = 9
    logits = mx.where(mx.arange(V) == V - 1, 5.0, mx.zeros((20_000, V)))
    out = kernels.fused_step(
        logits,
        mx.zeros((20_000,), mx.int32),
        mx.ones((20_000,), mx.bool_),
        mx.random.key(3),
        mode="final",
        ban=V - 1,
    )
    d = np.array(out)
    assert d.max() < V - 1 and len(np.unique(d)) == V - 1


def test_same_key_same_draws_and_keys_differ():
    logits = mx.random.normal((64, 1000), key=mx.random.key(0))
    z = mx.zeros((64,), mx.int32)
    ed = mx.ones((64,), mx.bool_)

    def run(k):
        return np.array(kernels.fused_step(logits, z, ed, mx.random.key(k), mode="final"))

    assert np.array_equal(run(5), run(5)) and not np.array_equal(run(5), run(6))


def test_solver_step_takes_the_kernel_path(monkeypatch):
    calls = []
    real = kernels.fused_step

    def spy(*a, **k):
        calls.append(k["mode"])
        return real(*a, **k)

    monkeypatch.setattr(kernels, "fused_step", spy)
    logits = mx.random.normal((2, 16, 100), key=mx.random.key(0))
    x = mx.zeros((2, 16), mx.int32)
    for solver in (solvers.CUMULATIVE, solvers.DFM_EULER):
        for final in (False, True):
            out = solvers.sample_step(
                logits, x, 0.5, 0.25, mx.random.key(1), solver=solver, final=final
            )
            assert out.shape == (2, 16) and out.dtype == x.dtype
    solvers.sample_step(logits, x, 0.5, 0.25, mx.random.key(1), solver=solvers.MIXTURE_EULER)
    solvers.sample_step(
        logits, x, 0.5, 0.25, mx.random.key(1), solver=solvers.CUMULATIVE, fused=False
    )
    assert calls == ["cumulative", "final", "dfm_euler", "final"]
    # a temperature stays on the fused path; top-k / top-p / argmax take the portable one
    for opts, fused in [({"temperature": 0.8}, True), ({"top_k": 5}, False), ({"top_p": 0.9}, False),
                        ({"temperature": 0.0}, False)]:  # fmt: skip
        calls.clear()
        solvers.sample_step(
            logits, x, 0.5, 0.25, mx.random.key(1), solver=solvers.CUMULATIVE,
            options=solvers.SamplerOptions(**opts),
        )  # fmt: skip
        assert calls == (["cumulative"] if fused else [])
    with pytest.raises(ValueError, match="temperature > 0"):
        kernels.fused_step(
            logits, x, mx.ones(x.shape, mx.bool_), mx.random.key(0), mode="final", temperature=0.0
        )


def test_cpu_two_level_draw_is_the_inverse_cdf():
    # against a float64 cumulative sum over the whole row: V not a multiple of the block (a tail
    # block), whole blocks of zero weight, zeroed columns, and goals at the ends of the range
    rng = np.random.default_rng(0)
    R, V = 400, 3 * kernels._CPU_BLOCK + 77
    e = rng.random((R, V)).astype(np.float32) ** 8
    e[:, kernels._CPU_BLOCK : 2 * kernels._CPU_BLOCK] = 0.0  # an empty block in the middle
    e[:100, V - 77 :] = 0.0  # rows whose tail block is empty
    e[100:200, :-1] = 0.0  # rows whose only weight is the last column
    target = rng.random(R).astype(np.float32)
    target[:10] = 0.0
    target[10:20] = np.float32(1.0 - 2.0**-23)
    got, total = kernels._cpu_draw(e, target)
    c = np.cumsum(e.astype(np.float64), axis=-1)
    want = np.array([np.searchsorted(c[r], target[r] * c[r, -1], side="right") for r in range(R)])
    np.testing.assert_allclose(total, c[:, -1], rtol=1e-5)
    assert (e[np.arange(R), got] > 0).all()  # never a column without weight
    assert (got[100:200] == V - 1).all()
    # the two sums round differently: a goal within rounding of a boundary may land next door
    assert (got == want).mean() > 0.99
