"""The converter: formats, weight selection, prefixes, heads, shards, atomic output and bad input."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import CKPT, FIXTURES
from fsdfm_mlx.cli.main import app
from typer.testing import CliRunner

from fsdfm_mlx import load

torch = pytest.importorskip("torch")

from fsdfm_mlx.convert import to_mlx  # noqa: E402
from fsdfm_mlx.convert.checkpoint import CheckpointError, read_official  # noqa: E402

FSDFM = CKPT / "fsdfm-tiny.pth"
DFM = CKPT / "dfm-tiny-mask.pth"
YAML = str(CKPT / "fsdfm-tiny.yaml")
MASK_YAML = str(CKPT / "dfm-tiny-mask.yaml")
runner = CliRunner()


def weights_of(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(
            {
                k: np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v)
                for k, v in mx.load(str(f)).items()
            }
        )
    return out


@pytest.mark.parametrize(
    "path,weights,selection,student",
    [
        (FSDFM, None, "student_model", True),
        (FSDFM, "student", "student_model", True),
        (FSDFM, "student_ema", "student_ema_model", True),
        (FSDFM, "teacher", "teacher_model", False),
        (DFM, None, "model", False),
    ],
)
def test_every_weight_selection_and_format(tmp_path, path, weights, selection, student):
    cfg = MASK_YAML if path == DFM else YAML
    r = to_mlx.convert(
        str(path),
        str(tmp_path / "out"),
        config=cfg,
        weights=weights,
        dtype="float32",
        progress=False,
    )
    assert r.selection == selection
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "fsdfm"
    assert config["dt_conditioned"] is student
    assert config["n_heads"] == 4 and config["head_dim"] == 16
    assert config["length"] == 64
    if path == DFM:
        assert config["source_distribution"] == "mask" and config["mask_token_id"] == 1000
        assert config["num_tokens"] == 1001 and config["default_solver"] == "dfm_euler"
    else:
        assert config["source_distribution"] == "uniform" and config["mask_token_id"] is None
        want = "mixture_euler_with_cumulative_scalar" if student else "dfm_euler"
        assert config["default_solver"] == want
    # every stored tensor equals the checkpoint's (float32: bit exact)
    sd = torch.load(path, weights_only=True)[selection]
    got = weights_of(tmp_path / "out")
    assert set(got) == {k for k in sd if not k.endswith("inv_freq")}
    for k, v in got.items():
        np.testing.assert_array_equal(v, sd[k].numpy())
    for f in ("tokenizer_config.json", "vocab.json", "merges.txt", "README.md"):
        assert (tmp_path / "out" / f).exists()


def test_teacher_missing_from_dfm_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no teacher_model"):
        to_mlx.convert(
            str(DFM), str(tmp_path / "o"), config=MASK_YAML, weights="teacher", progress=False
        )
    assert not (tmp_path / "o").exists()


def test_prefixed_checkpoint_converts_identically(tmp_path):
    ck = torch.load(FSDFM, weights_only=True)
    for entry, prefix in (("student_model", "module._orig_mod."), ("teacher_model", "_orig_mod.")):
        ck[entry] = {prefix + k: v for k, v in ck[entry].items()}
    torch.save(ck, tmp_path / "prefixed.pth")
    for w in ("student", "teacher"):
        a = to_mlx.convert(
            str(FSDFM), str(tmp_path / f"plain-{w}"), config=YAML, weights=w, progress=False
        )
        b = to_mlx.convert(
            str(tmp_path / "prefixed.pth"),
            str(tmp_path / f"pref-{w}"),
            config=YAML,
            weights=w,
            progress=False,
        )
        wa, wb = weights_of(Path(a.mlx_path)), weights_of(Path(b.mlx_path))
        assert wa.keys() == wb.keys()
        for k in wa:
            np.testing.assert_array_equal(wa[k], wb[k])


def test_config_and_n_heads_give_identical_weights(tmp_path):
    a = to_mlx.convert(
        str(FSDFM), str(tmp_path / "cfg"), config=YAML, dtype="bfloat16", progress=False
    )
    b = to_mlx.convert(
        str(FSDFM),
        str(tmp_path / "heads"),
        n_heads=4,
        source="uniform",
        dtype="bfloat16",
        progress=False,
    )
    assert (tmp_path / "cfg" / "model.safetensors").read_bytes() == (
        tmp_path / "heads" / "model.safetensors"
    ).read_bytes()
    ca = json.loads((tmp_path / "cfg" / "config.json").read_text())
    cb = json.loads((tmp_path / "heads" / "config.json").read_text())
    assert ca["n_heads"] == cb["n_heads"] == 4
    assert a.notes == b.notes  # neither needed the head_dim-64 assumption


def test_head_dim_64_assumed_and_said(tmp_path):
    r = to_mlx.convert(str(FSDFM), str(tmp_path / "o"), source="uniform", progress=False)
    assert json.loads((tmp_path / "o" / "config.json").read_text())["n_heads"] == 1
    assert any("head_dim 64" in n for n in r.notes)


def test_preset_must_match_weights(tmp_path):
    with pytest.raises(CheckpointError, match="preset 1.3b has hidden_size=2048"):
        to_mlx.convert(
            str(FSDFM), str(tmp_path / "o"), preset="1.3b", source="uniform", progress=False
        )


def test_sharded_output_loads(tmp_path):
    r = to_mlx.convert(
        str(FSDFM),
        str(tmp_path / "o"),
        config=YAML,
        dtype="float32",
        progress=False,
        max_shard_size_gb=2e-4,
    )
    shards = sorted(p.name for p in Path(r.mlx_path).glob("model-*.safetensors"))
    assert len(shards) > 2 and not (Path(r.mlx_path) / "model.safetensors").exists()
    index = json.loads((Path(r.mlx_path) / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    ref = to_mlx.convert(
        str(FSDFM), str(tmp_path / "one"), config=YAML, dtype="float32", progress=False
    )
    m1, _ = load(r.mlx_path)
    m2, _ = load(ref.mlx_path)
    x, t, dt = mx.zeros((1, 8), dtype=mx.int32), mx.array([0.3]), mx.array([0.1])
    np.testing.assert_array_equal(np.array(m1(x, t, dt)), np.array(m2(x, t, dt)))


def test_safetensors_readable_by_the_safetensors_library(tmp_path):
    from safetensors.numpy import load_file

    to_mlx.convert(
        str(FSDFM),
        str(tmp_path / "o"),
        config=YAML,
        dtype="float16",
        quantize=True,
        q_bits=8,
        q_group_size=32,
        progress=False,
    )
    w = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert (
        w["blocks.0.qw.weight"].dtype == np.uint32 and w["blocks.0.qw.scales"].dtype == np.float16
    )
    assert w["blocks.0.norm1.weight"].dtype == np.float32  # norm gains stay float32
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 32, "bits": 8}


# ------------------------------------------------------------------ bad input, through the CLI


def _cli(*args):
    return runner.invoke(app, ["convert", *map(str, args)])


def _assert_one_line_error(res, needle):
    assert res.exit_code != 0
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: "), res.stderr
    assert needle in err[0], err[0]
    assert "Traceback" not in res.output


def _no_leftovers(parent: Path, name: str):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_bad_missing_path(tmp_path):
    _assert_one_line_error(
        _cli("--model", tmp_path / "nope.pth", "--mlx-path", tmp_path / "o"), "no such checkpoint"
    )
    _no_leftovers(tmp_path, "o")


def test_bad_not_a_checkpoint(tmp_path):
    f = tmp_path / "notes.pth"
    f.write_text("hello, not a checkpoint\n")
    _assert_one_line_error(
        _cli("--model", f, "--mlx-path", tmp_path / "o"), "not a PyTorch checkpoint"
    )
    _no_leftovers(tmp_path, "o")


def test_bad_truncated(tmp_path):
    f = tmp_path / "trunc.pth"
    data = FSDFM.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _assert_one_line_error(_cli("--model", f, "--mlx-path", tmp_path / "o"), "truncated")
    _no_leftovers(tmp_path, "o")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.pth"
    torch.save({"model": _Evil(marker)}, f)
    with open(tmp_path / "evil.pkl", "wb") as fh:  # a plain pickle too
        pickle.dump({"model": _Evil(marker)}, fh)
    for path in (f, tmp_path / "evil.pkl"):
        res = _cli("--model", path, "--mlx-path", tmp_path / "o")
        assert res.exit_code != 0
        assert (
            res.stderr.strip().startswith("Error: ") and len(res.stderr.strip().splitlines()) == 1
        )
        assert "refused" in res.stderr or "not a PyTorch checkpoint" in res.stderr
    assert not marker.exists()  # the code never ran
    _no_leftovers(tmp_path, "o")


def test_bad_no_model_weights(tmp_path):
    ck = torch.load(FSDFM, weights_only=True)
    f = tmp_path / "opt-only.pth"
    torch.save({"step": 3, "student_optimizer": ck["student_optimizer"]}, f)
    _assert_one_line_error(_cli("--model", f, "--mlx-path", tmp_path / "o"), "no model weights")
    _no_leftovers(tmp_path, "o")


def test_bad_n_heads(tmp_path):
    _assert_one_line_error(
        _cli("--model", FSDFM, "--mlx-path", tmp_path / "o", "--n-heads", 5, "--source", "uniform"),
        "does not divide the hidden size 64",
    )
    _no_leftovers(tmp_path, "o")


def test_bad_existing_output_without_force(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _assert_one_line_error(
        _cli("--model", FSDFM, "--mlx-path", out, "--config", YAML), "already exists"
    )
    assert (out / "keep.txt").read_text() == "mine"
    res = _cli("--model", FSDFM, "--mlx-path", out, "--config", YAML, "--force", "--quiet")
    assert res.exit_code == 0, res.output
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--dtype", "float64"], "unknown --dtype"),
        (["-q", "--q-bits", "3"], "--q-bits must be 4 or 8"),
        (["-q", "--q-group-size", "48"], "--q-group-size must be"),
        (["--weights", "best"], "unknown --weights"),
        (["--preset", "7b"], "unknown --preset"),
        (["--config", "/no/such.yaml"], "no such config file"),
        (["--default-temp", "-0.5"], "--default-temp must be a finite number >= 0"),
    ],
)
def test_bad_options(tmp_path, extra, needle):
    _assert_one_line_error(
        _cli("--model", FSDFM, "--mlx-path", tmp_path / "o", "--source", "uniform", *extra), needle
    )
    _no_leftovers(tmp_path, "o")


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = to_mlx._convert_one

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(to_mlx, "_convert_one", flaky)
    with pytest.raises(OSError):
        to_mlx.convert(str(FSDFM), str(tmp_path / "o"), config=YAML, progress=False)
    _no_leftovers(tmp_path, "o")
    # with --force over an existing model, the old one survives a failed conversion
    monkeypatch.setattr(to_mlx, "_convert_one", real)
    to_mlx.convert(str(FSDFM), str(tmp_path / "o"), config=YAML, progress=False)
    before = (tmp_path / "o" / "model.safetensors").read_bytes()
    calls["n"] = 0
    monkeypatch.setattr(to_mlx, "_convert_one", flaky)
    with pytest.raises(OSError):
        to_mlx.convert(
            str(FSDFM),
            str(tmp_path / "o"),
            config=YAML,
            force=True,
            weights="teacher",
            progress=False,
        )
    assert (tmp_path / "o" / "model.safetensors").read_bytes() == before


def test_hub_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    res = _cli(
        "--model",
        "aminr8/FS-DFM",
        "--filename",
        "FS_DFM_checkpoint.pth",
        "--mlx-path",
        tmp_path / "o",
    )
    _assert_one_line_error(res, "aminr8/FS-DFM")
    _no_leftovers(tmp_path, "o")


def test_hub_repo_without_filename(tmp_path):
    _assert_one_line_error(
        _cli("--model", "aminr8/FS-DFM", "--mlx-path", tmp_path / "o"), "--filename"
    )


def test_read_official_never_touches_optimizer_state():
    ck = read_official(FSDFM, config=YAML)
    assert ck.selection == "student_model" and ck.step == 190000
    assert all(not k.startswith(("student_optimizer", "module.")) for k in ck.state_dict)
    assert "rotary_emb.inv_freq" not in ck.state_dict


def test_cli_convert_and_info(tmp_path):
    out = tmp_path / "m"
    res = _cli(
        "--model",
        FSDFM,
        "--mlx-path",
        out,
        "--config",
        YAML,
        "--weights",
        "student_ema",
        "--dtype",
        "float16",
        "-q",
        "--q-bits",
        "8",
        "--q-group-size",
        "32",
        "--default-temp",
        "0.7",
    )
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["default_temp"] == 0.7 and "`default_temp: 0.7`" in (out / "README.md").read_text()
    assert "Wrote" in res.stdout and "8-bit" in res.stdout
    res = runner.invoke(app, ["info", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["parameters"] == 286792
    assert info["quantization"] == {"group_size": 32, "bits": 8}
    assert info["config"]["source"]["weights"] == "student_ema_model"
    assert info["config"]["default_temp"] == 0.7
    res = runner.invoke(app, ["info", str(out)])
    assert res.exit_code == 0 and "286,792" in res.stdout and "0.7" in res.stdout
    res = runner.invoke(app, ["info", str(tmp_path / "nothing-here")])
    assert res.exit_code != 0 and res.stderr.startswith("Error: ")


def test_logits_npz_inputs_present():
    ref = np.load(FIXTURES / "logits.npz")
    assert ref["x_mask"].max() == 1000  # mask id appears in the mask-source inputs
