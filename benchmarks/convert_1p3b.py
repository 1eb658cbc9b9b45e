"""Benchmark: convert a 1.3B-preset checkpoint in the official format to bfloat16; print JSON.

Builds (once, cached in --work) a DFM pre-training checkpoint of the 1.3B preset with random float32
weights and AdamW state (``{"model", "optimizer", "step"}``, ~16 GB), then runs ``fsdfm-mlx convert``
in a child process and reports its wall time and peak RSS against the output size (target: peak RSS
under 1.5x the output).

    python benchmarks/convert_1p3b.py --work /tmp/fsdfm-bench [--dtype bfloat16] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def build_checkpoint(path: Path, preset: str = "1.3b", source: str = "uniform") -> dict:
    """Write an official-format DFM checkpoint with random weights and AdamW state, tensor by tensor.

    Each tensor lives in its own memory-mapped scratch file, so building needs little RAM.
    """
    import torch
    from fsdfm_mlx.convert.checkpoint import GPT2_VOCAB, PRESETS, expected_shapes

    from fsdfm_mlx.model import ModelArgs

    p = PRESETS[preset]
    args = ModelArgs(vocab_size=GPT2_VOCAB, source_distribution=source, **p)
    scratch = path.parent / (path.name + ".scratch")
    scratch.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)

    def mapped(name: str, shape, fill):
        n = 1
        for s in shape:
            n *= s
        f = scratch / name
        t = torch.from_file(str(f), shared=True, size=n, dtype=torch.float32).view(*shape)
        if fill == "randn":
            flat = t.view(-1)
            for i in range(0, n, 1 << 24):
                flat[i : i + (1 << 24)].normal_(0, 0.02, generator=g)
        # "zeros": the fresh file is already zero (sparse), like a young optimizer's moments
        return t

    model, state = {}, {}
    shapes = expected_shapes(args)
    names = list(shapes)
    for i, name in enumerate(names):
        model["module." + name] = mapped(f"w{i}", shapes[name], "randn")
    # the official state dict also carries the rotary buffer
    hd = args.head_dim
    model["module.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    for i, name in enumerate(names):
        state[i] = {
            "step": torch.tensor(1000.0),
            "exp_avg": mapped(f"m{i}", shapes[name], "zeros"),
            "exp_avg_sq": mapped(f"v{i}", shapes[name], "zeros"),
        }
    groups = [
        {
            "lr": 3e-4,
            "betas": (0.9, 0.999),
            "eps": 1e-8,
            "weight_decay": 0.03,
            "params": list(range(len(names))),
        }
    ]
    ckpt = {
        "model": model,
        "optimizer": {"state": state, "param_groups": groups},
        "step": 1000,
        "train_sampler": {"epoch": 0, "seed": 0},
        "test_sampler": {"epoch": 0, "seed": 0},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    shutil.rmtree(scratch, ignore_errors=True)
    return {"parameters": sum(int(torch.tensor(s).prod()) for s in shapes.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/fsdfm-bench", help="where the checkpoint and output go")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--keep", action="store_true", help="keep the converted folder")
    ap.add_argument("--build-only", metavar="PATH", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.build_only:
        build_checkpoint(Path(a.build_only), a.preset)
        return

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"dfm-{a.preset}.pth"
    build_s = None
    if not ckpt.exists():
        # built in a child, so this process stays small: a forked child's ru_maxrss starts from ours
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, __file__, "--preset", a.preset, "--build-only", str(ckpt)], check=True
        )
        build_s = time.perf_counter() - t0
    out = work / f"mlx-{a.preset}-{a.dtype}"
    if out.exists():
        shutil.rmtree(out)
    cmd = [
        sys.executable,
        "-m",
        "fsdfm_mlx.cli.main",
        "convert",
        "--model",
        str(ckpt),
        "--mlx-path",
        str(out),
        "--preset",
        a.preset,
        "--dtype",
        a.dtype,
        "--quiet",
    ]
    parent_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
    wall = time.perf_counter() - t0
    peak_kb = usage.ru_maxrss
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(proc.stderr.read(), file=sys.stderr)
        sys.exit(code)
    out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    peak = peak_kb * 1024 if sys.platform != "darwin" else peak_kb
    res = {
        "benchmark": "convert_1p3b",
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        "command": " ".join(cmd[1:]),
        "preset": a.preset,
        "dtype": a.dtype,
        "checkpoint_bytes": ckpt.stat().st_size,
        "build_seconds": build_s,
        "convert_seconds": round(wall, 2),
        "output_bytes": out_bytes,
        "peak_rss_bytes": peak,
        "peak_rss_over_output": round(peak / out_bytes, 3),
        "target_peak_rss_over_output": 1.5,
        "note": "peak RSS (ru_maxrss) of the convert child process, which includes this small parent's "
        f"RSS at fork (this parent's peak: {parent_kb} KB)",
    }
    print(json.dumps(res, indent=2))
    if not a.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
