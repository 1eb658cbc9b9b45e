"""Shared test fixtures: paths to the reference fixtures and converted fixture models.

Fixture erratum (see tests/fixtures/README.md): in `logits.npz`, `logits_teacher`, `logits_student`
and `logits_dfm_mask` were produced from weights one AdamW step ahead of the weights stored in the
checkpoints (the stored optimizer state holds exactly that pending step); `logits_student_ema` matches
the stored weights. `stepped_state_dict` replays the pending step so the parity tests can compare at
the fixture's stated tolerance.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# float32 parity means float32 matmuls: MLX's CUDA backend runs them as TF32 unless told otherwise
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import fsdfm_mlx  # noqa: F401  (first: gives MLX's Linux CPU backend MKL before mlx.core loads)

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
CKPT = FIXTURES / "checkpoints"
SAMPLER = FIXTURES / "sampler"

# figures tests want shown (parity errors, quantization KL, ...): printed at the end of every run
REPORT: list[str] = []


def report(line: str) -> None:
    """Show ``line`` in the "fsdfm-mlx figures" section of pytest's terminal summary."""
    REPORT.append(line)


def pytest_terminal_summary(terminalreporter):
    if REPORT:
        terminalreporter.section("fsdfm-mlx figures")
        for line in REPORT:
            terminalreporter.write_line(line)


def stepped_state_dict(state_dict: dict, optimizer: dict) -> dict:
    """Apply the AdamW update held in ``optimizer`` (decoupled weight decay) to ``state_dict``.

    Parameters are matched by position: the optimizer's param ids follow the module's parameter order,
    which is the state dict's order without buffers (``rotary_emb.inv_freq``).
    """
    group = optimizer["param_groups"][0]
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    b1, b2 = group["betas"]
    names = [k for k in state_dict if not k.endswith("rotary_emb.inv_freq")]
    out = dict(state_dict)
    for i, name in enumerate(names):
        st = optimizer["state"][i]
        n = float(st["step"])
        m_hat = st["exp_avg"] / (1 - b1**n)
        v_hat = st["exp_avg_sq"] / (1 - b2**n)
        w = state_dict[name].float() * (1 - lr * wd)  # decoupled weight decay
        out[name] = (w - lr * m_hat / (v_hat.sqrt() + eps)).contiguous()
    return out


@pytest.fixture(scope="session")
def stepped_checkpoints(tmp_path_factory):
    """Official-format copies of the fixture checkpoints with the pending AdamW step applied.

    Returns:
        dict: ``"fsdfm"`` -> path of the distillation checkpoint, ``"dfm_mask"`` -> the DFM one.
    """
    torch = pytest.importorskip("torch")
    d = tmp_path_factory.mktemp("stepped")
    ck = torch.load(CKPT / "fsdfm-tiny.pth", weights_only=True)
    ck["teacher_model"] = stepped_state_dict(ck["teacher_model"], ck["teacher_optimizer"])
    ck["student_model"] = stepped_state_dict(ck["student_model"], ck["student_optimizer"])
    torch.save(ck, d / "fsdfm-tiny.pth")
    ck = torch.load(CKPT / "dfm-tiny-mask.pth", weights_only=True)
    ck["model"] = stepped_state_dict(ck["model"], ck["optimizer"])
    torch.save(ck, d / "dfm-tiny-mask.pth")
    return {"fsdfm": d / "fsdfm-tiny.pth", "dfm_mask": d / "dfm-tiny-mask.pth"}


@pytest.fixture(scope="session")
def convert_cached(tmp_path_factory):
    """Convert a checkpoint once per session per option set; returns the folder's path."""
    pytest.importorskip("torch")
    from fsdfm_mlx.convert.to_mlx import convert

    root = tmp_path_factory.mktemp("converted")
    cache: dict = {}

    def _convert(ckpt: str | Path, **kw) -> Path:
        key = (str(ckpt), tuple(sorted(kw.items())))
        if key not in cache:
            out = root / f"m{len(cache)}"
            convert(str(ckpt), str(out), progress=False, **kw)
            cache[key] = out
        return cache[key]

    return _convert


@pytest.fixture(scope="session")
def micro_models(convert_cached):
    """The four micro sampler models converted to float32 MLX folders: name -> path."""
    out = {}
    for name in ("uniform-teacher", "uniform-student", "mask-teacher", "mask-student"):
        out[name] = convert_cached(
            SAMPLER / f"micro-{name}.pth",
            config=str(SAMPLER / f"micro-{name}.yaml"),
            dtype="float32",
        )
    return out
