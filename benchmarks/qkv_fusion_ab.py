"""One batched q/k/v matmul (``Model.fuse_qkv``) against three separate ones, A/B in one process.

Random-weight preset model; the two variants alternate in rounds so that machine noise hits both
alike. Times the default 8-step sampler end to end (``generate_step``, compiled, lookahead) and one
compiled forward pass, at each batch size. Prints JSON::

    python benchmarks/qkv_fusion_ab.py --preset 1.3b --length 1024 --batch-sizes 1,8 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import deque
from datetime import datetime, timezone

import fsdfm_mlx  # loads MKL for MLX's CPU matmuls; must come before mlx.core

# isort: split
import mlx.core as mx

from fsdfm_mlx.generate import compiled_forward, generate_step
from fsdfm_mlx.profile import random_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="1.3b")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    model = random_model(a.preset, dtype=getattr(mx, a.dtype), length=a.length)
    blocks = model.blocks
    model.fuse_qkv()
    fused = [b._fused_qkv for b in blocks]

    def use(on: bool) -> None:
        for b, f in zip(blocks, fused, strict=True):
            b._fused_qkv = f if on else None
        model.__dict__.pop("_fsdfm_forwards", None)  # compiled graphs are traced per variant

    def sample(B):
        gen = generate_step(model, batch_size=B, length=a.length, steps=a.steps, seed=0)
        mx.eval(deque(gen, maxlen=1)[0].tokens)

    def forward(B):
        x = mx.zeros((B, a.length), mx.int32)
        mx.eval(compiled_forward(model)(x, mx.full((B,), 0.3), mx.full((B,), 0.125)))

    out = {}
    logits = {}
    for B in [int(b) for b in a.batch_sizes.split(",")]:
        for on in (False, True):
            use(on)
            x = mx.random.randint(0, model.args.vocab_size, (1, 64), key=mx.random.key(0))
            logits[on] = model(x, mx.full((1,), 0.3), mx.full((1,), 0.125)).astype(mx.float32)
        diff = float(mx.abs(logits[True] - logits[False]).max())
        times = {f"{k}_{v}": [] for k in ("sample", "forward") for v in ("separate", "fused")}
        for _ in range(a.rounds):
            for on in (False, True):
                use(on)
                name = "fused" if on else "separate"
                sample(B)
                forward(B)  # warm: traces and compiles this variant
                for _ in range(a.repeats):
                    tic = time.perf_counter()
                    sample(B)
                    times[f"sample_{name}"].append((time.perf_counter() - tic) * 1e3)
                    tic = time.perf_counter()
                    forward(B)
                    times[f"forward_{name}"].append((time.perf_counter() - tic) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[f"B={B}"] = {
            "median_ms": med,
            "fused_speedup": {
                k: med[f"{k}_separate"] / med[f"{k}_fused"] for k in ("sample", "forward")
            },
            "max_abs_logit_diff": diff,
            "runs_ms": times,
        }
    use(True)
    print(
        json.dumps(
            {
                "benchmark": "qkv_fusion_ab",
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": "python benchmarks/qkv_fusion_ab.py "
                f"--preset {a.preset} --length {a.length} --batch-sizes {a.batch_sizes} "
                f"--dtype {a.dtype} --steps {a.steps} --rounds {a.rounds} --repeats {a.repeats}",
                "machine": {"platform": platform.platform(), "device": str(mx.default_device())},
                "mlx": mx.__version__,
                "fsdfm_mlx": fsdfm_mlx.__version__,
                "peak_memory_bytes": mx.get_peak_memory(),
                "results": out,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
