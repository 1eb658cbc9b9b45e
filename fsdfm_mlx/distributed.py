"""Data-parallel generation over MLX's distributed layer (``mx.distributed``, run by ``mlx.launch``).

The work is cut into fixed-size chunks of samples. Chunk ``c`` draws its randomness from
``chunk_seed(seed, c)`` alone and rank ``r`` of ``n`` takes chunks ``r, r + n, r + 2n, ...``, so the
samples of a seed do not depend on how many ranks share them: one process running every chunk gives
the same tokens, bit for bit, as any number of ranks. Results are gathered in chunk order with
``mx.distributed.all_gather``; only rank 0 writes. Before anything is gathered every rank reports
whether its share succeeded (``all_sum`` of an ok flag), so one failing rank makes the whole run fail
and nothing is written.

Outside ``mlx.launch`` :func:`init` returns a group of one and everything runs in this process.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

FAIL_RANK_ENV = "FSDFM_MLX_FAIL_RANK"  # testing aid: the rank named here raises in its share


class DistributedError(RuntimeError):
    """Some rank failed its share; the run produced nothing."""


def init():
    """The distributed group this process belongs to (size 1 when not launched by ``mlx.launch``)."""
    return mx.distributed.init()


def is_launched() -> bool:
    """True inside a job started by ``mlx.launch`` or ``mpirun`` (even before ``init``)."""
    return any(k in os.environ for k in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of chunk ``chunk`` of a run with seed ``seed``.

    Chunk 0 uses ``seed`` itself, so a run of one chunk draws exactly what a plain batch with that
    seed draws; later chunks use a 32-bit hash of ``(seed, chunk)``.
    """
    if chunk == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(chunk)]).generate_state(1, np.uint32)[0])


def chunk_sizes(num_samples: int, chunk_size: int) -> list[int]:
    """Sizes of the chunks that ``num_samples`` samples are cut into (the last may be smaller)."""
    full, rest = divmod(num_samples, chunk_size)
    return [chunk_size] * full + ([rest] if rest else [])


def my_chunks(num_chunks: int, group) -> list[int]:
    """The chunk indices this rank works on (round-robin over ranks)."""
    return list(range(group.rank(), num_chunks, group.size()))


def broadcast_seed(seed: int, group) -> int:
    """Rank 0's seed on every rank (a fresh seed drawn on each rank would differ)."""
    if group.size() == 1:
        return int(seed)
    mine = np.array([seed if group.rank() == 0 else 0], dtype=np.uint32)
    total = mx.distributed.all_sum(mx.array(mine), group=group, stream=mx.cpu)
    return int(np.array(total)[0])


def count_ok(ok: bool, group) -> int:
    """How many ranks report ``ok`` (a collective: every rank must call it once, in step)."""
    if group.size() == 1:
        return int(ok)
    total = mx.distributed.all_sum(mx.array([int(ok)], dtype=mx.int32), group=group, stream=mx.cpu)
    return int(np.array(total)[0])


def all_or_nothing(work: Callable[[], Any], group) -> Any:
    """Run ``work`` on every rank; return its result only if it succeeded on all ranks.

    A rank whose ``work`` raises still joins the ok-flag collective (so no rank waits forever), then
    re-raises its own error. The others raise :class:`DistributedError`.

    Args:
        work: this rank's share; it must not itself use collectives.
        group: the distributed group.

    Raises:
        DistributedError: another rank failed.
        Exception: whatever ``work`` raised on this rank.
    """
    error: BaseException | None = None
    result = None
    try:
        if os.environ.get(FAIL_RANK_ENV) == str(group.rank()):
            raise RuntimeError(f"injected failure ({FAIL_RANK_ENV}={group.rank()})")
        result = work()
    except Exception as e:  # reported to the other ranks first, re-raised below
        error = e
    n_ok = count_ok(error is None, group)
    if error is not None:
        raise error
    if n_ok < group.size():
        failed = group.size() - n_ok
        raise DistributedError(
            f"{failed} of {group.size()} ranks failed (see their messages); nothing was written"
        )
    return result


def gather_chunks(
    local: dict[int, np.ndarray],
    num_chunks: int,
    group,
    *,
    chunk_size: int,
    tail: tuple[int, ...] = (),
    dtype=np.int32,
) -> list[np.ndarray]:
    """Gather every rank's chunks to every rank, in chunk order.

    Args:
        local: this rank's results, chunk index -> array of shape ``[rows, *tail]`` with
            ``rows <= chunk_size``.
        num_chunks: the number of chunks in the run.
        group: the distributed group.
        chunk_size: the most rows a chunk has (the buffers are padded to it).
        tail: the trailing shape of every chunk's array.
        dtype: the arrays' dtype (the same on every rank).

    Returns:
        The ``num_chunks`` arrays, chunk 0 first.
    """
    if group.size() == 1:
        return [np.asarray(local[c], dtype=dtype) for c in range(num_chunks)]
    size = group.size()
    per_rank = -(-num_chunks // size)  # chunks the busiest rank holds; the others pad
    buf = np.zeros((per_rank, chunk_size, *tail), dtype=dtype)
    rows = np.zeros(per_rank, np.int32)
    for j, c in enumerate(my_chunks(num_chunks, group)):
        buf[j, : local[c].shape[0]] = local[c]
        rows[j] = local[c].shape[0]
    data = mx.distributed.all_gather(mx.array(buf), group=group, stream=mx.cpu)
    ns = mx.distributed.all_gather(mx.array(rows), group=group, stream=mx.cpu)
    data = np.array(data).reshape(size, per_rank, chunk_size, *tail)
    ns = np.array(ns).reshape(size, per_rank)
    return [data[c % size, c // size, : ns[c % size, c // size]] for c in range(num_chunks)]


def gather_max(value: float, group) -> float:
    """The largest ``value`` over the ranks (e.g. the wall time of the slowest rank)."""
    if group.size() == 1:
        return float(value)
    vals = mx.distributed.all_gather(
        mx.array([value], dtype=mx.float32), group=group, stream=mx.cpu
    )
    return float(np.array(vals).max())


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# ----------------------------------------------------------------------------------------------
# Re-launching a command through mlx.launch (--hosts / --hostfile)
# ----------------------------------------------------------------------------------------------


def launcher_command() -> list[str]:
    """How to run ``mlx.launch`` with this interpreter's MLX."""
    script = Path(sys.executable).parent / "mlx.launch"
    if script.exists():
        return [str(script)]
    found = shutil.which("mlx.launch")
    if found:
        return [found]
    return [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]


def relaunch(
    command_args: list[str],
    *,
    hosts: str | None = None,
    hostfile: str | None = None,
    launch_args: str | None = None,
) -> int:
    """Run ``python -m fsdfm_mlx.cli.main *command_args`` on several ranks through ``mlx.launch``.

    ``mlx.launch`` itself exits 0 even when a rank fails, so failure is read from the ranks'
    messages: an ``Error:`` line from a rank or mlx.launch's warning that a rank exited non-zero.

    Args:
        command_args: the subcommand and its options, without the re-launch options.
        hosts: comma-separated hosts for ``mlx.launch --hosts`` (``127.0.0.1`` repeated = local).
        hostfile: an ``mlx.launch`` JSON host file.
        launch_args: extra ``mlx.launch`` arguments, e.g. ``"--backend ring -p 40000"``.

    Returns:
        0 when every rank succeeded, else 1.
    """
    cmd = launcher_command()
    if hostfile:
        cmd += ["--hostfile", hostfile]
    elif hosts:
        cmd += ["--hosts", hosts]
    cmd += shlex.split(launch_args or "")
    cmd += ["--", sys.executable, "-m", "fsdfm_mlx.cli.main", *command_args]
    # a pipe nobody writes: mlx.launch polls its stdin and spins on /dev/null
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    failed = False
    assert proc.stderr is not None
    for line in proc.stderr:
        sys.stderr.write(line)
        sys.stderr.flush()
        plain = line.strip()
        if plain.startswith("Error:") or ("Node with rank" in plain and "completed" not in plain):
            failed = True
    rc = proc.wait()
    return 1 if failed or rc != 0 else 0


def rebuild_args(ctx, drop: set[str]) -> list[str]:
    """The command line of a click/typer context ``ctx`` without the options named in ``drop``."""
    args = [ctx.info_name]
    for param in ctx.command.params:
        if param.name in drop or param.name not in ctx.params:
            continue
        value = ctx.params[param.name]
        if value is None or value == param.default:
            continue
        if getattr(param, "is_flag", False):
            opts = param.opts if value else param.secondary_opts
            if opts:
                args.append(opts[0])
            continue
        args += [param.opts[0], str(value)]
    return args


# ----------------------------------------------------------------------------------------------
# Chunked generation
# ----------------------------------------------------------------------------------------------


def iter_chunks(model, tokenizer, *, chunks, num_samples, batch_size, seed, **kwargs):
    """Generate the chunks ``chunks`` of a run; yield ``(chunk, GenerationResponse)`` every step.

    Args:
        model: the FS-DFM model.
        tokenizer: its tokenizer.
        chunks: the chunk indices to generate (e.g. :func:`my_chunks`).
        num_samples: samples in the whole run.
        batch_size: samples per chunk (the batch generated at once); fixes the chunking, so it must
            be the same whatever the number of ranks.
        seed: the run's seed (chunk ``c`` uses ``chunk_seed(seed, c)``).
        **kwargs: the other arguments of :func:`fsdfm_mlx.generate.stream_generate`.
    """
    from .generate import stream_generate

    sizes = chunk_sizes(num_samples, batch_size)
    for c in chunks:
        for response in stream_generate(
            model, tokenizer, batch_size=sizes[c], seed=chunk_seed(seed, c), **kwargs
        ):
            yield c, response


def generate_tokens(
    model, tokenizer=None, *, num_samples: int, batch_size: int, seed: int, group=None, **kwargs
) -> np.ndarray:
    """Generate ``num_samples`` passages in chunks of ``batch_size`` over the ranks of ``group``.

    The result depends on ``(seed, batch_size, num_samples)`` and the options, not on the number of
    ranks. Every rank returns the gathered tokens.

    Args:
        model: the FS-DFM model.
        tokenizer: its tokenizer (only used for text prompts).
        num_samples: passages in all.
        batch_size: passages per chunk.
        seed: the run's seed (the same on every rank).
        group: the distributed group (default: :func:`init`).
        **kwargs: the other arguments of :func:`fsdfm_mlx.generate.stream_generate`.

    Returns:
        [num_samples, L] int32 token ids, chunk 0 first.

    Raises:
        DistributedError: another rank failed.
    """
    group = init() if group is None else group
    num_chunks = len(chunk_sizes(num_samples, batch_size))

    def work():
        out = {}
        for c, response in iter_chunks(
            model,
            tokenizer,
            chunks=my_chunks(num_chunks, group),
            num_samples=num_samples,
            batch_size=batch_size,
            seed=seed,
            **kwargs,
        ):
            if response.finished:
                out[c] = np.array(response.tokens, dtype=np.int32)
        return out

    local = all_or_nothing(work, group)
    length = next(iter(local.values())).shape[1] if local else _length(model, kwargs)
    parts = gather_chunks(local, num_chunks, group, chunk_size=batch_size, tail=(length,))
    return np.concatenate(parts, axis=0)


def _length(model, kwargs) -> int:
    return int(kwargs.get("length") or model.args.length)
