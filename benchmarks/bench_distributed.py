"""Speed-up of data-parallel generation: ``fsdfm-mlx generate`` on 1 rank vs n ranks (mlx.launch).

Both runs write the same ``--num-samples`` passages (same seed and chunks); the script checks that
the tokens agree and prints one JSON object with the generation time each run reports (the slowest
rank's) and the wall time of the whole command (model loading and process start included).

    python benchmarks/bench_distributed.py --model PATH --num-samples 32 --batch-size 4 --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _run(cmd: list[str], env: dict) -> tuple[dict, float]:
    tic = time.perf_counter()
    r = subprocess.run(
        cmd, stdin=subprocess.PIPE, capture_output=True, text=True, env={**os.environ, **env}
    )
    wall = time.perf_counter() - tic
    if r.returncode != 0 or not r.stdout.strip():
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1]), wall


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--backend", default="ring")
    ap.add_argument(
        "--threads-per-rank",
        type=int,
        default=None,
        help="CPU only: BLAS/OpenMP threads per rank in the n-rank run (default: cores / ranks).",
    )
    a = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fsdfm_mlx.distributed import launcher_command

    gen = [
        sys.executable, "-m", "fsdfm_mlx.cli.main", "generate", "--model", a.model,
        "--num-samples", str(a.num_samples), "--batch-size", str(a.batch_size),
        "--steps", str(a.steps), "--seed", str(a.seed), "--json",
    ]  # fmt: skip
    threads = a.threads_per_rank or max(1, (os.cpu_count() or 1) // a.ranks)
    split_env = {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    with tempfile.TemporaryDirectory() as d:
        one, wall1 = _run([*gen, "--tokens-out", f"{d}/one.npy"], {})
        launch = [*launcher_command(), "--backend", a.backend, "-n", str(a.ranks)]
        if a.backend == "ring":
            launch += ["-p", str(_port())]
        for k, v in split_env.items():
            launch += ["--env", f"{k}={v}"]
        many, walln = _run([*launch, "--", *gen, "--tokens-out", f"{d}/many.npy"], {})
        same = bool(np.array_equal(np.load(f"{d}/one.npy"), np.load(f"{d}/many.npy")))
    print(
        json.dumps(
            {
                "model": a.model,
                "num_samples": a.num_samples,
                "batch_size": a.batch_size,
                "length": one["length"],
                "steps": a.steps,
                "ranks": a.ranks,
                "backend": a.backend,
                "cpu_count": os.cpu_count(),
                "threads_per_rank": threads,
                "tokens_equal": same,
                "generate_s_1": one["elapsed_s"],
                f"generate_s_{a.ranks}": many["elapsed_s"],
                "speedup_generate": one["elapsed_s"] / many["elapsed_s"],
                "wall_s_1": wall1,
                f"wall_s_{a.ranks}": walln,
                "speedup_wall": wall1 / walln,
                "tokens_per_sec_1": one["tokens_per_sec"],
                f"tokens_per_sec_{a.ranks}": many["tokens_per_sec"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
