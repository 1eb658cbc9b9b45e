"""The MLX runtime against the PyTorch implementation of the same model, on the same machine.

One set of random weights is built in MLX and copied into ``FSDFMTorch``
(``convert/torch_model.py``); both are first checked to give the same logits (max abs difference;
must be below 1e-3 in float32 and 0.1 in bfloat16 / float16, else the JSON says so and the exit
code is 1). Then it times, for MLX, PyTorch eager and ``torch.compile`` (of the model; the sampler
stays eager, as the official code runs):

* one model forward pass;
* the whole n-step sampling run with the default student solver
  (``mixture_euler_with_cumulative_scalar``): MLX through ``fsdfm_mlx.generate.generate_step`` (fused,
  compiled step), PyTorch through a straightforward port of the official loop (softmax, a [B, L, V]
  one-hot, rates, jump probability, ``torch.multinomial`` draws; float64 categoricals), which is
  the baseline.

Half precision: MLX holds bf16/fp16 weights; PyTorch runs float32 weights (the same values) under
``torch.autocast``, as the official code does. MLX runs on its default device; ``--device`` picks
PyTorch's. Prints JSON (and writes it to ``--out`` if given)::

    python benchmarks/bench_mlx_vs_torch.py --preset 170m --length 256 --steps 8 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from collections import deque
from datetime import datetime, timezone

import fsdfm_mlx  # loads MKL for MLX's CPU matmuls; must come before mlx.core

# isort: split
import mlx.core as mx
import numpy as np
import torch
from fsdfm_mlx.convert.torch_model import FSDFMTorch

from fsdfm_mlx.generate import generate_step
from fsdfm_mlx.profile import forward_flops, parameter_count, random_model

TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.1}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_state_dict(model) -> dict[str, torch.Tensor]:
    """The MLX model's weights as float32 torch tensors (exact: bf16/fp16 widen losslessly)."""
    return {
        k: torch.from_numpy(np.array(v.astype(mx.float32)))
        for k, v in model.checkpoint_weights().items()
    }


class TorchRunner:
    """A torch model (eager or compiled) and the official-style sampling loop around it."""

    def __init__(self, module, device: str, dtype: str, categorical_dtype=torch.float64):
        self.module = module
        self.device = torch.device(device)
        self.autocast = dtype != "float32"
        self.amp_dtype = TORCH_DTYPES[dtype]
        self.categorical_dtype = categorical_dtype

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def logits(self, x, t, dt):
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.autocast):
            return self.module(x, t, dt)

    def categorical(self, probs):
        flat = probs.reshape(-1, probs.shape[-1]).to(self.categorical_dtype)
        return torch.multinomial(flat, 1, replacement=True).view(probs.shape[:-1])

    def sample(self, batch: int, length: int, steps: int, vocab: int, seed: int):
        """The official ``mixture_euler_with_cumulative_scalar`` loop, uniform source, kappa(t)=t."""
        torch.manual_seed(seed)
        dev = self.device
        x = torch.randint(0, vocab, (batch, length), device=dev)
        grid = torch.tensor([i * (1.0 / steps) for i in range(steps)] + [1.0], device=dev)
        eps = 1e-8
        for i in range(steps):
            t = grid[i : i + 1]
            h = grid[i + 1 : i + 2] - grid[i : i + 1]
            p_1t = torch.softmax(self.logits(x, t.repeat(batch), h.repeat(batch)).float(), dim=-1)
            if i == steps - 1:
                x = self.categorical(p_1t)
                continue
            one_hot = torch.zeros_like(p_1t)
            one_hot.scatter_(-1, x.unsqueeze(-1), 1.0)
            k_t, k_th = t, t + h
            alpha = (
                torch.log(torch.clamp(1.0 - k_t, eps, 1.0))
                - torch.log(torch.clamp(1.0 - k_th, eps, 1.0))
            ) / (h + eps)
            u = alpha.view(-1, 1, 1) * (p_1t - one_hot)
            u = u * (1.0 - one_hot)
            u_pos = torch.clamp(u, min=0.0)
            intensity = u_pos.sum(dim=-1).clamp_min(1e-12)
            jump_prob = 1.0 - torch.exp(-h.unsqueeze(-1) * intensity)
            mask_jump = torch.rand_like(jump_prob) < jump_prob
            x_new = x.clone()
            if mask_jump.any():
                u_pos = u_pos / intensity.unsqueeze(-1)
                x_new[mask_jump] = self.categorical(u_pos[mask_jump])
            x = x_new
        self.sync()
        return x


def _median_ms(fn, repeats: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append((time.perf_counter() - tic) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "runs": repeats}


def bench_torch(runner, x_np, t, dt, a, vocab) -> dict:
    dev = runner.device
    x = torch.from_numpy(x_np.astype(np.int64)).to(dev)
    tt = torch.full((a.batch_size,), t, device=dev)
    dtt = torch.full((a.batch_size,), dt, device=dev)

    def fwd():
        with torch.inference_mode():
            runner.logits(x, tt, dtt)
        runner.sync()

    tic = time.perf_counter()
    fwd()  # first call: compilation for torch.compile
    first_s = time.perf_counter() - tic
    out = {"first_call_s": first_s, "forward": _median_ms(fwd, a.repeats)}

    def sample():
        with torch.inference_mode():
            runner.sample(a.batch_size, a.length, a.steps, vocab, seed=0)

    out["sampling"] = _median_ms(sample, a.repeats)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="170m", help="170m | 1.3b | 1.7b")
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--dtype", choices=list(TOLERANCE), default="float32")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="PyTorch's device")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args()

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    model = random_model(a.preset, length=a.length, dtype=a.dtype)
    args = model.args
    vocab = args.vocab_size
    params, _ = parameter_count(args)
    flops = forward_flops(args, a.batch_size, a.length)

    rng = np.random.default_rng(0)
    x_np = rng.integers(0, vocab, (a.batch_size, a.length)).astype(np.int32)
    t, dt = 0.3, 1.0 / a.steps

    # --- same weights in torch (float32; autocast gives the half-precision compute) ----------
    tmodel = FSDFMTorch.from_state_dict(args, torch_state_dict(model), max_length=a.length)
    tmodel = tmodel.to(a.device).eval()
    eager = TorchRunner(tmodel, a.device, a.dtype)

    x_mx = mx.array(x_np)
    t_mx = mx.full((a.batch_size,), t)
    dt_mx = mx.full((a.batch_size,), dt)
    ref = np.array(model(x_mx, t_mx, dt_mx).astype(mx.float32))
    x_t = torch.from_numpy(x_np.astype(np.int64)).to(a.device)
    tt = torch.full((a.batch_size,), t, device=a.device)
    dtt = torch.full((a.batch_size,), dt, device=a.device)
    with torch.inference_mode():
        got = eager.logits(x_t, tt, dtt).float().cpu().numpy()
    diff = float(np.abs(ref - got).max())
    tol = TOLERANCE[a.dtype]
    # a parity failure is reported (JSON, exit code 1) after the timings, so none are lost
    parity_ok = diff < tol

    # --- MLX ------------------------------------------------------------------------------------
    def mlx_fwd():
        mx.eval(model(x_mx, t_mx, dt_mx))

    def mlx_sample():
        gen = generate_step(model, batch_size=a.batch_size, length=a.length, steps=a.steps, seed=0)
        mx.eval(deque(gen, maxlen=1)[0].tokens)

    tic = time.perf_counter()
    mlx_fwd()
    mlx = {"first_call_s": time.perf_counter() - tic, "forward": _median_ms(mlx_fwd, a.repeats)}
    mlx["sampling"] = _median_ms(mlx_sample, a.repeats)

    # --- torch eager and compiled ---------------------------------------------------------------
    torch_eager = bench_torch(eager, x_np, t, dt, a, vocab)
    torch_eager["max_abs_logit_diff_vs_mlx"] = diff
    torch_compiled: dict = {}
    if a.no_compile:
        torch_compiled = {"skipped": "--no-compile"}
    else:
        try:
            compiled = TorchRunner(torch.compile(tmodel), a.device, a.dtype)
            with torch.inference_mode():
                got_c = compiled.logits(x_t, tt, dtt).float().cpu().numpy()
            diff_c = float(np.abs(ref - got_c).max())
            parity_ok = parity_ok and diff_c < tol
            torch_compiled = bench_torch(compiled, x_np, t, dt, a, vocab)
            torch_compiled["max_abs_logit_diff_vs_mlx"] = diff_c
        except Exception as e:  # a compile failure is a result, not a crash
            lines = traceback.format_exception_only(type(e), e)
            torch_compiled = {"error": "".join(lines).strip().splitlines()[0][:500]}

    def ratio(other: dict, key: str) -> float | None:
        if key not in other:
            return None
        return other[key]["median_ms"] / mlx[key]["median_ms"]

    result = {
        "benchmark": "mlx_vs_torch",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpu_count": __import__("os").cpu_count(),
            "mlx_device": str(mx.default_device()),
            "torch_device": a.device,
            "cuda_device": torch.cuda.get_device_name() if a.device == "cuda" else None,
            "torch_threads": torch.get_num_threads(),
            "cpu_blas_for_mlx": fsdfm_mlx._cpu_blas.STATE["blas"],
        },
        "versions": {
            "python": platform.python_version(),
            "mlx": mx.__version__,
            "torch": torch.__version__,
            "fsdfm_mlx": fsdfm_mlx.__version__,
        },
        "config": {
            "preset": a.preset,
            "parameters": params,
            "length": a.length,
            "steps": a.steps,
            "batch_size": a.batch_size,
            "dtype": a.dtype,
            "torch_half_precision": "float32 weights under torch.autocast"
            if a.dtype != "float32"
            else None,
            "solver": "mixture_euler_with_cumulative_scalar",
            "repeats": a.repeats,
            "forward_flops": flops,
        },
        "parity": {"max_abs_logit_diff": diff, "tolerance": tol, "ok": parity_ok},
        "mlx": mlx,
        "torch_eager": torch_eager,
        "torch_compile": torch_compiled,
        "speedup_mlx_vs_torch_eager": {
            "forward": ratio(torch_eager, "forward"),
            "sampling": ratio(torch_eager, "sampling"),
        },
        "speedup_mlx_vs_torch_compile": {
            "forward": ratio(torch_compiled, "forward"),
            "sampling": ratio(torch_compiled, "sampling"),
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    if not parity_ok:
        print(f"Error: MLX and torch logits differ beyond tolerance {tol}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
