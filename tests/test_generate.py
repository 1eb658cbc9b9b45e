"""The generation layers (generate_step -> stream_generate -> generate) and the generate command."""

from __future__ import annotations

import json
import sys

import mlx.core as mx
import numpy as np
import pytest
import typer
from fsdfm_mlx.cli.generate import register
from typer.testing import CliRunner

import fsdfm_mlx
from fsdfm_mlx.generate import (
    GenerationResponse,
    generate,
    generate_step,
    save_tokens,
    stream_generate,
)
from fsdfm_mlx.solvers import uniform_time_grid


@pytest.fixture(scope="module")
def loaded(micro_models):
    """name -> (model, tokenizer) for the converted micro models."""
    return {name: fsdfm_mlx.load(path) for name, path in micro_models.items()}


@pytest.fixture(scope="module")
def student(loaded):
    return loaded["uniform-student"]


# ----------------------------------------------------------------------------------------------
# generate_step
# ----------------------------------------------------------------------------------------------


def test_generate_step_states(student):
    model, _ = student
    states = list(generate_step(model, batch_size=3, steps=4, seed=0))
    grid = uniform_time_grid(4)
    assert [s.step for s in states] == [1, 2, 3, 4]
    assert all(s.steps == 4 for s in states)
    np.testing.assert_allclose([s.t for s in states], grid[:-1])
    np.testing.assert_allclose([s.h for s in states], np.diff(grid))
    prev = None
    last = np.zeros((3, 5), dtype=np.int32)
    for s in states:
        assert s.tokens.shape == (3, model.args.length) and s.tokens.dtype == mx.int32
        changed = np.array(s.changed)
        assert changed.dtype == bool
        if prev is not None:
            np.testing.assert_array_equal(changed, np.array(s.tokens) != prev)
        last = np.where(changed, s.step, last)
        np.testing.assert_array_equal(np.array(s.last_changed), last)
        assert s.model_ms is None and s.sampler_ms is None and s.step_ms > 0
        prev = np.array(s.tokens)


def test_generate_step_defaults_and_time_grid(loaded):
    model, _ = loaded["mask-student"]
    states = list(generate_step(model, seed=0))
    assert len(states) == model.args.default_steps == 8
    assert states[0].tokens.shape == (1, model.args.length)
    grid = [0.0, 0.1, 0.5, 1.0]
    states = list(generate_step(model, time_grid=grid, seed=0, profile=True))
    np.testing.assert_allclose([s.t for s in states], grid[:-1], rtol=1e-6)
    assert all(s.model_ms > 0 and s.sampler_ms > 0 for s in states)
    # a mask source with an FS-DFM solver leaves no mask behind
    assert int(np.array(states[-1].tokens).max()) < model.args.vocab_size


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(steps=0), "steps must be a positive integer"),
        (dict(steps=-3), "steps must be a positive integer"),
        (dict(length=0), "length must be a positive integer"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(prompt_tokens=[1, 2, 3], suffix_tokens=[4, 5, 6]), "do not fit in length 5"),
        (dict(prompt_tokens=[12]), "outside the model's vocabulary"),
        (dict(solver="heun"), "unknown solver 'heun'"),
        (dict(solver="dfm_euler"), "needs a model without step-size conditioning"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=0), "top_k must be an integer >= 1"),
        (dict(temp=-1.0), "temperature must be >= 0"),
        (dict(steps=4, time_grid=[0.0, 1.0]), "either steps or time_grid"),
        (dict(time_grid=[0.0, 0.7, 0.3, 1.0]), "strictly increasing"),
        (dict(seed=-1), "seed must be a non-negative integer"),
    ],
)
def test_generate_step_validation(student, kwargs, message):
    model, _ = student
    with pytest.raises(ValueError, match=message):
        generate_step(model, **kwargs)  # raised at the call, before any iteration


@pytest.mark.parametrize("solver", ["mixture_euler", "mixture_euler_with_cumulative_scalar"])
def test_student_solver_on_teacher_is_refused(loaded, solver):
    model, _ = loaded["uniform-teacher"]
    with pytest.raises(ValueError, match=f"solver {solver} needs a step-size conditioned model"):
        generate_step(model, solver=solver)


# ----------------------------------------------------------------------------------------------
# stream_generate / generate
# ----------------------------------------------------------------------------------------------


def test_stream_generate_responses(student):
    model, tokenizer = student
    responses = list(
        stream_generate(model, tokenizer, "#", "$", batch_size=2, steps=3, seed=5, profile=True)
    )
    assert len(responses) == 3
    r = responses[-1]
    assert isinstance(r, GenerationResponse)
    assert r.finished and not responses[0].finished
    assert r.step == r.steps == 3 and r.seed == 5 and r.solver == model.args.default_solver
    assert isinstance(r.text, list) and len(r.text) == 2
    assert all(text.startswith("#") and text.endswith("$") for text in r.text)
    tokens = np.array(r.tokens)
    assert tokens.shape == (2, 5) and (tokens[:, 0] == 2).all() and (tokens[:, -1] == 3).all()
    assert r.text == [tokenizer.decode(row) for row in tokens.tolist()]
    assert r.model_ms > 0 and r.sampler_ms > 0 and r.step_ms >= r.model_ms
    assert r.tokens_per_sec > 0 and r.elapsed_s > 0 and r.peak_memory > 0
    assert r.elapsed_s >= responses[0].elapsed_s
    assert np.array(r.last_changed).max() <= 3


def test_generate_returns_text(loaded):
    model, tokenizer = loaded["mask-student"]
    one = generate(model, tokenizer, prompt="#", steps=2, seed=1)
    assert isinstance(one, str) and one.startswith("#")
    assert one == generate(model, tokenizer, prompt="#", steps=2, seed=1)
    many = generate(model, tokenizer, steps=2, seed=1, batch_size=3)
    assert isinstance(many, list) and len(many) == 3 and all(isinstance(t, str) for t in many)


def test_generate_verbose_prints_summary(student, capsys):
    model, tokenizer = student
    text = generate(model, tokenizer, steps=2, seed=1, verbose=True, profile=True)
    out = capsys.readouterr().out
    assert text in out
    assert "tokens/s" in out and "ms model" in out and "peak memory" in out


def test_save_tokens_atomic_and_no_overwrite(tmp_path):
    path = tmp_path / "ids.npy"
    save_tokens(path, mx.array([[1, 2, 3]]))
    with pytest.raises(FileExistsError):
        save_tokens(path, mx.array([[4, 5, 6]]))
    np.testing.assert_array_equal(np.load(path), [[1, 2, 3]])
    save_tokens(path, mx.array([[4, 5, 6]]), force=True)
    arr = np.load(path)
    assert arr.dtype == np.int32 and arr.tolist() == [[4, 5, 6]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.npy"]  # no temp file left


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()
    register(app)

    @app.command()
    def other():  # a second command, so that "generate" must be named as in the real app
        pass

    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["generate", *map(str, args)])


def _assert_clean_error(result, text):
    assert result.exit_code != 0
    assert result.stderr.startswith("Error: ") and text in result.stderr
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_prints_text_and_summary(cli, micro_models):
    result = cli(
        "--model",
        micro_models["uniform-student"],
        "--steps",
        2,
        "--seed",
        0,
        "--prompt",
        "#",
        "--batch-size",
        2,
        "--verbose",
    )
    assert result.exit_code == 0, result.output
    assert "=== sample 1 ===" in result.stdout
    assert "2 x 5 tokens, 2 steps" in result.stdout and "ms sampler" in result.stdout
    assert "step 2/2" in result.stderr


def test_cli_json_and_tokens_out(cli, micro_models, tmp_path):
    out = tmp_path / "ids.npy"
    args = (
        "--model",
        micro_models["mask-student"],
        "--steps",
        3,
        "--seed",
        4,
        "--batch-size",
        2,
        "--json",
        "--tokens-out",
        out,
    )
    result = cli(*args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["steps"] == 3 and data["seed"] == 4 and len(data["texts"]) == 2
    assert len(data["per_step"]) == 3 and data["sampler_ms_per_step"] > 0
    ids = np.load(out)
    assert ids.dtype == np.int32 and ids.shape == (2, 5)
    assert ids.tolist() == data["tokens"]
    # refuses to overwrite, then --force does
    again = cli(*args)
    _assert_clean_error(again, "exists")
    assert np.load(out).tolist() == data["tokens"]
    forced = cli(*args, "--force", "--seed", 9)
    assert forced.exit_code == 0, forced.output
    assert np.load(out).tolist() == json.loads(forced.stdout)["tokens"]


def test_cli_visual_and_html(cli, micro_models, tmp_path):
    html = tmp_path / "view.html"
    result = cli(
        "--model",
        micro_models["uniform-teacher"],
        "--steps",
        4,
        "--seed",
        0,
        "--visual",
        "--html",
        html,
        "--suffix",
        "$",
    )
    assert result.exit_code == 0, result.output
    assert "last changed at step" in result.stdout
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>") and "last changed at step" in page


@pytest.mark.parametrize(
    "args,text",
    [
        (("--steps", 0), "steps must be a positive integer"),
        (("--top-p", 2), "top_p must be in (0, 1]"),
        (("--top-k", 0), "top_k must be an integer >= 1"),
        (("--solver", "dfm_euler"), "needs a model without step-size conditioning"),
        (("--length", 1, "--prompt", "#", "--suffix", "$"), "do not fit in length 1"),
        (("--blocks-per-eval", "-1"), "blocks_per_eval must be a non-negative integer"),
    ],
)
def test_cli_bad_input_is_one_line(cli, micro_models, args, text):
    if args:
        args = ("--model", micro_models["uniform-student"], *args)
    result = cli(*args)
    _assert_clean_error(result, text)
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_default_model_is_shipped_and_writes_text(cli):
    """No --model: the Shakespeare student inside the package writes a passage (no download)."""
    import json

    import fsdfm_mlx

    assert (fsdfm_mlx.default_model_path() / "model.safetensors").exists()
    result = cli("--seed", "0", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    text = out["texts"][0] if "texts" in out else out["text"][0]
    assert len(text) > 200  # 128 GPT-2 tokens of English-like text
    words = text.split()
    assert sum(w.strip(".,;:!?'\"-[]").isalpha() for w in words) > 0.6 * len(words)


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the message shown off macOS")
def test_cli_coreml_off_macos_is_refused_with_the_reason(cli, tmp_path):
    result = cli("--coreml", tmp_path / "Model.mlpackage", "--check")
    _assert_clean_error(result, "only on macOS")


def test_cli_missing_model_folder(cli, tmp_path):
    _assert_clean_error(cli("--model", tmp_path / "nothing-here"), "no such model folder")


def test_cli_student_solver_on_teacher(cli, micro_models):
    result = cli("--model", micro_models["mask-teacher"], "--solver", "mixture_euler")
    _assert_clean_error(result, "solver mixture_euler needs a step-size conditioned model")


def test_compiled_forward_follows_new_weights_and_frees_the_model(micro_models):
    import gc
    import weakref

    from mlx.utils import tree_map

    from fsdfm_mlx.generate import compiled_forward

    model, _ = fsdfm_mlx.load(micro_models["uniform-student"])
    x = mx.zeros((2, 5), mx.int32)
    t = mx.array([0.2, 0.7])
    fwd = compiled_forward(model)
    assert compiled_forward(model) is fwd  # cached
    assert mx.allclose(fwd(x, t, t), model(x, t, t), atol=1e-5)
    # new parameter arrays (as load_weights makes): the compiled forward is rebuilt and uses them
    model.update(tree_map(lambda p: p * 0.5, model.parameters()))
    fwd2 = compiled_forward(model)
    assert fwd2 is not fwd
    assert mx.allclose(fwd2(x, t, t), model(x, t, t), atol=1e-5)
    # the cache never keeps a model alive (no reference cycle: freed without the garbage collector)
    gc.disable()
    try:
        other, _ = fsdfm_mlx.load(micro_models["uniform-student"])
        compiled_forward(other)(x, t, t)
        ref = weakref.ref(other)
        del other
        assert ref() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("student", [True, False])
@pytest.mark.parametrize("compile", [True, False])
def test_blocks_per_eval_forward_is_the_same_function(student, compile):
    """Queuing the blocks a few at a time (less GPU memory in flight) changes no logit."""
    from fsdfm_mlx.generate import make_forward
    from fsdfm_mlx.profile import random_model

    shape = {"hidden_size": 64, "cond_dim": 32, "n_blocks": 5, "n_heads": 4}
    m = random_model(shape, length=16, vocab_size=300, dt_conditioned=student, dtype="float32")
    tokens = mx.random.randint(0, 300, (2, 16), key=mx.random.key(0))
    t, dt = mx.array([0.2, 0.7]), mx.array([0.125, 0.125])
    args = (tokens, t, dt) if student else (tokens, t)
    ref = m(*args)
    for n in (1, 2, 3, 4):
        got = make_forward(m, compile=compile, blocks_per_eval=n)(*args)
        assert got.shape == ref.shape == (2, 16, 300)
        if mx.default_device().type == mx.cpu:
            assert mx.array_equal(got, ref).item(), n
        else:  # a GPU may fuse the elementwise work of the pieces differently (float rounding)
            assert mx.allclose(got, ref, rtol=1e-4, atol=1e-4).item(), n


def test_blocks_per_eval_generation_and_checks():
    from fsdfm_mlx.generate import default_blocks_per_eval
    from fsdfm_mlx.profile import random_model

    shape = {"hidden_size": 64, "cond_dim": 32, "n_blocks": 3, "n_heads": 4}
    m = random_model(shape, length=16, vocab_size=300, dtype="float32")
    runs = [
        [np.array(s.tokens) for s in generate_step(m, steps=4, seed=5, blocks_per_eval=n)]
        for n in (None, 0, 1, 2)
    ]
    on_cpu = mx.default_device().type == mx.cpu
    for other in runs[1:] if on_cpu else ():  # a GPU may round differently (see above)
        assert all((a == b).all() for a, b in zip(runs[0], other, strict=True))
    # CPU: buffers are freed as they are used; GPU: 2 blocks at a time for a dense model
    assert default_blocks_per_eval(m) == (0 if on_cpu else 2)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="blocks_per_eval"):
            generate_step(m, steps=2, blocks_per_eval=bad)


def test_checkpoint_weights_round_trip():
    """checkpoint_weights drops the output rows' padding; sanitize puts it back."""
    from fsdfm_mlx.convert.checkpoint import expected_shapes

    from fsdfm_mlx.profile import random_model

    shape = {"hidden_size": 64, "cond_dim": 32, "n_blocks": 2, "n_heads": 4}
    m = random_model(shape, length=16, vocab_size=300, dtype="float32")
    w = m.checkpoint_weights()
    assert {k: tuple(v.shape) for k, v in w.items()} == expected_shapes(m.args)
    m2 = random_model(shape, length=16, vocab_size=300, dtype="float32")
    m2.load_weights(list(m2.sanitize(w).items()), strict=True)
    tokens = mx.random.randint(0, 300, (1, 16), key=mx.random.key(1))
    t = mx.array([0.4])
    assert mx.array_equal(m(tokens, t, t), m2(tokens, t, t)).item()


def test_default_temp_is_the_models_unless_given(student):
    """``temp=None`` samples at the config's ``default_temp``; an explicit ``--temp`` wins."""
    model, tokenizer = student
    assert model.args.default_temp == 1.0  # converted without --default-temp

    def tokens(**kw):
        states = list(generate_step(model, batch_size=4, steps=4, seed=11, **kw))
        return np.array(states[-1].tokens)

    plain, cold = tokens(), tokens(temp=0.0)  # argmax: differs on this peaked micro model
    assert (plain == tokens(temp=1.0)).all() and not (plain == cold).all()
    model.args.default_temp = 0.0
    try:
        assert (tokens() == cold).all() and (tokens(temp=1.0) == plain).all()
        r = list(stream_generate(model, tokenizer, batch_size=4, steps=4, seed=11))[-1]
        assert r.temp == 0.0 and (np.array(r.tokens) == cold).all()
        r1 = list(stream_generate(model, tokenizer, batch_size=4, steps=4, seed=11, temp=1.0))
        assert r1[-1].temp == 1.0
    finally:
        model.args.default_temp = 1.0


def test_summary_names_a_non_default_temperature(student):
    from fsdfm_mlx.generate import format_summary, summary

    model, tokenizer = student
    r = list(stream_generate(model, tokenizer, steps=2, seed=1, temp=0.5))[-1]
    assert summary(r)["temp"] == 0.5 and "at temperature 0.5" in format_summary(r)
    r = list(stream_generate(model, tokenizer, steps=2, seed=1))[-1]
    assert summary(r)["temp"] == 1.0 and "temperature" not in format_summary(r)


def test_shipped_model_samples_at_its_default_temperature():
    """The shipped demo student's config asks for 0.8 (see its README and the main README)."""
    model, _ = fsdfm_mlx.load(fsdfm_mlx.default_model_path())
    assert model.args.default_temp == 0.8
