"""Sample quality as the FS-DFM paper measures it: generative perplexity and token entropy.

For every step count, ``num_samples`` passages are generated (fixed seeds) and scored:

* generative perplexity: ``exp(mean NLL)`` of each passage's tokens under an autoregressive evaluator
  (GPT-2 Large in the paper), averaged over passages. The evaluator's BOS token (else its EOS) is put
  in front as context, so every token of the passage is scored.
* entropy: the Shannon entropy, in bits, of each passage's token-id histogram, averaged. Very low
  entropy (repetition) can hide behind a good perplexity, hence both.

The evaluator reads the FS-DFM token ids directly, so it must use the same tokenizer (GPT-2's for the
official models). A ``reference`` row gives the same figures for held-out real text.

Passages come in chunks of ``batch_size`` with seeds from :func:`fsdfm_mlx.distributed.chunk_seed`;
under ``mlx.launch`` the chunks (generation and scoring) are shared among the ranks and the result
does not depend on how many there are.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import distributed

DEFAULT_EVALUATOR = "gpt2-large"
_EVALUATOR_ALIASES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
_LOGITS_BUDGET = 2**27  # float32 logits held at once while scoring (512 MB)


def token_entropy_bits(tokens) -> np.ndarray:
    """Shannon entropy (bits) of each row's token-id histogram.

    Args:
        tokens: [B, L] integer token ids.

    Returns:
        [B] float64 entropies; ``k`` distinct ids used equally often give ``log2(k)``.
    """
    arr = np.asarray(tokens)
    if arr.ndim != 2:
        raise ValueError(f"tokens must be [B, L], got shape {arr.shape}")
    out = np.zeros(arr.shape[0])
    for b, row in enumerate(arr):
        _, counts = np.unique(row, return_counts=True)
        p = counts / counts.sum()
        out[b] = float(-(p * np.log2(p)).sum())
    return out


def load_evaluator(path_or_repo: str = DEFAULT_EVALUATOR):
    """Load an autoregressive evaluator with ``mlx_lm.load`` (dense weights on a CPU device).

    Args:
        path_or_repo: an mlx-lm model folder or Hugging Face repo id (``gpt2-large`` and the other
            GPT-2 names resolve to ``openai-community/...``).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        FileNotFoundError: the evaluator cannot be found or loaded (e.g. offline, not in the cache).
    """
    import mlx_lm

    name = str(path_or_repo)
    repo = _EVALUATOR_ALIASES.get(name, name)
    try:
        model, tokenizer = mlx_lm.load(repo)
    except Exception as e:  # hub, file and config errors all mean "no usable evaluator here"
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FileNotFoundError(
            f"cannot load the evaluator {name!r} with mlx_lm.load ({detail}); give --evaluator a "
            "local mlx-lm model folder, or a Hugging Face repo that is cached or reachable online"
        ) from None
    if mx.default_device().type == mx.cpu:
        from mlx_lm.utils import dequantize_model

        # quantized matmuls on MLX's CPU backend are far slower than dense float32 ones
        model = dequantize_model(model)
    model.eval()
    return model, tokenizer


def _context_token(tokenizer) -> int | None:
    for name in ("bos_token_id", "eos_token_id"):
        tok = getattr(tokenizer, name, None)
        if isinstance(tok, int):
            return tok
    return None


def _max_positions(model) -> int | None:
    args = getattr(model, "args", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(args, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def sample_nll(evaluator, tokens, *, context_token: int | None) -> np.ndarray:
    """Mean negative log-likelihood (nats) of each row's tokens under ``evaluator``.

    Args:
        evaluator: an mlx-lm causal LM, ``model(ids [B, T]) -> logits [B, T, V]``.
        tokens: [B, L] token ids in the evaluator's vocabulary.
        context_token: id put in front as context so that all L tokens are scored; None scores
            tokens 2..L, each given the ones before it.

    Returns:
        [B] float64 mean NLL per row.

    Raises:
        ValueError: an id outside the evaluator's vocabulary, or rows longer than its context.
    """
    arr = np.asarray(tokens).astype(np.int32)
    B, L = arr.shape
    if context_token is None:
        if L < 2:
            raise ValueError("without a BOS/EOS context token, samples need at least 2 tokens")
        inputs, targets = arr[:, :-1], arr[:, 1:]
    else:
        inputs = np.concatenate([np.full((B, 1), context_token, np.int32), arr[:, :-1]], axis=1)
        targets = arr
    limit = _max_positions(evaluator)
    if limit is not None and inputs.shape[1] > limit:
        raise ValueError(
            f"samples of {L} tokens do not fit the evaluator's context of {limit} positions"
        )
    vocab = getattr(getattr(evaluator, "args", None), "vocab_size", None)
    if vocab is not None and arr.size and (arr.max() >= vocab or arr.min() < 0):
        bad = int(arr.max() if arr.max() >= vocab else arr.min())
        raise ValueError(
            f"token id {bad} is outside the evaluator's vocabulary (0..{vocab - 1}); the evaluator "
            "must use the model's tokenizer"
        )
    rows = max(1, _LOGITS_BUDGET // (inputs.shape[1] * (vocab or 50257)))
    out = np.zeros(B)
    for i in range(0, B, rows):
        logits = evaluator(mx.array(inputs[i : i + rows])).astype(mx.float32)
        tgt = mx.array(targets[i : i + rows])
        picked = mx.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        nll = mx.logsumexp(logits, axis=-1) - picked
        out[i : i + rows] = np.array(nll.mean(axis=-1), dtype=np.float64)
    return out


def perplexities(evaluator, tokens, *, context_token: int | None) -> np.ndarray:
    """``exp(mean NLL)`` of each row under ``evaluator`` (see :func:`sample_nll`)."""
    return np.exp(sample_nll(evaluator, tokens, context_token=context_token))


def load_reference(path: str | Path, tokenizer, num_samples: int, length: int) -> np.ndarray:
    """Cut held-out text into ``num_samples`` windows of ``length`` tokens, evenly spaced.

    Args:
        path: a ``.npy`` of token ids (any integer dtype and shape; flattened) or a text file,
            encoded with ``tokenizer``.
        tokenizer: used for text files.
        num_samples: windows wanted (they overlap when the text is short).
        length: tokens per window.

    Returns:
        [num_samples, length] int32 token ids.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not integer ids, or fewer than ``length`` tokens.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no reference text at {path}")
    if path.suffix == ".npy":
        ids = np.load(path, allow_pickle=False).reshape(-1)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{path} must hold integer token ids, not {ids.dtype}")
    else:
        ids = np.array(tokenizer.encode(path.read_text()), dtype=np.int64)
    if ids.size < length:
        raise ValueError(f"{path} has {ids.size} tokens, fewer than the length {length}")
    starts = np.linspace(0, ids.size - length, num_samples).round().astype(np.int64)
    return np.stack([ids[s : s + length] for s in starts]).astype(np.int32)


def _parse_steps(steps) -> list[int]:
    if isinstance(steps, (int, np.integer)):
        steps = [steps]
    out = []
    for s in steps:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s <= 0:
            raise ValueError(f"steps must be positive integers, got {s!r}")
        out.append(int(s))
    if not out:
        raise ValueError("give at least one step count")
    return out


def _check_positive(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def evaluate(
    model,
    *,
    steps: Sequence[int] | int = (1, 2, 4, 8, 16),
    num_samples: int = 64,
    length: int | None = None,
    batch_size: int = 16,
    solver: str | None = None,
    seed: int | None = 0,
    evaluator=DEFAULT_EVALUATOR,
    reference_text: str | Path | None = None,
    temp: float | None = None,
    top_k: int | None = None,
    top_p: float = 1.0,
    progress: bool = True,
    tokenizer=None,
    group=None,
) -> dict:
    """Generative perplexity and entropy of an FS-DFM model for several step counts.

    Args:
        model: a loaded FS-DFM model, or a path / repo for :func:`fsdfm_mlx.load`.
        steps: step counts to evaluate (one row each; every row uses the same seeds).
        num_samples: passages per step count.
        length: tokens per passage (default: the model's training length).
        batch_size: passages generated at once (a chunk; fixes the seeds of every passage).
        solver: the solver (default: the model's).
        seed: the run's seed; chunk ``c`` uses ``chunk_seed(seed, c)`` (None: a fresh one).
        evaluator: an mlx-lm model folder or repo id (default: GPT-2 Large, as the paper), or an
            already loaded ``(model, tokenizer)`` pair.
        reference_text: a ``.npy`` of token ids or a text file: adds a ``reference`` row for real
            text cut into ``num_samples`` windows of the same length.
        temp: sampling temperature (1.0 = the model's own distribution; default: the model's
            ``default_temp``), as in ``generate``. The result's ``sampling`` says which was used.
        top_k: keep the k most likely tokens at every draw (None = off).
        top_p: nucleus filter at every draw (1.0 = off).
        progress: show a progress bar (on rank 0).
        tokenizer: the FS-DFM tokenizer (unused; accepted for symmetry with ``generate``).
        group: the distributed group (default: ``mx.distributed.init()``, a group of one outside
            ``mlx.launch``).

    Returns:
        A dict with ``rows`` (one per step count: ``steps``, ``gen_ppl``, ``entropy_bits``,
        ``samples``, ``seconds`` (generation only), ``tokens_per_sec``, and the per-sample
        ``ppl`` / ``entropy`` lists), ``reference`` (the same figures for real text, or None) and the
        settings used. Every rank gets the same dict.

    Raises:
        ValueError: bad settings, ids outside the evaluator's vocabulary, passages too long for it.
        FileNotFoundError: model, evaluator or reference text not found.
        fsdfm_mlx.distributed.DistributedError: another rank failed.
    """
    del tokenizer
    from .generate import check_solver, generate_step, resolve_seed
    from .solvers import SamplerOptions

    # checks the values (the model's default temperature is checked when its config is read)
    SamplerOptions(temperature=1.0 if temp is None else temp, top_k=top_k, top_p=top_p)

    step_list = _parse_steps(steps)
    _check_positive(num_samples, "num_samples")
    _check_positive(batch_size, "batch_size")
    if length is not None:
        _check_positive(length, "length")
    group = distributed.init() if group is None else group
    seed = distributed.broadcast_seed(resolve_seed(seed), group)
    rank = group.rank()
    sizes = distributed.chunk_sizes(num_samples, batch_size)
    mine = distributed.my_chunks(len(sizes), group)

    def work():
        if isinstance(model, (str, Path)):
            import fsdfm_mlx

            fs_model, _ = fsdfm_mlx.load(str(model))
        else:
            fs_model = model
        args = fs_model.args
        sampling = dict(temp=args.default_temp if temp is None else temp, top_k=top_k, top_p=top_p)
        L = args.length if length is None else length
        used_solver = args.default_solver if solver is None else solver
        check_solver(fs_model, used_solver)
        if isinstance(evaluator, tuple):
            ev_model, ev_tok = evaluator
        else:
            ev_model, ev_tok = load_evaluator(evaluator)
        ctx = _context_token(ev_tok)
        reference = None
        if reference_text is not None:
            reference = load_reference(reference_text, ev_tok, num_samples, L)

        n_tasks = len(mine) * (len(step_list) + (reference is not None))
        bar = _progress(progress and rank == 0, n_tasks)
        # one untimed step first, so that the first row does not pay for warm-up
        warm = generate_step(
            fs_model,
            batch_size=sizes[0],
            length=L,
            steps=1,
            solver=used_solver,
            seed=seed,
            **sampling,
        )
        deque(warm, maxlen=0)
        local: dict = {}
        for s in step_list:
            seconds = 0.0
            for c in mine:
                tic = time.perf_counter()
                gen = generate_step(
                    fs_model,
                    batch_size=sizes[c],
                    length=L,
                    steps=s,
                    solver=used_solver,
                    seed=distributed.chunk_seed(seed, c),
                    **sampling,
                )
                state = deque(gen, maxlen=1)[0]
                seconds += time.perf_counter() - tic
                toks = np.array(state.tokens)
                local[(s, c)] = _score(ev_model, toks, ctx)
                bar.advance()
            local[(s, "seconds")] = seconds
        if reference is not None:
            for c in mine:
                start = c * batch_size
                local[("ref", c)] = _score(ev_model, reference[start : start + sizes[c]], ctx)
                bar.advance()
        bar.close()
        return local, L, used_solver, sampling

    local, L, used_solver, sampling = distributed.all_or_nothing(work, group)

    def gathered(key):
        parts = distributed.gather_chunks(
            {c: local[(key, c)] for c in mine},
            len(sizes),
            group,
            chunk_size=batch_size,
            tail=(2,),
            dtype=np.float32,
        )
        return np.concatenate(parts, axis=0)

    rows = []
    for s in step_list:
        per = gathered(s)
        seconds = distributed.gather_max(local[(s, "seconds")], group)
        speed = num_samples * L / seconds if seconds > 0 else None
        rows.append(_row(per, {"steps": s, "seconds": seconds, "tokens_per_sec": speed}))
    reference_row = None
    if reference_text is not None:
        reference_row = _row(gathered("ref"), {"source": str(reference_text)})
    return {
        "model": str(model) if isinstance(model, (str, Path)) else None,
        "evaluator": evaluator if isinstance(evaluator, (str, Path)) else None,
        "num_samples": num_samples,
        "length": L,
        "batch_size": batch_size,
        "solver": used_solver,
        "seed": seed,
        "sampling": sampling,
        "ranks": group.size(),
        "rows": rows,
        "reference": reference_row,
    }


def _score(ev_model, tokens: np.ndarray, ctx: int | None) -> np.ndarray:
    """[B, 2] float32: perplexity and entropy (bits) of each row."""
    ppl = perplexities(ev_model, tokens, context_token=ctx)
    ent = token_entropy_bits(tokens)
    return np.stack([ppl, ent], axis=1).astype(np.float32)


def _row(per: np.ndarray, extra: dict) -> dict:
    ppl, ent = per[:, 0].astype(np.float64), per[:, 1].astype(np.float64)
    return {
        **extra,
        "gen_ppl": float(ppl.mean()),
        "entropy_bits": float(ent.mean()),
        "samples": int(per.shape[0]),
        "ppl": ppl.tolist(),
        "entropy": ent.tolist(),
    }


class _progress:
    """A rich progress bar on stderr, or nothing."""

    def __init__(self, on: bool, total: int):
        self.bar = None
        if on and total:
            from rich.console import Console
            from rich.progress import Progress

            self.bar = Progress(console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("evaluating", total=total)

    def advance(self):
        if self.bar is not None:
            self.bar.advance(self.task)

    def close(self):
        if self.bar is not None:
            self.bar.stop()


__all__ = [
    "DEFAULT_EVALUATOR",
    "evaluate",
    "load_evaluator",
    "load_reference",
    "perplexities",
    "sample_nll",
    "token_entropy_bits",
]
