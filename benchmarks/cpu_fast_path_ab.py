"""The CPU fast path (vectorised exp for the GELU and attention) against MLX's own ops, A/B.

Runs on MLX's CPU device: one random-weight preset model, forward passes alternating between the fast
path (``fsdfm_mlx.model.CPU_FAST_MIN_SIZE`` at its default) and MLX's ops (threshold out of reach), in
one process, so that machine noise hits both alike; also the GELU and attention of one block's shapes
alone. Prints JSON::

    python benchmarks/cpu_fast_path_ab.py --preset 170m --length 256 --rounds 6
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone

import fsdfm_mlx  # loads MKL for MLX's CPU matmuls; must come before mlx.core

# isort: split
import mlx.core as mx

from fsdfm_mlx import model as model_module
from fsdfm_mlx.profile import random_model


def _ms(fn) -> float:
    tic = time.perf_counter()
    mx.eval(fn())
    return (time.perf_counter() - tic) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="170m")
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--rounds", type=int, default=6)
    a = p.parse_args()
    mx.set_default_device(mx.cpu)
    model = random_model(a.preset, dtype=mx.float32)
    args = model.args
    B, L, D, H = 1, a.length, args.hidden_size, args.n_heads
    x = mx.random.randint(0, args.vocab_size, (B, L))
    t, dt = mx.full((B,), 0.3), mx.full((B,), 0.125)
    u = mx.random.normal((B, L, args.mlp_ratio * D))
    q = mx.random.normal((B, H, L, D // H))
    mx.eval(x, u, q)
    parts = {
        "forward": lambda: model(x, t, dt),
        "gelu": lambda: model_module.gelu(u),
        "attention": lambda: model_module.attention(q, q, q, (D // H) ** -0.5),
    }
    default = model_module.CPU_FAST_MIN_SIZE
    times = {f"{k}_{m}": [] for k in parts for m in ("fast", "mlx_ops")}
    for _ in range(a.rounds):
        for mode, size in (("fast", default), ("mlx_ops", 1 << 62)):
            model_module.CPU_FAST_MIN_SIZE = size
            for name, fn in parts.items():
                _ms(fn)  # warm (first use compiles the fused loop)
                times[f"{name}_{mode}"].append(_ms(fn))
    model_module.CPU_FAST_MIN_SIZE = default
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        json.dumps(
            {
                "benchmark": "cpu_fast_path_ab",
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": f"python benchmarks/cpu_fast_path_ab.py --preset {a.preset} "
                f"--length {a.length} --rounds {a.rounds}",
                "machine": {
                    "platform": platform.platform(),
                    "cpu_count": __import__("os").cpu_count(),
                },
                "mlx": mx.__version__,
                "fsdfm_mlx": fsdfm_mlx.__version__,
                "median_ms": med,
                "speedup": {k: med[f"{k}_mlx_ops"] / med[f"{k}_fast"] for k in parts},
                "runs_ms": times,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
