"""The fused row sampler (fsdfm_mlx.kernels): the CUDA/Metal kernel, or NumPy on a CPU device.

The same tests run on whichever backend the machine has: on CI and this CPU the NumPy path, on the
lent GPU (`pytest tests/test_kernels.py tests/test_solvers.py`) the CUDA kernel; the solvers'
statistical tests then exercise that path too.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import report

from fsdfm_mlx import kernels, solvers


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
        kernels.row_sample(
            mx.zeros((2, 3)), mx.zeros((2,), mx.int32), mx.random.key(0), exclude_z=True
        )
    # the solvers then take the portable MLX-ops path
    x = mx.zeros((1, 4), mx.int32)
    out = solvers.sample_step(
        mx.zeros((1, 4, 7)), x, 0.5, 0.25, mx.random.key(0), solver=solvers.CUMULATIVE
    )
    assert out.shape == (1, 4)


def test_gumbel_bound_is_the_largest_noise():
    # the largest 23-bit uniform is 1 - 2^-24; its Gumbel value is the bound used for skipping
    u = np.float32(1.0 - 2.0**-24)
    assert np.float32(u) < 1.0
    assert -np.log(-np.log(np.float64(u))) == pytest.approx(kernels.GUMBEL_MAX, rel=1e-9)


def test_self_check_passes():
    assert kernels.available()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_lse_and_logit_z_match_float64(dtype):
    R, V = 300, 50257
    logits = (mx.random.normal((R, V), key=mx.random.key(0)) * 4).astype(dtype)
    z = mx.random.randint(0, V, (R,), key=mx.random.key(1))
    dest, lse, logit_z = kernels.row_sample(logits, z, mx.random.key(2), exclude_z=True)
    f = np.asarray(logits.astype(mx.float32)).astype(np.float64)
    m = f.max(-1)
    ref_lse = m + np.log(np.exp(f - m[:, None]).sum(-1))
    err = float(np.abs(np.asarray(lse) - ref_lse).max())
    which = kernels.backend()
    report(f"row sampler ({which}) lse vs float64 ({dtype}, V=50257): max abs error {err:.2e}")
    assert err < 1e-4
    assert np.array_equal(np.asarray(logit_z), f[np.arange(R), np.asarray(z)].astype(np.float32))
    d = np.array(dest)
    assert d.min() >= 0 and d.max() < V and not np.any(d == np.array(z))


@pytest.mark.parametrize("exclude_z", [True, False])
def test_draws_follow_the_distribution(exclude_z):
    # 4 rows with different shapes of p; 200,000 draws each (one row per draw, fresh keys)
    V, N = 11, 200_000
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, V)).astype(np.float32) * np.array([[0.3], [1.0], [3.0], [8.0]])
    z = np.array([0, 3, int(base[2].argmax()), int(base[3].argmax())], dtype=np.int32)
    counts = np.zeros((4, V))
    draws_per_call = 50_000
    rows = mx.array(np.tile(base, (draws_per_call, 1)))
    zs = mx.array(np.tile(z, draws_per_call))
    for c in range(N // draws_per_call):
        dest, _, _ = kernels.row_sample(rows, zs, mx.random.key(100 + c), exclude_z=exclude_z)
        d = np.array(dest).reshape(draws_per_call, 4)
        for r in range(4):
            counts[r] += np.bincount(d[:, r], minlength=V)
    p = np.exp(base - base.max(-1, keepdims=True))
    if exclude_z:
        p[np.arange(4), z] = 0.0
    p /= p.sum(-1, keepdims=True)
    tv = 0.5 * np.abs(counts / N - p).sum(-1)
    which = kernels.backend()
    report(f"row sampler ({which}) draws (exclude_z={exclude_z}, 200k/row): max TV {tv.max():.4f}")
    assert tv.max() < 0.01  # 200k draws over 11 columns: sampling noise is ~0.003
    if exclude_z:
        assert counts[np.arange(4), z].sum() == 0


def test_ban_column_is_never_drawn():
    V = 9
    logits = mx.zeros((20_000, V))
    logits = mx.where(mx.arange(V) == V - 1, 5.0, logits)  # the banned column is the likeliest
    dest, _, _ = kernels.row_sample(
        logits, mx.zeros((20_000,), mx.int32), mx.random.key(3), exclude_z=False, ban=V - 1
    )
    d = np.array(dest)
    assert d.max() < V - 1 and len(np.unique(d)) == V - 1


def test_same_key_same_draws_and_keys_differ():
    logits = mx.random.normal((64, 1000), key=mx.random.key(0))
    z = mx.zeros((64,), mx.int32)
    a = np.array(kernels.row_sample(logits, z, mx.random.key(5), exclude_z=True)[0])
    b = np.array(kernels.row_sample(logits, z, mx.random.key(5), exclude_z=True)[0])
    c = np.array(kernels.row_sample(logits, z, mx.random.key(6), exclude_z=True)[0])
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_solver_step_takes_the_kernel_path(monkeypatch):
    calls = []
    real = kernels.row_sample

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(kernels, "row_sample", spy)
    logits = mx.random.normal((2, 16, 100), key=mx.random.key(0))
    x = mx.zeros((2, 16), mx.int32)
    for final in (False, True):
        solvers.sample_step(
            logits, x, 0.5, 0.25, mx.random.key(1), solver=solvers.CUMULATIVE, final=final
        )
    solvers.sample_step(logits, x, 0.5, 0.25, mx.random.key(1), solver=solvers.MIXTURE_EULER)
    solvers.sample_step(
        logits, x, 0.5, 0.25, mx.random.key(1), solver=solvers.CUMULATIVE, fused=False
    )
    assert [c["exclude_z"] for c in calls] == [True, False]
