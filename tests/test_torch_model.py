"""The PyTorch port (convert/torch_model.py) against the official fixture logits."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import CKPT, FIXTURES, stepped_state_dict  # noqa: E402
from fsdfm_mlx.convert.torch_model import FSDFMTorch, read_mlx_folder  # noqa: E402

from fsdfm_mlx.model import ModelArgs  # noqa: E402

TINY = dict(hidden_size=64, cond_dim=32, n_blocks=2, n_heads=4, vocab_size=1000, length=64)


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURES / "logits.npz"))


@pytest.fixture(scope="module")
def cases():
    """name -> (args, state dict, input key, reference key); the erratum's AdamW step replayed."""
    ck = torch.load(CKPT / "fsdfm-tiny.pth", weights_only=True)
    dfm = torch.load(CKPT / "dfm-tiny-mask.pth", weights_only=True)
    student = ModelArgs(**TINY, dt_conditioned=True)
    return {
        "student_ema": (student, ck["student_ema_model"], "x_uniform", "logits_student_ema"),
        "student": (
            student,
            stepped_state_dict(ck["student_model"], ck["student_optimizer"]),
            "x_uniform",
            "logits_student",
        ),
        "teacher": (
            ModelArgs(**TINY),
            stepped_state_dict(ck["teacher_model"], ck["teacher_optimizer"]),
            "x_uniform",
            "logits_teacher",
        ),
        "dfm_mask": (
            ModelArgs(**TINY, source_distribution="mask"),
            stepped_state_dict(dfm["model"], dfm["optimizer"]),
            "x_mask",
            "logits_dfm_mask",
        ),
    }


def _run(model, ref, x_key, dtype=torch.float32):
    x = torch.from_numpy(ref[x_key]).to(torch.int32)
    t = torch.from_numpy(ref["t"])
    dt = torch.from_numpy(ref["dt"]) if model.args.dt_conditioned else None
    with torch.no_grad():
        return model(x, t, dt).float().numpy()


@pytest.mark.parametrize("attention", ["original", "split_einsum"])
@pytest.mark.parametrize("name", ["student_ema", "student", "teacher", "dfm_mask"])
def test_float32_parity(cases, ref, name, attention):
    args, sd, x_key, r_key = cases[name]
    model = FSDFMTorch.from_state_dict(args, sd, attention=attention)
    err = np.abs(_run(model, ref, x_key) - ref[r_key]).max()
    assert err < 1e-4, f"{name}/{attention}: max abs err {err:.3g}"


@pytest.mark.parametrize("attention", ["original", "split_einsum"])
@pytest.mark.parametrize("name", ["student", "dfm_mask"])
def test_float16_traced_parity(cases, ref, name, attention):
    args, sd, x_key, r_key = cases[name]
    model = FSDFMTorch.from_state_dict(
        args, sd, attention=attention, max_length=48, exact_length=True, dtype=torch.float16
    )
    x = torch.from_numpy(ref[x_key]).to(torch.int32)
    inputs = (x, torch.from_numpy(ref["t"]))
    if args.dt_conditioned:
        inputs += (torch.from_numpy(ref["dt"]),)
    traced = torch.jit.trace(model, inputs, check_trace=False)
    with torch.no_grad():
        out = traced(*inputs).float().numpy()
    err = np.abs(out - ref[r_key]).max()
    assert err < 5e-2, f"{name}/{attention} float16: max abs err {err:.3g}"


def test_split_einsum_equals_original(cases, ref):
    args, sd, x_key, _ = cases["student"]
    a = _run(FSDFMTorch.from_state_dict(args, sd, attention="original"), ref, x_key)
    b = _run(FSDFMTorch.from_state_dict(args, sd, attention="split_einsum"), ref, x_key)
    assert np.abs(a - b).max() < 1e-5


def test_traced_shorter_length_uses_rope_prefix(cases, ref):
    """A graph traced at one length is right at another (the RoPE slice is dynamic)."""
    args, sd, x_key, r_key = cases["student_ema"]
    model = FSDFMTorch.from_state_dict(args, sd, attention="split_einsum")
    x = torch.from_numpy(ref[x_key]).to(torch.int32)
    t, dt = torch.from_numpy(ref["t"]), torch.from_numpy(ref["dt"])
    traced = torch.jit.trace(
        model, (torch.zeros(3, 64, dtype=torch.int32), t, dt), check_trace=False
    )
    with torch.no_grad():
        out = traced(x, t, dt).numpy()
    assert np.abs(out - ref[r_key]).max() < 1e-4


def test_state_dict_keys_are_the_checkpoints(cases):
    args, sd, _, _ = cases["student"]
    for attention in ("original", "split_einsum"):
        keys = set(FSDFMTorch(args, attention=attention).state_dict())
        assert keys == {k for k in sd if not k.endswith("rotary_emb.inv_freq")}


def test_from_checkpoint_and_mlx_folder(ref, convert_cached):
    cfg = str(CKPT / "fsdfm-tiny.yaml")
    model = FSDFMTorch.from_checkpoint(CKPT / "fsdfm-tiny.pth", weights="student_ema", config=cfg)
    assert np.abs(_run(model, ref, "x_uniform") - ref["logits_student_ema"]).max() < 1e-4
    folder = convert_cached(
        CKPT / "fsdfm-tiny.pth", weights="student_ema", config=cfg, dtype="float32"
    )
    model = FSDFMTorch.from_mlx_folder(folder)
    assert np.abs(_run(model, ref, "x_uniform") - ref["logits_student_ema"]).max() < 1e-4


def test_quantized_mlx_folder_is_dequantized(ref, convert_cached):
    """A 4-bit MLX folder loads dequantized and matches the quantized MLX model's logits."""
    import mlx.core as mx

    from fsdfm_mlx import load

    cfg = str(CKPT / "fsdfm-tiny.yaml")
    folder = convert_cached(
        CKPT / "fsdfm-tiny.pth",
        weights="student_ema",
        config=cfg,
        dtype="float32",
        quantize=True,
        q_bits=4,
        q_group_size=32,
    )
    args, sd = read_mlx_folder(folder)
    assert all(v.dtype == torch.float32 for v in sd.values())
    model = FSDFMTorch.from_state_dict(args, sd)
    mlx_model, _ = load(str(folder))
    expect = mlx_model(mx.array(ref["x_uniform"]), mx.array(ref["t"]), mx.array(ref["dt"]))
    got = _run(model, ref, "x_uniform")
    assert np.abs(got - np.array(expect.astype(mx.float32))).max() < 1e-3
