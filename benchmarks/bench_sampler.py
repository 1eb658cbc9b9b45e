"""Time the solver step apart from the model: prints JSON.

On a GPU the default path is the fused kernel (fsdfm_mlx.kernels); the portable MLX-ops path is
timed too (``*_portable``) for comparison.

Random logits stand in for the model (the step's cost does not depend on their values). Default
shape: B=1, L=1,024, V=50,257 (GPT-2), as the published models sample.

    python benchmarks/bench_sampler.py [--device cpu|gpu] [--batch-size 1] [--length 1024]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import mlx.core as mx

from fsdfm_mlx import kernels
from fsdfm_mlx.solvers import CUMULATIVE, DFM_EULER, SOLVERS, SamplerOptions, sample_step


def bench(solver, logits, x_t, final: bool, options, repeats: int, fused: bool = True):
    key = mx.random.key(0)
    kw = dict(solver=solver, final=final, options=options, fused=fused)
    mx.eval(sample_step(logits, x_t, 0.25, 0.125, key, **kw))  # compile + warm up
    times = []
    for i in range(repeats):
        k = mx.random.key(i + 1)
        mx.eval(k)
        tic = time.perf_counter()
        mx.eval(sample_step(logits, x_t, 0.25, 0.125, k, **kw))
        times.append((time.perf_counter() - tic) * 1e3)
    times.sort()
    return {"median_ms": times[len(times) // 2], "min_ms": times[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", choices=["cpu", "gpu"], default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--dtype", default="float32", help="logits dtype (the model's: bfloat16 on GPU)")
    p.add_argument("--filters", action="store_true", help="also time top-k=50 / top-p=0.9")
    a = p.parse_args()
    if a.device is not None:
        mx.set_default_device(mx.gpu if a.device == "gpu" else mx.cpu)

    shape = (a.batch_size, a.length, a.vocab)
    logits = (mx.random.normal(shape, key=mx.random.key(1)) * 4.0).astype(getattr(mx, a.dtype))
    x_t = mx.random.randint(0, a.vocab, shape[:2], key=mx.random.key(2)).astype(mx.int32)
    mx.eval(logits, x_t)

    results = {}
    for solver in SOLVERS:
        results[solver] = bench(solver, logits, x_t, False, None, a.repeats)
    results["final_step"] = bench(SOLVERS[0], logits, x_t, True, None, a.repeats)
    if kernels.available():  # the same steps on the portable MLX-ops path, for comparison
        for solver in (CUMULATIVE, DFM_EULER):
            results[solver + "_portable"] = bench(
                solver, logits, x_t, False, None, a.repeats, False
            )
        results["final_step_portable"] = bench(
            CUMULATIVE, logits, x_t, True, None, a.repeats, False
        )
    if a.filters:
        opts = SamplerOptions(top_k=50, top_p=0.9)
        results["cumulative_top_k50_top_p0.9"] = bench(SOLVERS[0], logits, x_t, False, opts, 3)
    print(
        json.dumps(
            {
                "benchmark": "sampler_step",
                "device": str(mx.default_device()),
                "machine": platform.machine(),
                "mlx": mx.__version__,
                "batch_size": a.batch_size,
                "length": a.length,
                "vocab": a.vocab,
                "repeats": a.repeats,
                "fused_kernel": kernels.backend() if kernels.available() else None,
                "sampler_ms_per_step": results,
                "logits_dtype": a.dtype,
                "logits_bytes": logits.nbytes,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
