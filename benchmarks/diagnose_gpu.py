"""GPU diagnostics for the performance work: prints JSON (run on the lent GPU, MLX CUDA backend).

    python benchmarks/diagnose_gpu.py [--preset 1.3b] [--length 1024]

Parts (each guarded; an error is recorded, the next part runs):
  memory   active memory after building the model, then the peak of one forward pass, of one
           sampler step (fused kernel / portable) and of a whole 8-step generation, for bf16 and
           4-bit weights (1.3B, B=1)
  forward  one forward pass eager vs ``mx.compile``d, and the matmuls alone (same shapes)
  segments 8-step generation (1.3B, B=1) with the forward queued whole or a few blocks at a time
           (``blocks_per_eval``), with and without the step lookahead: peak memory and latency,
           bf16 and 4-bit
  forward8 the B=8 forward's parts: compiled forward (RoPE on bf16 vs on a float32 copy), the
           matmuls alone, q/k/v as three matmuls vs one, attention alone
  forward1 the same at B=1
  quant    the shipped 4-bit model: GPU logits (quantized matmuls) against CPU logits
           (dequantized float32), and a short GPU sample's text
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import time
import traceback
from collections import deque

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from fsdfm_mlx import kernels
from fsdfm_mlx.generate import compiled_forward, generate_step
from fsdfm_mlx.model import padded_rows
from fsdfm_mlx.profile import random_model
from fsdfm_mlx.solvers import CUMULATIVE, sample_step

GB = 1e9


def _peak(fn) -> float:
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    out = fn()
    mx.eval(out)
    mx.synchronize()
    return mx.get_peak_memory() / GB


def _ms(fn, repeats=10) -> float:
    mx.eval(fn())
    mx.synchronize()
    ts = []
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(fn())
        ts.append((time.perf_counter() - tic) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def _memory_one(model, L) -> dict:
    r = {"active_after_build_gb": mx.get_active_memory() / GB}
    x = mx.zeros((1, L), mx.int32)
    t = mx.array([0.5])
    fwd = compiled_forward(model)
    r["forward_eager_peak_gb"] = _peak(lambda: model(x, t, t))
    r["forward_compiled_peak_gb"] = _peak(lambda: fwd(x, t, t))
    logits = fwd(x, t, t)
    mx.eval(logits)
    for fused in (True, False):
        key = mx.random.key(0)
        r[f"step_peak_gb_fused_{fused}"] = _peak(
            functools.partial(
                sample_step, logits, x, 0.5, 0.125, key, solver=CUMULATIVE, fused=fused
            )
        )

    for c, la in ((False, False), (True, False), (True, True)):
        run = functools.partial(_generate8, model, L, c, la)
        run()
        r[f"generate8_compile_{c}_lookahead_{la}_peak_gb"] = _peak(run)
        r[f"generate8_compile_{c}_lookahead_{la}_ms"] = _ms(run, 3)
    for n in (256, 512):
        xs = mx.zeros((1, n), mx.int32)
        r[f"forward_eager_peak_gb_L{n}"] = _peak(functools.partial(model, xs, t, t))
    # does memory build up over sequential evaluated forwards / generation steps?
    for k in (1, 2, 4, 8):
        r[f"forwards_{k}_each_evaluated_peak_gb"] = _peak(
            functools.partial(_forwards, model, x, t, k)
        )
        gen = functools.partial(_generate, model, L, k, False, False)
        r[f"generate_steps_{k}_eager_sync_peak_gb"] = _peak(gen)
    return r


def _forwards(model, x, t, k):
    for _ in range(k):
        y = model(x, t, t)
        mx.eval(y)
    return y


def _generate(model, L, steps, compile, lookahead):
    gen = generate_step(
        model, batch_size=1, length=L, steps=steps, seed=0, compile=compile, lookahead=lookahead
    )
    return deque(gen, maxlen=1)[0].tokens


def _generate8(model, L, compile, lookahead):
    return _generate(model, L, 8, compile, lookahead)


def memory(preset, L):
    out = {}
    for name, q in (("bf16", None), ("q4", 4)):
        gc.collect()
        mx.clear_cache()
        mx.reset_peak_memory()
        model = random_model(preset, length=L, dtype="bfloat16", quantize=q)
        out[name] = {"build_peak_gb": mx.get_peak_memory() / GB, **_memory_one(model, L)}
    return out


def _generate_opts(model, L, **kw):
    gen = generate_step(model, batch_size=1, length=L, steps=8, seed=0, **kw)
    return deque(gen, maxlen=1)[0].tokens


def segments(preset, L):
    out = {}
    for name, q in (("bf16", None), ("q4", 4)):
        gc.collect()
        mx.clear_cache()
        model = random_model(preset, length=L, dtype="bfloat16", quantize=q)
        r = {"weights_gb": mx.get_active_memory() / GB}
        for per in (0, 1, 2, 3, 4, 7):
            for la in (True, False):
                run = functools.partial(_generate_opts, model, L, blocks_per_eval=per, lookahead=la)
                run()
                r[f"per{per}_lookahead_{la}_peak_gb"] = _peak(run)
                r[f"per{per}_lookahead_{la}_ms"] = _ms(run, 5)
        out[name] = r
        del model, run  # run holds the model: the next model's figures must not include it
    return out


def forward8(preset, L, B=8):
    import fsdfm_mlx.model as fm

    model = random_model(preset, length=L, dtype="bfloat16")
    a = model.args
    x = mx.zeros((B, L), mx.int32)
    t = mx.full((B,), 0.5)
    r = {}
    original = fm._rope_computes_in_input_dtype
    try:
        for upcast in (False, True):
            fm._rope_computes_in_input_dtype = lambda u=upcast: u
            model.__dict__.pop("_fsdfm_forwards", None)
            fwd = compiled_forward(model)
            r[f"compiled_ms_rope_upcast_{upcast}"] = _ms(functools.partial(fwd, x, t, t))
    finally:  # the parts that run after this one must see the real rule
        fm._rope_computes_in_input_dtype = original
        model.__dict__.pop("_fsdfm_forwards", None)
    r["eager_ms"] = _ms(lambda: model(x, t, t))
    D, F, V, M = a.hidden_size, a.mlp_ratio * a.hidden_size, a.num_tokens, B * L
    h = mx.random.normal((M, D)).astype(mx.bfloat16)
    wq = [mx.random.normal((D, D)).astype(mx.bfloat16) * 0.02 for _ in range(3)]
    wqkv = mx.concatenate(wq, axis=0)
    w1 = mx.random.normal((F, D)).astype(mx.bfloat16) * 0.02
    w2 = mx.random.normal((D, F)).astype(mx.bfloat16) * 0.02
    wo = mx.random.normal((V, D)).astype(mx.bfloat16) * 0.02
    mx.eval(h, wq, wqkv, w1, w2, wo)
    n = a.n_blocks
    r["qkv_three_ms_x_blocks"] = _ms(lambda: [[h @ w.T for w in wq] for _ in range(n)])
    r["qkv_one_ms_x_blocks"] = _ms(lambda: [h @ wqkv.T for _ in range(n)])
    r["attn_out_ms_x_blocks"] = _ms(lambda: [h @ wq[0].T for _ in range(n)])
    r["mlp_ms_x_blocks"] = _ms(lambda: [(h @ w1.T) @ w2.T for _ in range(n)])
    r["mlp_gelu_ms_x_blocks"] = _ms(lambda: [nn.gelu(h @ w1.T) @ w2.T for _ in range(n)])
    r["output_ms"] = _ms(lambda: h @ wo.T)
    wp = mx.concatenate([wo, mx.zeros((padded_rows(V) - V, D), wo.dtype)])
    mx.eval(wp)
    r["output_padded_rows_ms"] = _ms(lambda: (h @ wp.T)[:, :V])
    r["output_padded_rows_contiguous_ms"] = _ms(lambda: mx.contiguous((h @ wp.T)[:, :V]))
    q = mx.random.normal((B, a.n_heads, L, a.head_dim)).astype(mx.bfloat16)
    mx.eval(q)
    r["sdpa_ms_x_blocks"] = _ms(
        lambda: [mx.fast.scaled_dot_product_attention(q, q, q, scale=0.1) for _ in range(n)]
    )
    flops = 2 * M * (n * (4 * D * D + 2 * D * F) + D * V) + n * 4 * B * L * L * D
    r["model_tflop"] = flops / 1e12
    r["matmul_peak_tflops"] = None
    try:
        from fsdfm_mlx.profile import matmul_tflops

        r["matmul_peak_tflops"] = matmul_tflops(8192, "bfloat16")
    except Exception as e:  # noqa: BLE001
        r["matmul_peak_error"] = str(e)
    return r


def forward(preset, L):
    model = random_model(preset, length=L, dtype="bfloat16")
    a = model.args
    x = mx.zeros((1, L), mx.int32)
    t = mx.array([0.5])
    fwd = compiled_forward(model)
    r = {
        "eager_ms": _ms(lambda: model(x, t, t)),
        "compiled_ms": _ms(lambda: fwd(x, t, t)),
    }
    D, F, V = a.hidden_size, a.mlp_ratio * a.hidden_size, a.num_tokens
    h = mx.random.normal((L, D)).astype(mx.bfloat16)
    ws = [mx.random.normal((n, D)).astype(mx.bfloat16) * 0.02 for n in (3 * D, D, F)]
    w2 = mx.random.normal((D, F)).astype(mx.bfloat16) * 0.02
    wo = mx.random.normal((V, D)).astype(mx.bfloat16) * 0.02
    mx.eval(h, ws, w2, wo)

    def mm():
        y = h
        for _ in range(a.n_blocks):
            qkv = y @ ws[0].T
            y = y + (qkv[:, :D] @ ws[1].T)
            y = y + (nn.gelu(y @ ws[2].T) @ w2.T)
        return y @ wo.T

    r["matmuls_only_ms"] = _ms(mm)
    q = mx.random.normal((1, a.n_heads, L, a.head_dim)).astype(mx.bfloat16)
    mx.eval(q)
    r["sdpa_x_blocks_ms"] = _ms(
        lambda: [
            mx.fast.scaled_dot_product_attention(q, q, q, scale=0.1) for _ in range(a.n_blocks)
        ]
    )
    return r


def qmm(path=None):
    """Quantized matmul on this GPU against the same dequantized weights, per layer shape."""
    from fsdfm_mlx.load import default_model_path, load

    model, _ = load(path or default_model_path(), dequantize=False)
    out = {}
    for name, m in tree_flatten(model.leaf_modules(), is_leaf=lambda x: isinstance(x, nn.Module)):
        if not isinstance(m, nn.QuantizedLinear):
            continue
        K = m.weight.shape[1] * 32 // m.bits
        w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
        shape = f"{w.shape[0]}x{K}"
        for M in (2, 256):
            x = mx.random.normal((M, K), key=mx.random.key(M)).astype(w.dtype)
            q = mx.quantized_matmul(x, m.weight, m.scales, m.biases, True, m.group_size, m.bits)
            ref = x.astype(mx.float32) @ w.astype(mx.float32).T
            err = float(mx.abs(q.astype(mx.float32) - ref).max() / (mx.abs(ref).max() + 1e-6))
            key = f"{shape}_M{M}"
            out[key] = max(out.get(key, 0.0), err)
            out.setdefault("layers_" + key, name)
    return out


def quant(path=None, teacher=None):
    from fsdfm_mlx.load import default_model_path, load

    path = path or default_model_path()
    gpu_model, tokenizer = load(path, dequantize=False)
    with mx.stream(mx.cpu):
        mx.set_default_device(mx.cpu)
        cpu_model, _ = load(path)
        x = mx.random.randint(0, 50257, (2, 128), key=mx.random.key(0)).astype(mx.int32)
        t = mx.array([0.3, 0.9])
        ref = cpu_model(x, t, t).astype(mx.float32)
        mx.eval(ref)
    mx.set_default_device(mx.gpu)
    got = gpu_model(x, t, t).astype(mx.float32)
    lp = ref - mx.logsumexp(ref, -1, keepdims=True)
    lq = got - mx.logsumexp(got, -1, keepdims=True)
    kl = (mx.exp(lp) * (lp - lq)).sum(-1).mean()
    r = {
        "gpu_dtype": str(gpu_model.dtype),
        "max_abs_logit_diff": float(mx.abs(ref - got).max()),
        "mean_kl_cpu_to_gpu": float(kl),
    }
    from fsdfm_mlx.generate import generate

    r["gpu_text_8_steps"] = generate(gpu_model, tokenizer, seed=1)
    r["gpu_text_dequantized_8_steps"] = generate(load(path, dequantize=True)[0], tokenizer, seed=1)
    if teacher:
        # the teacher at 1,024 steps: quantized matmuls vs dequantized weights, same seed
        for deq in (False, True):
            m, tok = load(teacher, dequantize=deq)
            *_, last = generate_step(m, batch_size=4, steps=1024, seed=3)
            ids = np.array(last.tokens)
            r[f"teacher_1024_dequantized_{deq}"] = {
                "newline_fraction": float((ids == 198).mean()),
                "distinct_tokens": int(len(np.unique(ids))),
                "text": tok.decode(ids[0].tolist())[:300],
            }
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="1.3b")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--parts", default="memory,forward,quant,qmm")
    p.add_argument(
        "--model", default=None, help="4-bit model for the quant part (default: shipped)"
    )
    p.add_argument("--teacher", default=None, help="a 4-bit DFM teacher for the quant part")
    a = p.parse_args()
    res = {
        "device": str(mx.default_device()),
        "mlx": mx.__version__,
        "fused_kernel": kernels.backend() if kernels.available() else None,
    }
    for part in a.parts.split(","):
        tic = time.perf_counter()
        try:
            res[part] = {
                "memory": lambda: memory(a.preset, a.length),
                "segments": lambda: segments(a.preset, a.length),
                "forward8": lambda: forward8(a.preset, a.length),
                "forward1": lambda: forward8(a.preset, a.length, B=1),
                "forward": lambda: forward(a.preset, a.length),
                "quant": lambda: quant(a.model, a.teacher),
                "qmm": lambda: qmm(a.model),
            }[part]()
        except Exception as e:  # noqa: BLE001 - diagnostics: record and go on
            res[part] = {
                "error": f"{type(e).__name__}: {e}",
                "trace": traceback.format_exc()[-1500:],
            }
        res[part + "_s"] = round(time.perf_counter() - tic, 1)
        print(json.dumps({part: res[part]}), flush=True)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
