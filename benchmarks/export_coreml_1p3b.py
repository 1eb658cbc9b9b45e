"""Export the 1.3B preset (random weights, uniform-source student) to Core ML; print JSON figures.

Usage: python benchmarks/export_coreml_1p3b.py [--torch-dtype float32|float16]
    [--quantize none|int8|...] [--attention split_einsum|original] [--length 1024]
    [--output /tmp/fsdfm-1p3b.mlpackage] [--keep]

Peak RSS is the process's (resource.getrusage), so it includes building the random torch model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torch-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--quantize", default="none")
    p.add_argument("--attention", default="split_einsum")
    p.add_argument("--precision", default="float16")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--output", default=None)
    p.add_argument("--keep", action="store_true", help="keep the package (default: delete it)")
    opts = p.parse_args()

    import torch
    from fsdfm_mlx.convert.to_coreml import export_coreml, peak_rss_bytes
    from fsdfm_mlx.convert.torch_model import FSDFMTorch

    from fsdfm_mlx.model import ModelArgs

    args = ModelArgs(
        hidden_size=2048,
        cond_dim=256,
        n_blocks=21,
        n_heads=32,
        vocab_size=50257,
        source_distribution="uniform",
        dt_conditioned=True,
        length=1024,
    )
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.no_grad():
        model = FSDFMTorch(args).to(getattr(torch, opts.torch_dtype))
    build_s = time.perf_counter() - t0
    rss_after_build = peak_rss_bytes()

    out_dir = Path(tempfile.mkdtemp(prefix="fsdfm-coreml-bench-"))
    output = Path(opts.output) if opts.output else out_dir / "fsdfm-1p3b.mlpackage"
    summary = export_coreml(
        model,
        output,
        length=opts.length,
        precision=opts.precision,
        quantize=opts.quantize,
        attention=opts.attention,
        min_deployment_target="iOS18" if opts.quantize == "int4" else "iOS17",
        force=True,
        progress=False,
    )
    result = {
        "preset": "1.3B",
        "torch_dtype": opts.torch_dtype,
        "build_seconds": round(build_s, 1),
        "export_seconds": round(summary["seconds"], 1),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_gib": round(peak_rss_bytes() / 2**30, 2),
        "peak_rss_after_build_gib": round(rss_after_build / 2**30, 2),
        "params": summary["params"],
        "size_bytes": summary["size_bytes"],
        "bytes_per_param": round(summary["bytes_per_param"], 4),
        "ops_total": summary["ops_total"],
        "ops_non_const": summary["ops_non_const"],
        "ops": summary["ops"],
        "length": opts.length,
        "precision": opts.precision,
        "quantize": opts.quantize,
        "attention": opts.attention,
        "platform": sys.platform,
    }
    if not opts.keep:
        shutil.rmtree(output, ignore_errors=True)
        shutil.rmtree(output.with_suffix(".tokenizer"), ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
