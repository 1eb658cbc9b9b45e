"""Core ML export (convert/to_coreml.py, cli/export_coreml.py, fsdfm_mlx/coreml_runner.py).

Linux can convert and save a package and read its spec back, but cannot run it: the runs are in the
macOS-only test at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
ct = pytest.importorskip("coremltools")

import typer  # noqa: E402
from conftest import CKPT  # noqa: E402
from fsdfm_mlx.cli.export_coreml import register  # noqa: E402
from fsdfm_mlx.convert.to_coreml import count_ops, export_coreml  # noqa: E402
from fsdfm_mlx.convert.torch_model import FSDFMTorch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from fsdfm_mlx.model import ModelArgs  # noqa: E402

FSDFM = CKPT / "fsdfm-tiny.pth"
FSDFM_CFG = str(CKPT / "fsdfm-tiny.yaml")
DFM = CKPT / "dfm-tiny-mask.pth"
DFM_CFG = str(CKPT / "dfm-tiny-mask.yaml")
FP16 = 10  # MIL_pb2 DataType.FLOAT16
on_macos = pytest.mark.skipif(
    sys.platform != "darwin",
    reason="Core ML runs a package only on macOS (coremltools elsewhere converts and saves only)",
)


def _export(path, model, **kw):
    return export_coreml(str(model), str(path), progress=False, **kw)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The fixture models exported once: name -> (summary, spec)."""
    root = tmp_path_factory.mktemp("coreml")
    jobs = {
        "student": (FSDFM, dict(weights="student", config=FSDFM_CFG, lengths=[16, 32, 64])),
        "student_original": (
            FSDFM,
            dict(weights="student", config=FSDFM_CFG, length=64, attention="original"),
        ),
        "teacher": (FSDFM, dict(weights="teacher", config=FSDFM_CFG, length=48)),
        "mask": (DFM, dict(config=DFM_CFG, precision="float32")),
    }
    out = {}
    for name, (model, kw) in jobs.items():
        summary = _export(root / f"{name}.mlpackage", model, **kw)
        out[name] = (summary, ct.utils.load_spec(summary["path"]))
    return out


@pytest.fixture(scope="module")
def wide_model():
    """Random weights, big enough (13M params, GPT-2 vocab) that weights dominate the size."""
    torch.manual_seed(0)
    args = ModelArgs(
        hidden_size=128,
        cond_dim=32,
        n_blocks=1,
        n_heads=2,
        vocab_size=50257,
        length=32,
        dt_conditioned=True,
    )
    return FSDFMTorch(args)


def _inputs(spec):
    return {i.name: i for i in spec.description.input}


def test_inputs_outputs_and_enumerated_shapes(exports):
    spec = exports["student"][1]
    ins = _inputs(spec)
    assert list(ins) == ["tokens", "t", "dt"]
    tokens = ins["tokens"].type.multiArrayType
    assert tokens.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.INT32
    shapes = [list(s.shape) for s in tokens.enumeratedShapes.shapes]
    assert sorted(shapes) == [[1, 16], [1, 32], [1, 64]]
    assert list(tokens.shape) == [1, 64]  # the default
    for name in ("t", "dt"):
        arr = ins[name].type.multiArrayType
        assert list(arr.shape) == [1]
        assert arr.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    (out,) = spec.description.output
    assert out.name == "logits"
    assert out.type.multiArrayType.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
    # the teacher has no dt; a fixed length is a plain shape
    teacher = exports["teacher"][1]
    assert list(_inputs(teacher)) == ["tokens", "t"]
    assert list(_inputs(teacher)["tokens"].type.multiArrayType.shape) == [1, 48]


def test_float16_ops_and_float32_option(exports):
    for name, want in (("student", FP16), ("mask", None)):
        spec = exports[name][1]
        fn = spec.mlProgram.functions["main"]
        ops = fn.block_specializations[fn.opset].operations
        mm = [o for o in ops if o.type in ("linear", "conv")]
        dtypes = {o.outputs[0].type.tensorType.dataType for o in mm}
        if want is None:
            assert FP16 not in dtypes and dtypes, dtypes
        else:
            assert dtypes == {want}, dtypes
    mask_out = exports["mask"][1].description.output[0].type.multiArrayType
    assert mask_out.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32


def test_metadata_and_descriptions(exports, tmp_path):
    summary, spec = exports["student"]
    meta = dict(spec.description.metadata.userDefined)
    assert meta["source_distribution"] == "uniform"
    assert meta["vocab_size"] == "1000" and meta["num_tokens"] == "1000"
    assert meta["mask_token_id"] == "none"
    assert meta["dt_conditioned"] == "true"
    assert meta["default_solver"] == "mixture_euler_with_cumulative_scalar"
    assert meta["default_steps"] == "8"
    assert meta["lengths"] == "16,32,64" and meta["training_length"] == "64"
    assert json.loads(meta["scheduler"]) == {"type": "polynomial", "exponent": 1.0}
    assert "alpha" in meta["cumulative_scalar"] and "1e-8" in meta["cumulative_scalar"]
    assert meta["precision"] == "float16" and meta["attention"] == "split_einsum"
    assert ModelArgs.from_dict(json.loads(meta["config"])).dt_conditioned
    for feature in list(spec.description.input) + list(spec.description.output):
        assert feature.shortDescription, feature.name
    assert spec.description.metadata.shortDescription
    mask = dict(exports["mask"][1].description.metadata.userDefined)
    assert mask["source_distribution"] == "mask" and mask["mask_token_id"] == "1000"
    assert mask["num_tokens"] == "1001" and mask["dt_conditioned"] == "false"
    assert mask["default_solver"] == "dfm_euler"
    # tokenizer files beside the package
    tok = summary["tokenizer"]
    assert tok.endswith("student.tokenizer")
    from pathlib import Path

    assert (Path(tok) / "vocab.json").is_file() and (Path(tok) / "merges.txt").is_file()


def test_op_counts_of_each_attention_variant(exports):
    split = count_ops(exports["student"][1])
    orig = count_ops(exports["student_original"][1])
    n_blocks, n_heads = 2, 4
    # split_einsum: 2 einsums and a softmax per head, the 6 block projections as 1x1 convs
    assert split["einsum"] == 2 * n_heads * n_blocks
    assert split["softmax"] == n_heads * n_blocks
    assert split["conv"] == 6 * n_blocks
    # original: batched attention (2 matmuls, 1 softmax per block), no convs or einsums
    assert orig.get("einsum", 0) == 0 and orig.get("conv", 0) == 0
    assert orig["softmax"] == n_blocks and orig["matmul"] == 2 * n_blocks
    assert exports["student"][0]["ops"] == split


@pytest.mark.parametrize("quantize,limit", [("palettize4", 0.6), ("int8", 1.1)])
def test_compressed_size_per_parameter(wide_model, tmp_path, quantize, limit):
    summary = export_coreml(
        wide_model,
        tmp_path / f"{quantize}.mlpackage",
        quantize=quantize,
        attention="original",
        progress=False,
    )
    assert summary["params"] > 12_000_000
    assert summary["bytes_per_param"] <= limit, summary["bytes_per_param"]
    ops = count_ops(ct.utils.load_spec(summary["path"]))
    kind = "constexpr_lut_to_dense" if quantize == "palettize4" else "constexpr_affine_dequantize"
    assert any(k.startswith("constexpr_") for k in ops), (kind, ops)


def test_kmeans_lut_beats_uniform_grid():
    import numpy as np
    from fsdfm_mlx.convert.to_coreml import kmeans_lut

    w = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    lut, idx = kmeans_lut(4)(w)
    assert lut.shape == (16,) and idx.max() <= 15 and np.all(np.diff(lut) >= 0)
    err = np.mean((lut[idx] - w) ** 2)
    grid = np.linspace(w.min(), w.max(), 16)
    uniform = np.mean((grid[np.abs(w[:, None] - grid[None]).argmin(1)] - w) ** 2)
    assert err < 0.5 * uniform


# -- the CLI: bad input gives one line, exit 1, and writes nothing -------------------------------


def _app():
    app = typer.Typer()

    @app.callback()
    def main():  # a callback keeps export-coreml a named subcommand
        pass

    register(app)
    return app


def _cli(*argv):
    return CliRunner().invoke(_app(), ["export-coreml", *argv])


def _one_error_line(result):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "option,value,needle",
    [
        ("--quantize", "int3", "quantization"),
        ("--precision", "bfloat8", "precision"),
        ("--attention", "flash", "attention"),
        ("--min-deployment-target", "iOS12", "deployment target"),
        ("--compute-units", "gpu", "compute units"),
    ],
)
def test_cli_unknown_option_value(tmp_path, option, value, needle):
    out = tmp_path / "m.mlpackage"
    r = _cli("--model", str(FSDFM), "--config", FSDFM_CFG, "--output", str(out), option, value)
    _one_error_line(r)
    assert needle in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_int4_needs_ios18(tmp_path):
    out = tmp_path / "m.mlpackage"
    r = _cli("--model", str(FSDFM), "--config", FSDFM_CFG, "--output", str(out), "--quantize=int4")
    _one_error_line(r)
    assert list(tmp_path.iterdir()) == []


def test_cli_length_above_training_length(tmp_path):
    out = tmp_path / "m.mlpackage"
    r = _cli("--model", str(FSDFM), "--config", FSDFM_CFG, "--output", str(out), "--lengths=32,128")
    _one_error_line(r)
    assert "training length 64" in r.stderr and "--allow-longer" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_existing_output_needs_force(tmp_path, convert_cached):
    folder = convert_cached(DFM, config=DFM_CFG, dtype="float32")
    out = tmp_path / "m.mlpackage"
    out.mkdir()
    (out / "keep").write_text("old")
    r = _cli("--model", str(folder), "--output", str(out))
    _one_error_line(r)
    assert "already exists" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mlpackage"]
    assert (out / "keep").read_text() == "old"
    # --force (and a length above training with --allow-longer) replaces it, leaving no temp folder
    r = _cli(
        "--model", str(folder), "--output", str(out), "--force", "--length=80", "--allow-longer"
    )
    assert r.exit_code == 0, r.output
    assert "Core ML export" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mlpackage", "m.tokenizer"]
    assert not (out / "keep").exists()
    spec = ct.utils.load_spec(str(out))
    assert list(spec.description.input[0].type.multiArrayType.shape) == [1, 80]


def test_cli_missing_model_and_bad_checkpoint(tmp_path):
    out = tmp_path / "m.mlpackage"
    _one_error_line(_cli("--model", str(tmp_path / "nope.pth"), "--output", str(out)))
    _one_error_line(_cli("--model", str(FSDFM), "--weights", "bogus", "--output", str(out)))
    assert list(tmp_path.iterdir()) == []


def test_failure_midway_writes_nothing(tmp_path, monkeypatch):
    from fsdfm_mlx.convert import to_coreml

    def boom(mlmodel, quantize):
        raise RuntimeError("compression failed")

    monkeypatch.setattr(to_coreml, "_compress", boom)
    with pytest.raises(RuntimeError):
        _export(tmp_path / "m.mlpackage", FSDFM, config=FSDFM_CFG, length=16)
    assert list(tmp_path.iterdir()) == []


# -- the runner ----------------------------------------------------------------------------------


def test_runner_imports_without_coremltools_or_torch():
    code = (
        "import sys; sys.modules['coremltools'] = None; sys.modules['torch'] = None; "
        "import fsdfm_mlx.coreml_runner as r; print(r.PARITY_THRESHOLDS['float16'])"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "0.05"


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the non-macOS error")
def test_runner_refuses_off_macos(exports):
    from fsdfm_mlx.coreml_runner import CoreMLModel, check_parity

    with pytest.raises(RuntimeError, match="only on macOS"):
        CoreMLModel(exports["student"][0]["path"])
    with pytest.raises(RuntimeError, match="only on macOS"):
        check_parity(exports["student"][0]["path"], "unused")


@on_macos
def test_macos_package_runs_and_matches_mlx(tmp_path, stepped_checkpoints, convert_cached):
    import numpy as np

    from fsdfm_mlx.coreml_runner import CoreMLModel, check_parity

    folder = convert_cached(
        stepped_checkpoints["fsdfm"], weights="student", config=FSDFM_CFG, dtype="float32"
    )
    for precision, attention in (("float16", "split_einsum"), ("float32", "original")):
        pkg = tmp_path / f"{precision}-{attention}.mlpackage"
        export_coreml(
            str(folder),
            str(pkg),
            lengths=[32, 64],
            precision=precision,
            attention=attention,
            progress=False,
        )
        for length in (32, 64):
            res = check_parity(pkg, folder, length=length)
            assert res["max_abs_diff"] <= res["threshold"]
        cm = CoreMLModel(pkg)
        logits = cm(np.zeros((1, 32), np.int32), 0.5, 0.125)
        assert logits.shape == (1, 32, 1000)
