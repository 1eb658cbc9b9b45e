"""Data-parallel generation: 2 ranks on this machine (mlx.launch, ring backend over loopback)."""

# ruff: noqa: I001  (fsdfm_mlx before mlx.core: it loads the fast CPU BLAS)
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import fsdfm_mlx  # noqa: F401
import numpy as np
import pytest

from fsdfm_mlx.distributed import (
    FAIL_RANK_ENV,
    chunk_seed,
    chunk_sizes,
    gather_chunks,
    init,
    launcher_command,
)

GEN = ["--steps", "3", "--seed", "5", "--batch-size", "2", "--num-samples", "7"]


def _free_port_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1 (the ring backend listens on one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 65000:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    pytest.skip("cannot bind two consecutive loopback ports for the ring backend")


def _cli(args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "fsdfm_mlx.cli.main", *map(str, args)],
        stdin=subprocess.PIPE,  # mlx.launch polls stdin and would spin on /dev/null
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _launch(n, args, env=None, timeout=120):
    port = _free_port_pair()
    cmd = [*launcher_command(), "--backend", "ring", "-n", str(n), "-p", str(port)]
    for k, v in (env or {}).items():
        cmd += ["--env", f"{k}={v}"]
    cmd += ["--", sys.executable, "-m", "fsdfm_mlx.cli.main", *map(str, args)]
    return subprocess.run(
        cmd, stdin=subprocess.PIPE, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def model_path(micro_models):
    return micro_models["uniform-student"]


@pytest.fixture(scope="module")
def single(model_path, tmp_path_factory):
    """The single-process result for GEN (7 samples in chunks of 2)."""
    out = tmp_path_factory.mktemp("single") / "ids.npy"
    r = _cli(["generate", "--model", model_path, *GEN, "--tokens-out", out])
    assert r.returncode == 0, r.stderr
    return np.load(out)


def test_chunking_helpers():
    assert chunk_sizes(7, 2) == [2, 2, 2, 1] and chunk_sizes(4, 4) == [4]
    assert chunk_seed(11, 0) == 11
    seeds = {chunk_seed(11, c) for c in range(1, 50)} | {chunk_seed(12, 1)}
    assert len(seeds) == 50 and all(0 <= s < 2**32 for s in seeds)
    group = init()
    assert group.size() == 1
    local = {c: np.full((n, 3), c, np.int32) for c, n in enumerate(chunk_sizes(5, 2))}
    parts = gather_chunks(local, 3, group, chunk_size=2, tail=(3,))
    assert [p[:, 0].tolist() for p in parts] == [[0, 0], [1, 1], [2]]


def test_single_chunk_is_a_plain_batch(model_path, single):
    """Chunk 0 uses the seed itself: one chunk of the run equals the plain batch for that seed."""
    args = ["generate", "--model", model_path, "--steps", 3, "--seed", 5, "--batch-size", 2]
    plain = _cli([*args, "--json"])
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout)["tokens"] == single[:2].tolist()


def test_two_ranks_equal_one(model_path, single, tmp_path):
    out = tmp_path / "ids.npy"
    r = _launch(2, ["generate", "--model", model_path, *GEN, "--tokens-out", out, "--json"])
    if "bind" in r.stderr.lower() and "address" in r.stderr.lower():
        pytest.skip(f"the ring backend could not bind loopback ports: {r.stderr.strip()[:200]}")
    assert out.exists(), r.stdout + r.stderr
    got = np.load(out)
    assert got.shape == (7, 5)
    np.testing.assert_array_equal(got, single)

    data = json.loads(r.stdout)  # rank 0 alone prints
    assert data["ranks"] == 2 and data["tokens"] == single.tolist()
    assert data["temp"] == 1.0  # the micro model's config sets no default_temp


def test_failing_rank_fails_the_run(model_path, tmp_path):
    out = tmp_path / "ids.npy"
    args = ["generate", "--model", model_path, *GEN, "--tokens-out", out]
    # raw mlx.launch (which itself exits 0): rank 1 fails, rank 0 writes nothing
    r = _launch(2, args, env={FAIL_RANK_ENV: "1"})
    assert not out.exists()
    assert "Error: rank 1: injected failure" in r.stderr
    assert "Error: rank 0: 1 of 2 ranks failed" in r.stderr or "rank 0" in r.stderr
    # through --hosts, which re-launches with mlx.launch: non-zero exit, no file
    port = _free_port_pair()
    hosts = ["--hosts", "127.0.0.1,127.0.0.1", "--launch-args", f"--backend ring -p {port}"]
    r = _cli([*args, *hosts], env={FAIL_RANK_ENV: "1"})
    assert r.returncode == 1, r.stderr
    assert not out.exists() and "injected failure" in r.stderr
    assert not list(tmp_path.iterdir())  # no temp file left either
