"""Train the small autoregressive evaluator (GPT-2 architecture) on the demo's training split.

Generative perplexity needs an AR model; the paper uses GPT-2 Large from the Hub. For offline use the
demo ships this one, trained on the same Shakespeare split as the diffusion models:

    python examples/train_demo/train_evaluator.py --data examples/train_demo/data --out runs/evaluator-hf
    python -m mlx_lm convert --hf-path runs/evaluator-hf --mlx-path examples/train_demo/artifacts/shakespeare-ar --dtype float16

The output is a Hugging Face GPT-2 folder (config.json, model.safetensors, tokenizer files) that
``mlx_lm.convert`` turns into mlx-lm's format.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="examples/train_demo/data")
    ap.add_argument("--out", default="runs/evaluator-hf")
    ap.add_argument("--tokenizer", default="fsdfm_mlx/assets/gpt2")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-dtype", choices=["float32", "bfloat16"], default="float32")
    a = ap.parse_args()

    from transformers import GPT2Config, GPT2LMHeadModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(a.seed)
    cfg = GPT2Config(
        vocab_size=50257,
        n_positions=a.length,
        n_embd=a.dim,
        n_layer=a.layers,
        n_head=a.heads,
        bos_token_id=50256,
        eos_token_id=50256,
    )
    model = GPT2LMHeadModel(cfg).to(device)
    train = torch.from_numpy(np.load(Path(a.data) / "train.npy").astype(np.int64)).to(device)
    held = torch.from_numpy(np.load(Path(a.data) / "heldout.npy").astype(np.int64)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(a.seed)

    def batch(tokens, n, gen):
        s = torch.randint(0, len(tokens) - a.length - 1, (n,), generator=gen)
        idx = (s[:, None] + torch.arange(a.length + 1)[None]).to(device)
        return tokens[idx]

    log = Path(a.out + ".log.jsonl")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    t0, step, losses = time.time(), 0, []
    while step < a.steps and time.time() - t0 < a.minutes * 60:
        lr = (
            a.lr
            * min(1.0, (step + 1) / 200)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        )
        for pg in opt.param_groups:
            pg["lr"] = lr
        x = batch(train, a.batch_size, g)
        with torch.autocast(
            device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
        ):
            logits = model(x[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        if step % 100 == 0:
            rec = {
                "step": step,
                "loss": float(np.mean(losses)),
                "lr": lr,
                "elapsed_s": round(time.time() - t0, 1),
            }
            losses = []
            print(json.dumps(rec), flush=True)
            with open(log, "a") as f:
                f.write(json.dumps(rec) + "\n")
    model.eval()
    with torch.no_grad():
        hg = torch.Generator().manual_seed(1)
        x = batch(held, 64, hg)
        hl = F.cross_entropy(
            model(x[:, :-1]).logits.float().flatten(0, 1), x[:, 1:].flatten()
        ).item()
    rec = {
        "event": "end",
        "steps": step,
        "heldout_nll": hl,
        "heldout_ppl": math.exp(hl),
        "params": sum(p.numel() for p in model.parameters()),
        "elapsed_s": round(time.time() - t0, 1),
    }
    print(json.dumps(rec), flush=True)
    with open(log, "a") as f:
        f.write(json.dumps(rec) + "\n")
    model.save_pretrained(a.out, safe_serialization=True)
    # mlx-lm's gpt2 expects the original GPT-2 checkpoint keys ("h.0...", "wte.weight"; tied head)
    from safetensors.torch import save_file

    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), (
        "head not tied"
    )
    dt = torch.bfloat16 if a.save_dtype == "bfloat16" else torch.float32
    sd = {
        k.removeprefix("transformer."): v.detach().to(dt).contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith("lm_head.") and not k.endswith(".attn.bias")
    }
    save_file(sd, str(Path(a.out) / "model.safetensors"), metadata={"format": "pt"})
    # read the file back into a fresh model: the exported weights must score like the trained ones
    from safetensors.torch import load_file

    fresh = GPT2LMHeadModel(cfg).to(device).eval()
    missing, _ = fresh.load_state_dict(
        {
            "transformer." + k: v.float()
            for k, v in load_file(str(Path(a.out) / "model.safetensors")).items()
        },
        strict=False,
    )
    fresh.tie_weights()
    with torch.no_grad():
        x = batch(held, 64, torch.Generator().manual_seed(1))
        rl = F.cross_entropy(
            fresh(x[:, :-1]).logits.float().flatten(0, 1), x[:, 1:].flatten()
        ).item()
    rec = {"event": "export-check", "heldout_nll_reloaded": rl, "missing": sorted(missing)}
    print(json.dumps(rec), flush=True)
    with open(log, "a") as f:
        f.write(json.dumps(rec) + "\n")
    # mlx-lm's gpt2 reads n_ctx, which newer transformers no longer writes
    cfg_path = Path(a.out) / "config.json"
    c = json.loads(cfg_path.read_text())
    c.setdefault("n_ctx", a.length)
    cfg_path.write_text(json.dumps(c, indent=2))
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copyfile(Path(a.tokenizer) / f, Path(a.out) / f)


if __name__ == "__main__":
    main()
