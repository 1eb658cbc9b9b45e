"""Probe: would a mean-field target help the few-step student? (PyTorch, runs on a CPU.)

Eight parallel steps draw every position on its own given ``x_t``. The best product of
per-position laws for a joint law (reverse KL, the mean-field fixed point) reads each position's
law *given where the others go*: ``log q_i = E_{y ~ q}[log p(y_i | y_{-i})] + const``. A student
distilled towards that target can at best sample like the target itself, so this script samples
with it directly (teacher only, 3 forwards a step: the posterior at ``x_t``, then the posterior
re-read on two half-moved states, even positions moved / odd kept and the reverse) and scores the
passages with the evaluator, beside plain 8-step sampling.

    python examples/train_demo/probe_meanfield.py --teacher TEACHER_MLX_FOLDER --evaluator EVAL \
        --batches 2

Prints one JSON line per sampler (generative perplexity and token entropy of 16 x batches
passages, seeds 1000, 1001, ...).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from fsdfm_mlx.convert.torch_model import FSDFMTorch
from train import VOCAB, Settings, cumulative_scalar_step, model_args, read_mlx_folder_torch

import fsdfm_mlx  # noqa: F401  (before mlx.core: picks the fast CPU BLAS)
from fsdfm_mlx.evaluate import _context_token, load_evaluator, perplexities, token_entropy_bits


@torch.no_grad()
def sample(teacher, n: int, batch: int, seed: int, meanfield: bool, shift: float, length: int):
    torch.manual_seed(seed)
    x = torch.randint(0, VOCAB, (batch, length))
    even = (torch.arange(length) % 2 == 0)[None]  # [1, L]
    for k in range(n):
        t, h = torch.full((batch,), k / n), torch.full((batch,), 1 / n)
        final = k == n - 1
        logits = teacher(x, t).float()  # [B, L, V]
        if meanfield:
            y = cumulative_scalar_step(logits, x, t, h, final=final)  # where the others go
            z_even, z_odd = torch.where(even, y, x), torch.where(even, x, y)
            tt = torch.clamp(t + shift * h, max=1 - 1e-3)
            l_even = F.log_softmax(teacher(z_even, tt).float(), -1)  # targets for odd positions
            l_odd = F.log_softmax(teacher(z_odd, tt).float(), -1)
            logits = torch.where(even[..., None], l_odd, l_even)
        x = cumulative_scalar_step(logits, x, t, h, final=final)
    return x.numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True, help="the teacher as a converted MLX folder")
    ap.add_argument("--evaluator", required=True, help="an mlx-lm evaluator folder")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batches", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    s = Settings(stage="student")
    teacher = FSDFMTorch(model_args(s, student=False))
    teacher.load_state_dict(read_mlx_folder_torch(a.teacher))
    teacher.eval()
    ev, tok = load_evaluator(a.evaluator)
    ctx = _context_token(tok)
    for name, mf, shift in (
        ("plain", False, 0.0),
        ("meanfield", True, 0.0),
        ("meanfield_half", True, 0.5),
    ):
        tic = time.time()
        xs = np.concatenate(
            [sample(teacher, a.steps, 16, 1000 + b, mf, shift, s.length) for b in range(a.batches)]
        )
        ppl = perplexities(ev, xs, context_token=ctx)
        rec = dict(
            sampler=name,
            steps=a.steps,
            samples=len(xs),
            gen_ppl=float(ppl.mean()),
            entropy_bits=float(token_entropy_bits(xs).mean()),
            seconds=round(time.time() - tic, 1),
        )
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
