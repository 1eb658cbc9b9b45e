"""fsdfm_mlx.profile and ``fsdfm-mlx profile`` on a tiny random model (fields, not speed)."""

from __future__ import annotations

import json
import math

import fsdfm_mlx  # noqa: F401  (MKL before mlx.core)

# isort: split
import mlx.core as mx
import pytest
from fsdfm_mlx.cli.main import app
from typer.testing import CliRunner

from fsdfm_mlx.profile import (
    APPLE_SILICON,
    apple_silicon_estimate,
    dfm_baseline,
    profile,
    random_model,
)

TINY = {"hidden_size": 64, "cond_dim": 32, "n_blocks": 2, "n_heads": 4, "vocab_size": 1000}
L = 32
ROW_FIELDS = (
    "steps",
    "latency_s",
    "latency_min_s",
    "warmup_s",
    "tokens_per_s",
    "model_ms_per_step",
    "sampler_ms_per_step",
    "model_tflops",
    "peak_memory_bytes",
    "speedup_vs_ar",
    "speedup_vs_dfm",
)


@pytest.fixture(scope="module")
def result():
    return profile(
        preset=TINY,
        steps=[1, 2],
        length=L,
        batch_size=2,
        repeats=2,
        baseline_steps=16,
        progress=False,
    )


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A converted-style model folder (config.json + safetensors) with random weights."""
    d = tmp_path_factory.mktemp("tiny")
    model = random_model(TINY, length=L, dtype="float32")
    config = {"model_type": "fsdfm", **TINY, "dt_conditioned": True, "length": L}
    (d / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(d / "model.safetensors"), model.checkpoint_weights())
    return d


def test_profile_rows(result):
    assert [r["steps"] for r in result["results"]] == [1, 2]
    for r in result["results"]:
        for k in ROW_FIELDS:
            assert k in r, k
        assert math.isclose(r["tokens_per_s"], 2 * L / r["latency_s"], rel_tol=1e-9)
        assert r["latency_min_s"] <= r["latency_s"]
        assert r["model_ms_per_step"] > 0 and r["sampler_ms_per_step"] > 0
    cfg = result["config"]
    assert cfg["batch_size"] == 2 and cfg["length"] == L and cfg["dtype"] == "float32"
    assert cfg["solver"] == "mixture_euler_with_cumulative_scalar"


def test_profile_baselines_and_ratios(result):
    dfm, ar = result["baselines"]["dfm"], result["baselines"]["ar"]
    assert dfm["steps"] == 16 and dfm["solver"] == "dfm_euler" and "extrapolated_from_steps" in dfm
    assert ar["new_tokens_per_sequence"] == L and ar["params"] > 0
    for r in result["results"]:
        assert math.isclose(r["speedup_vs_ar"], ar["latency_s"] / r["latency_s"])
        assert math.isclose(r["speedup_vs_dfm"], dfm["latency_s"] / r["latency_s"])


def test_profile_json_serialisable(result):
    again = json.loads(json.dumps(result))
    assert again["results"][0]["steps"] == 1


def test_dfm_baseline_extrapolates_over_budget():
    args = random_model(TINY, length=L).args
    out = dfm_baseline(args, steps=64, length=L, budget_s=1e-9)
    assert out["extrapolated_from_steps"] == 8
    assert "extrapolated" in out["note"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"preset": "999m"},
        {"preset": TINY, "steps": [0]},
        {"preset": TINY, "steps": "a,b"},
        {"preset": TINY, "length": 0},
        {"preset": TINY, "dtype": "float64"},
        {"preset": TINY, "quantize": 7},
        {"preset": TINY, "solver": "dfm_euler"},
    ],
)
def test_profile_bad_input(kwargs):
    with pytest.raises(ValueError):
        profile(progress=False, baselines=False, **kwargs)


def test_apple_silicon_estimate():
    est = apple_silicon_estimate("1.3b", 8, 1024, 1)
    assert est["label"].startswith("ESTIMATE")
    assert [r["chip"] for r in est["chips"]] == list(APPLE_SILICON)
    for r in est["chips"]:
        assert r["upper_bound"]["tokens_per_s"] >= r["estimate"]["tokens_per_s"] > 0
    json.dumps(est)
    # more steps, proportionally fewer tokens/s
    est16 = apple_silicon_estimate("1.3b", 16, 1024, 1)
    a, b = est["chips"][0]["estimate"], est16["chips"][0]["estimate"]
    assert math.isclose(a["tokens_per_s"], 2 * b["tokens_per_s"])


def _cli(*args):
    return CliRunner().invoke(app, ["profile", *args], env={"COLUMNS": "200"})


def test_cli_json(tiny_folder):
    r = _cli(
        "--model",
        str(tiny_folder),
        "--steps",
        "1,2",
        "--length",
        str(L),
        "--repeats",
        "1",
        "--baseline-steps",
        "8",
        "--json",
        "--estimate",
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert [row["steps"] for row in res["results"]] == [1, 2]
    assert res["baselines"]["dfm"]["steps"] == 8
    assert res["apple_silicon_estimate"][0]["label"].startswith("ESTIMATE")
    assert res["config"]["lookahead"] is True


def test_cli_no_lookahead(tiny_folder):
    r = _cli(
        "--model", str(tiny_folder), "--steps", "2", "--length", str(L), "--repeats", "1",
        "--no-baselines", "--no-lookahead", "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["config"]["lookahead"] is False
    assert res["results"][0]["peak_memory_bytes"] > 0


def test_cli_table(tiny_folder):
    r = _cli(
        "--model",
        str(tiny_folder),
        "--steps",
        "2",
        "--length",
        str(L),
        "--repeats",
        "1",
        "--no-baselines",
        "--estimate",
    )
    assert r.exit_code == 0, r.output
    assert "tokens/s" in r.stdout and "ESTIMATE" in r.stdout


def test_cli_plot(tiny_folder, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "p.png"
    r = _cli(
        "--model",
        str(tiny_folder),
        "--steps",
        "1,2",
        "--length",
        str(L),
        "--repeats",
        "1",
        "--baseline-steps",
        "8",
        "--plot",
        str(png),
    )
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_plot_without_matplotlib(tiny_folder, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    r = _cli(
        "--model",
        str(tiny_folder),
        "--steps",
        "1",
        "--length",
        str(L),
        "--no-baselines",
        "--plot",
        str(tmp_path / "p.png"),
    )
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines() == [
        "Error: --plot needs matplotlib: pip install matplotlib"
    ]


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--preset", "999m"],
        ["--preset", "170m", "--steps", "0"],
        ["--preset", "170m", "--steps", "x"],
        ["--preset", "170m", "--dtype", "float64"],
        ["--preset", "170m", "--length", "-1"],
        ["--model", "/nonexistent/folder/x"],
    ],
)
def test_cli_bad_input(args):
    r = _cli(*args, "--no-baselines")
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert "Traceback" not in r.output
