"""Generative perplexity / entropy (fsdfm_mlx.evaluate) and the ``eval`` command."""

# ruff: noqa: I001  (fsdfm_mlx before mlx.core: it loads the fast CPU BLAS)

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsdfm_mlx
import mlx.core as mx
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from fsdfm_mlx.cli.evaluate import register
from fsdfm_mlx.evaluate import (
    evaluate,
    load_evaluator,
    load_reference,
    perplexities,
    token_entropy_bits,
)

GPT2_ASSETS = Path(fsdfm_mlx.__file__).parent / "assets" / "gpt2"
EOS = 50256  # the GPT-2 tokenizer's BOS/EOS


@pytest.fixture(scope="module")
def tiny_evaluator(tmp_path_factory):
    """A random 2-layer llama in mlx-lm format with the GPT-2 tokenizer (vocab 50257)."""
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model

    config = {
        "model_type": "llama",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": 50257,
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
    }
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    path = tmp_path_factory.mktemp("evaluator")
    save_model(path, model)
    save_config(dict(config), path / "config.json")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copyfile(GPT2_ASSETS / name, path / name)
    return path


@pytest.fixture(scope="module")
def evaluator(tiny_evaluator):
    return load_evaluator(str(tiny_evaluator))


# ----------------------------------------------------------------------------------------------
# the math
# ----------------------------------------------------------------------------------------------


def test_entropy_of_hand_made_histograms():
    rows = np.array(
        [
            [3, 3, 3, 3, 3, 3, 3, 3],  # one id: 0 bits
            [0, 1, 2, 3, 4, 5, 6, 7],  # 8 ids once each: log2 8
            [5, 9, 5, 9, 5, 9, 5, 9],  # 2 ids equally: 1 bit
            [1, 1, 1, 1, 1, 1, 2, 3],  # p = 3/4, 1/8, 1/8
        ]
    )
    want = [0.0, 3.0, 1.0, -(0.75 * np.log2(0.75) + 2 * 0.125 * np.log2(0.125))]
    np.testing.assert_allclose(token_entropy_bits(rows), want, atol=1e-12)
    for k in (1, 2, 5, 12):
        ids = np.tile(np.arange(k), 6)[None]
        np.testing.assert_allclose(token_entropy_bits(ids), [np.log2(k)], atol=1e-12)


def _direct_ppl(model, tokens, context):
    """exp(mean NLL) per row, from the evaluator's logits with numpy (float64)."""
    inputs = np.concatenate([np.full((tokens.shape[0], 1), context), tokens[:, :-1]], axis=1)
    logits = np.array(model(mx.array(inputs)).astype(mx.float32), dtype=np.float64)
    m = logits.max(-1, keepdims=True)
    logp = logits - (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))
    nll = -np.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return np.exp(nll.mean(-1))


def test_perplexity_matches_logits(evaluator):
    model, tok = evaluator
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50257, size=(3, 20))
    got = perplexities(model, tokens, context_token=tok.eos_token_id)
    np.testing.assert_allclose(got, _direct_ppl(model, tokens, EOS), rtol=1e-4)
    # without a context token only tokens 2..L are scored
    got = perplexities(model, tokens, context_token=None)
    want = _direct_ppl(model, tokens[:, 1:], tokens[0, 0])  # same context for row 0 only
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4)


def test_perplexity_refuses_bad_ids_and_long_rows(evaluator):
    model, _ = evaluator
    with pytest.raises(ValueError, match="outside the evaluator's vocabulary"):
        perplexities(model, np.array([[1, 50257]]), context_token=EOS)
    with pytest.raises(ValueError, match="do not fit the evaluator's context of 64"):
        perplexities(model, np.zeros((1, 65), np.int32), context_token=EOS)


def test_reference_windows(tmp_path):
    ids = np.arange(100, dtype=np.uint16)
    np.save(tmp_path / "ids.npy", ids)
    win = load_reference(tmp_path / "ids.npy", None, 3, 10)
    assert win.shape == (3, 10) and win.dtype == np.int32
    assert win[:, 0].tolist() == [0, 45, 90] and win[2, -1] == 99
    with pytest.raises(ValueError, match="fewer than the length"):
        load_reference(tmp_path / "ids.npy", None, 3, 101)
    with pytest.raises(FileNotFoundError):
        load_reference(tmp_path / "nothing.npy", None, 3, 10)


def test_missing_evaluator_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot load the evaluator") as e:
        load_evaluator(str(tmp_path / "no-such-evaluator"))
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------------------


def test_evaluate_micro_model(micro_models, evaluator, tmp_path):
    model, _ = fsdfm_mlx.load(micro_models["uniform-student"])
    np.save(tmp_path / "ref.npy", np.arange(40) % 12)
    kw = dict(num_samples=5, batch_size=2, seed=3, evaluator=evaluator, progress=False)
    res = evaluate(model, steps=(1, 4), reference_text=tmp_path / "ref.npy", **kw)
    assert [r["steps"] for r in res["rows"]] == [1, 4]
    assert res["length"] == 5 and res["ranks"] == 1
    for row in res["rows"]:
        assert row["samples"] == 5 and len(row["ppl"]) == 5
        assert row["gen_ppl"] == pytest.approx(np.mean(row["ppl"]))
        assert 0 <= row["entropy_bits"] <= np.log2(5) + 1e-9
        assert row["seconds"] > 0 and row["tokens_per_sec"] > 0
    ref = res["reference"]
    assert ref["samples"] == 5 and ref["gen_ppl"] > 1
    # the same seeds give the same figures, and the samples are the generate layer's chunks
    again = evaluate(model, steps=4, **kw)
    assert again["rows"][0]["ppl"] == res["rows"][1]["ppl"]
    from fsdfm_mlx.distributed import generate_tokens

    toks = generate_tokens(model, num_samples=5, batch_size=2, seed=3, steps=4)
    ppl = perplexities(evaluator[0], toks, context_token=EOS)
    np.testing.assert_allclose(res["rows"][1]["ppl"], ppl, rtol=1e-5)
    np.testing.assert_allclose(res["rows"][1]["entropy"], token_entropy_bits(toks), rtol=1e-6)


def test_evaluate_passes_sampling_options(micro_models, evaluator):
    model, _ = fsdfm_mlx.load(micro_models["uniform-student"])
    kw = dict(num_samples=4, batch_size=2, seed=3, evaluator=evaluator, progress=False, steps=4)
    from fsdfm_mlx.distributed import generate_tokens

    res = evaluate(model, temp=0.5, top_k=3, **kw)
    assert res["sampling"] == {"temp": 0.5, "top_k": 3, "top_p": 1.0}
    toks = generate_tokens(model, num_samples=4, batch_size=2, seed=3, steps=4, temp=0.5, top_k=3)
    plain = generate_tokens(model, num_samples=4, batch_size=2, seed=3, steps=4)
    assert not np.array_equal(toks, plain)  # the options change the samples ...
    np.testing.assert_allclose(res["rows"][0]["entropy"], token_entropy_bits(toks), rtol=1e-6)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        evaluate(model, temp=-1.0, **kw)  # ... and bad values are refused before any work
    # no temp: the model's default_temp, recorded as the temperature used
    model.args.default_temp = 0.5
    res = evaluate(model, top_k=3, **kw)
    assert res["sampling"] == {"temp": 0.5, "top_k": 3, "top_p": 1.0}
    np.testing.assert_allclose(res["rows"][0]["entropy"], token_entropy_bits(toks), rtol=1e-6)


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()
    register(app)

    @app.command()
    def other():
        pass

    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["eval", *map(str, args)])


def test_cli_json_and_table(cli, micro_models, tiny_evaluator, tmp_path):
    out = tmp_path / "res.json"
    base = ("--model", micro_models["mask-student"], "--evaluator", tiny_evaluator)
    args = (*base, "--steps", "2,8", "--num-samples", 3, "--batch-size", 2)
    result = cli(*args, "--json", "--out", out)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["steps"] for r in data["rows"]] == [2, 8] and data["num_samples"] == 3
    assert json.loads(out.read_text()) == data
    table = cli(*args)
    assert table.exit_code == 0, table.output
    assert "gen ppl" in table.stdout and "entropy" in table.stdout
    cooled = cli(*args, "--temp", 0.7, "--json")
    assert cooled.exit_code == 0, cooled.output
    assert json.loads(cooled.stdout)["sampling"] == {"temp": 0.7, "top_k": None, "top_p": 1.0}
    table = cli(*args, "--temp", 0.7)
    assert table.exit_code == 0, table.output
    assert "temp 0.7" in " ".join(table.stdout.split())  # the title may wrap on a narrow terminal


@pytest.mark.parametrize(
    "args,text",
    [
        (("--steps", "1,x"), "--steps must be comma-separated integers"),
        (("--steps", "0"), "--steps must be positive"),
        (("--num-samples", 0), "num_samples must be a positive integer"),
        (("--solver", "dfm_euler"), "needs a model without step-size conditioning"),
        (("--reference", "nothing.npy"), "no reference text at"),
        (("--evaluator", "/no/such/evaluator"), "cannot load the evaluator"),
        (("--top-p", 0), "top_p must be in (0, 1]"),
    ],
)
def test_cli_bad_input_is_one_line(cli, micro_models, tiny_evaluator, args, text):
    base = ("--model", micro_models["uniform-student"], "--evaluator", tiny_evaluator)
    result = cli(*base, "--num-samples", 2, "--steps", "1", *args)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and text in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_without_model(cli, tiny_evaluator):
    result = cli("--evaluator", tiny_evaluator)
    assert result.exit_code == 1 and result.stderr.startswith("Error: ")
