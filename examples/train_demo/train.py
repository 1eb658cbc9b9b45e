"""Train the demo DFM teacher on Shakespeare, then distil an FS-DFM student from it (PyTorch).

Two stages, each resumable (re-run the same command and it continues from its last checkpoint):

    # 1. DFM teacher: uniform source, kappa(t) = t, cross-entropy on x_1 (the official teacher loss)
    python examples/train_demo/train.py teacher --data examples/train_demo/data --work runs/demo
    # 2. FS-DFM student: step-size conditioned, initialised from the teacher
    python examples/train_demo/train.py student --data examples/train_demo/data --work runs/demo

Checkpoints are written in the official formats, so ``fsdfm-mlx convert`` is what turns them into
MLX models: ``teacher.pth`` = ``{"model", "optimizer", "step", ...}`` (DFM pre-training format) and
``student.pth`` = ``{"teacher_model", "student_model", "student_ema_model", "student_optimizer",
"step", ...}`` (FS-DFM distillation format). Every run appends its settings and losses to
``<work>/log.jsonl``.

Distillation (our own implementation). For each sequence a step size ``dt`` is drawn from the ladder
{1, 1/2, ..., 1/1024}, a time ``t`` on that step size's grid and ``x_t`` from the mixture path with
real text ``x_1``; the student sees ``(x_t, t, dt)`` and is trained towards the teacher's posterior
``p_1t(. | x_t, t)`` with the forward KL, at every step size. Why the same target at every ``dt``:
the cumulative-scalar update is built so that, fed the exact posterior, one jump of any size ``h``
reproduces each position's exact transition marginal from ``t`` to ``t + h`` (jump probability
``h / (1 - t)`` for a token the posterior rules out). A factorised one-step update can only match
those per-position marginals, so the best step-size conditioned target is the teacher's posterior
itself; ``dt`` conditioning lets the student correct for the teacher's calibration at each
resolution without being told to. (A first objective, an RK4-style average of the student's own
posteriors along simulated half steps, is the student of ``logs/shipped-run.jsonl``: it
taught the coarse step sizes to copy the tokens of the simulated end states, and the student wrote
word salad at 8 steps, generative perplexity 23k against 180 for the same student fed dt = 1/1024.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fsdfm_mlx.convert.torch_model import FSDFMTorch

from fsdfm_mlx.model import ModelArgs

VOCAB = 50257


@dataclass
class Settings:
    stage: str
    hidden_size: int = 256
    cond_dim: int = 64
    n_blocks: int = 6
    n_heads: int = 4
    length: int = 128
    batch_size: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 300
    weight_decay: float = 0.03
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    steps: int = 4000
    minutes: float = 8.0  # wall-clock budget for this run (stops early, checkpointing)
    seed: int = 0
    ema_decay: float = 0.995
    # student step sizes 1, 1/2, ..., 1/2^10
    max_log2_steps: int = 10
    log_every: int = 50
    ckpt_every: int = 500
    # student objective: "posterior" (KL to the teacher's posterior at every dt) or "trajectory"
    # (half the batch: on-policy states of the student's own coarse steps, cross-entropy towards
    # where a fine-stepped teacher run from that state ends; the other half: "posterior")
    objective: str = "posterior"
    fine_steps: int = 64  # the teacher's grid for trajectory targets (steps over [0, 1])
    traj_budgets: str = "4,8,8,16"  # coarse step budgets drawn (uniformly from this list)


def model_args(s: Settings, student: bool) -> ModelArgs:
    return ModelArgs(
        hidden_size=s.hidden_size,
        cond_dim=s.cond_dim,
        n_blocks=s.n_blocks,
        n_heads=s.n_heads,
        vocab_size=VOCAB,
        source_distribution="uniform",
        dt_conditioned=student,
        length=s.length,
    )


def init_weights(model: FSDFMTorch) -> None:
    """DiT-style init: small normal weights, zero adaLN (blocks start as identity), zero output layer."""
    for name, p in model.named_parameters():
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "norm_final" in name:
            torch.nn.init.ones_(p)
        elif name.endswith(".bias"):
            torch.nn.init.zeros_(p)
        else:
            torch.nn.init.normal_(p, std=0.02)
    for name, p in model.named_parameters():
        if "adaLN_modulation" in name or name.startswith("output_layer.linear"):
            torch.nn.init.zeros_(p)


class Batches:
    """Random windows of the token stream."""

    def __init__(self, tokens: np.ndarray, length: int, batch: int, device, seed: int):
        self.t = torch.from_numpy(tokens.astype(np.int64)).to(device)
        self.length, self.batch = length, batch
        self.g = torch.Generator(device="cpu").manual_seed(seed)

    def __call__(self) -> torch.Tensor:
        starts = torch.randint(0, len(self.t) - self.length, (self.batch,), generator=self.g)
        idx = starts[:, None] + torch.arange(self.length)[None]
        return self.t[idx.to(self.t.device)]


def mixture_path(x_1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t: each token is x_1 with probability kappa(t) = t, else uniform noise."""
    x_0 = torch.randint_like(x_1, VOCAB)
    keep = torch.rand(x_1.shape, device=x_1.device) < t[:, None]
    return torch.where(keep, x_1, x_0)


def lr_at(s: Settings, step: int) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    p = min(1.0, (step - s.warmup) / max(1, s.steps - s.warmup))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def log(work: Path, rec: dict) -> None:
    rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **rec}
    with open(work / "log.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)


def make_optimizer(model, s: Settings):
    return torch.optim.AdamW(
        model.parameters(), lr=s.lr, betas=s.betas, weight_decay=s.weight_decay
    )


@torch.no_grad()
def heldout_loss(model, tokens, s: Settings, device, student: bool) -> float:
    """Mean cross-entropy on held-out windows at fixed times (a comparable number across runs)."""
    model.eval()
    g = torch.Generator(device="cpu").manual_seed(123)
    b = Batches(tokens, s.length, 64, device, 0)
    b.g = g
    losses = []
    for t_val in (0.25, 0.5, 0.75):
        torch.manual_seed(7)
        x_1 = b()
        t = torch.full((x_1.shape[0],), t_val, device=device)
        x_t = mixture_path(x_1, t)
        with torch.autocast(
            device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
        ):
            logits = model(x_t, t, torch.full_like(t, 1 / 1024) if student else None)
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), x_1.flatten()).item())
    model.train()
    return float(np.mean(losses))


def train_teacher(s: Settings, data: Path, work: Path, device) -> None:
    ckpt_path = work / "teacher.pth"
    torch.manual_seed(s.seed)
    model = FSDFMTorch(model_args(s, student=False)).to(device)
    init_weights(model)
    opt = make_optimizer(model, s)
    step = 0
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step = ck["step"]
    train = np.load(data / "train.npy")
    held = np.load(data / "heldout.npy")
    batches = Batches(train, s.length, s.batch_size, device, s.seed + step)
    log(
        work,
        {
            "event": "start",
            "stage": "teacher",
            "step": step,
            "settings": asdict(s),
            "params": sum(p.numel() for p in model.parameters()),
        },
    )
    fwd = torch.compile(model) if device.type == "cuda" else model
    t0, losses = time.time(), []
    while step < s.steps and (time.time() - t0) < s.minutes * 60:
        for g in opt.param_groups:
            g["lr"] = lr_at(s, step)
        x_1 = batches()
        t = torch.rand(x_1.shape[0], device=device)
        x_t = mixture_path(x_1, t)
        with torch.autocast(
            device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
        ):
            logits = fwd(x_t, t)
        loss = F.cross_entropy(logits.float().flatten(0, 1), x_1.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        step += 1
        losses.append(loss.item())
        if step % s.log_every == 0:
            log(
                work,
                {
                    "stage": "teacher",
                    "step": step,
                    "loss": float(np.mean(losses)),
                    "lr": lr_at(s, step),
                    "elapsed_s": round(time.time() - t0, 1),
                },
            )
            losses = []
        if step % s.ckpt_every == 0:
            _save_teacher(ckpt_path, model, opt, step, s)
    _save_teacher(ckpt_path, model, opt, step, s)  # the final state, once
    log(
        work,
        {
            "event": "end",
            "stage": "teacher",
            "step": step,
            "heldout_ce": heldout_loss(model, held, s, device, False),
            "elapsed_s": round(time.time() - t0, 1),
        },
    )


def sample_dt_t(s: Settings, B: int, device):
    """Per sequence: a step size from the ladder and a time on its grid."""
    k = torch.randint(0, s.max_log2_steps + 1, (B,), device=device)
    dt = 0.5 ** k.float()
    n_steps = torch.round(1.0 / dt)
    t = torch.floor(torch.rand(B, device=device) * n_steps) / n_steps
    return t, dt


def sample_categorical(logits: torch.Tensor) -> torch.Tensor:
    """One draw per row of [..., V] logits (exponential race: argmax p / E, E ~ Exp(1))."""
    e = torch.empty_like(logits, dtype=torch.float32).exponential_()
    return (logits.float() - e.log()).argmax(-1)


def cumulative_scalar_step(
    logits: torch.Tensor, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, final: bool
) -> torch.Tensor:
    """``mixture_euler_with_cumulative_scalar`` for kappa(t) = t (the runtime's default solver).

    Non-final: ``alpha = (ln(1 - t) - ln(1 - t - h)) / h``; jump with probability
    ``1 - exp(-h alpha (1 - p_z))`` to ``x ~ p_1t`` without ``z``. Final: ``x_1 ~ p_1t``.
    ``t``, ``h``: [B]; ``logits`` [B, L, V]; ``x`` [B, L].
    """
    if final:
        return sample_categorical(logits)
    logp = F.log_softmax(logits.float(), -1)
    log_p_z = logp.gather(-1, x[..., None])[..., 0]  # [B, L]
    stay = lambda u: torch.log(torch.clamp(1.0 - u, 1e-8, 1.0))  # noqa: E731
    alpha = (stay(t) - stay(t + h)) / (h + 1e-8)  # [B]
    lam = torch.clamp_min(alpha[:, None] * -torch.expm1(log_p_z), 1e-12)
    jump = torch.rand_like(log_p_z) < -torch.expm1(-h[:, None] * lam)
    dest = sample_categorical(logp.scatter(-1, x[..., None], float("-inf")))
    return torch.where(jump & (log_p_z < 0), dest, x)


@torch.no_grad()
def trajectory_targets(s: Settings, student, teacher, B: int, device, ac):
    """On-policy states and where a fine-stepped teacher run from them ends.

    One coarse budget ``n`` and one step index ``k < n`` per call: ``x_t`` (t = k / n) comes from
    ``k`` steps of the student itself (dt = 1 / n) from uniform noise, the state few-step sampling
    really meets; the target ``x_1`` is the end of the teacher's run from ``(x_t, t)`` on a grid of
    ``fine_steps`` steps per unit time. Returns ``x_t, t, dt, x_1`` ([B, L], [B], [B], [B, L]).
    """
    budgets = [int(b) for b in s.traj_budgets.split(",")]
    n = budgets[int(torch.randint(0, len(budgets), ()))]
    k = int(torch.randint(0, n, ()))
    x = torch.randint(0, VOCAB, (B, s.length), device=device)
    dt = torch.full((B,), 1.0 / n, device=device)
    for i in range(k):
        t = torch.full((B,), i / n, device=device)
        with ac():
            logits = student(x, t, dt)
        x = cumulative_scalar_step(logits, x, t, dt, final=False)
    x_t, t_0 = x.clone(), torch.full((B,), k / n, device=device)
    fine = max(s.fine_steps, n)
    first = round(k / n * fine)
    h = torch.full((B,), 1.0 / fine, device=device)
    for j in range(first, fine):
        t = torch.full((B,), j / fine, device=device)
        with ac():
            logits = teacher(x, t)
        x = cumulative_scalar_step(logits, x, t, h, final=j == fine - 1)
    return x_t, t_0, dt, x, n, k


def read_mlx_folder_torch(path: str) -> dict[str, torch.Tensor]:
    """A converted MLX folder as a float32 state dict, with torch alone (no MLX needed).

    MLX's affine quantization: ``w = scales * q + biases`` (in the scales' dtype) per group of ``group_size`` inputs, ``q``
    packed little-endian into uint32 words (``32 // bits`` values each).
    """
    from safetensors.torch import load_file

    folder = Path(path)
    q = json.loads((folder / "config.json").read_text()).get("quantization") or {}
    raw = {}
    for f in sorted(folder.glob("*.safetensors")):
        raw.update(load_file(f))
    out = {}
    for k, v in raw.items():
        if k.endswith((".scales", ".biases")):
            continue
        name = k[: -len(".weight")] if k.endswith(".weight") else None
        if name is None or f"{name}.scales" not in raw:
            out[k] = v.float()
            continue
        layer = q.get(name) if isinstance(q.get(name), dict) else q
        bits, gs = int(layer["bits"]), int(layer["group_size"])
        shifts = torch.arange(0, 32, bits, dtype=torch.int64)
        words = v.to(torch.int64) & 0xFFFFFFFF  # [O, I * bits / 32]
        vals = ((words[..., None] >> shifts) & ((1 << bits) - 1)).flatten(-2)  # [O, I]
        scales, biases = raw[f"{name}.scales"], raw[f"{name}.biases"]
        # in the scales' dtype, as MLX's dequantize computes it
        vals = vals.to(scales.dtype).unflatten(-1, (-1, gs)) * scales[..., None] + biases[..., None]
        out[k] = vals.flatten(-2).float()
    return out


def load_teacher(s: Settings, work: Path, device, teacher_mlx: str | None):
    """The teacher: ``<work>/teacher.pth``, or a converted MLX folder (dequantized to float32)."""
    teacher = FSDFMTorch(model_args(s, student=False)).to(device)
    if teacher_mlx:
        teacher.load_state_dict(read_mlx_folder_torch(teacher_mlx))
    else:
        ck = torch.load(work / "teacher.pth", map_location=device, weights_only=True)
        teacher.load_state_dict(ck["model"])
    return teacher.eval().requires_grad_(False)


def train_student(
    s: Settings, data: Path, work: Path, device, teacher_mlx=None, init_mlx=None
) -> None:
    ckpt_path = work / "student.pth"
    teacher = load_teacher(s, work, device, teacher_mlx)
    torch.manual_seed(s.seed + 1)
    student = FSDFMTorch(model_args(s, student=True)).to(device)
    init_weights(student)
    # the student starts from the teacher's weights; dt embedding and fusers are new
    missing, _ = student.load_state_dict(teacher.state_dict(), strict=False)
    if init_mlx:  # or from an already distilled student (a converted MLX folder)
        student.load_state_dict(read_mlx_folder_torch(init_mlx))
    ema = FSDFMTorch(model_args(s, student=True)).to(device)
    ema.load_state_dict(student.state_dict())
    ema.eval().requires_grad_(False)
    opt = make_optimizer(student, s)
    step = 0
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        student.load_state_dict(ck["student_model"])
        ema.load_state_dict(ck["student_ema_model"])
        opt.load_state_dict(ck["student_optimizer"])
        step = ck["step"]
    train = np.load(data / "train.npy")
    held = np.load(data / "heldout.npy")
    batches = Batches(train, s.length, s.batch_size, device, s.seed + 10_000 + step)
    log(
        work,
        {
            "event": "start",
            "stage": "student",
            "step": step,
            "settings": asdict(s),
            "new_tensors": sorted(missing),
            "teacher": teacher_mlx or str(work / "teacher.pth"),
            "init": init_mlx or "teacher",
            "params": sum(p.numel() for p in student.parameters()),
        },
    )
    cuda = device.type == "cuda"
    s_fwd = torch.compile(student) if cuda else student
    t_fwd = torch.compile(teacher) if cuda else teacher
    e_fwd = torch.compile(ema) if cuda else ema
    traj = s.objective == "trajectory"
    if s.objective not in ("posterior", "trajectory"):
        raise SystemExit(f"unknown --objective {s.objective!r} (posterior or trajectory)")

    def ac():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda)

    t0, losses = time.time(), []
    while step < s.steps and (time.time() - t0) < s.minutes * 60:
        for g in opt.param_groups:
            g["lr"] = lr_at(s, step)
        x_1 = batches()
        B = x_1.shape[0]
        t, dt = sample_dt_t(s, B, device)
        x_t = mixture_path(x_1, t)
        B_traj = B // 2 if traj else 0
        if traj:  # the first half of the batch: on-policy states, trajectory targets
            xt_tr, t_tr, dt_tr, x1_tr, n_tr, k_tr = trajectory_targets(
                s, e_fwd, t_fwd, B_traj, device, ac
            )
            x_t, t, dt = x_t[B_traj:], t[B_traj:], dt[B_traj:]
        with torch.no_grad(), ac():
            target = t_fwd(x_t, t).float()  # the teacher's posterior p_1t(. | x_t, t)
        if traj:
            x_t, t, dt = torch.cat([xt_tr, x_t]), torch.cat([t_tr, t]), torch.cat([dt_tr, dt])
        with ac():
            logits = s_fwd(x_t, t, dt)
        logq = F.log_softmax(logits.float(), -1)
        logp = F.log_softmax(target, -1)
        kl = (logp.exp() * (logp - logq[B_traj:])).sum(-1).mean(-1)  # [B - B_traj]
        loss = kl.mean()
        ce_traj = float("nan")
        if traj:
            ce = -logq[:B_traj].gather(-1, x1_tr[..., None])[..., 0].mean()
            loss = 0.5 * loss + 0.5 * ce
            ce_traj = ce.item()
        dt = dt[B_traj:]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), s.grad_clip)
        opt.step()
        with torch.no_grad():
            for pe, ps in zip(ema.parameters(), student.parameters(), strict=True):
                pe.lerp_(ps, 1 - s.ema_decay)
        step += 1
        coarse = dt >= 1 / 16  # the step sizes few-step sampling uses
        losses.append(
            (
                loss.item(),
                kl[coarse].mean().item() if coarse.any() else float("nan"),
                kl[~coarse].mean().item() if (~coarse).any() else float("nan"),
                ce_traj,
            )
        )
        if step % s.log_every == 0:
            arr = np.array(losses)
            log(
                work,
                {
                    "stage": "student",
                    "step": step,
                    "loss": float(np.nanmean(arr[:, 0])),
                    "kl_dt_ge_1_16": float(np.nanmean(arr[:, 1])),
                    "kl_dt_lt_1_16": float(np.nanmean(arr[:, 2])),
                    **({"ce_trajectory": float(np.nanmean(arr[:, 3]))} if traj else {}),
                    "lr": lr_at(s, step),
                    "elapsed_s": round(time.time() - t0, 1),
                },
            )
            losses = []
        if step % s.ckpt_every == 0:
            _save_student(ckpt_path, teacher, student, ema, opt, step, s)
    _save_student(ckpt_path, teacher, student, ema, opt, step, s)
    log(
        work,
        {
            "event": "end",
            "stage": "student",
            "step": step,
            "heldout_ce_ema_fine_dt": heldout_loss(ema, held, s, device, True),
            "elapsed_s": round(time.time() - t0, 1),
        },
    )


def _save_teacher(path, model, opt, step, s):
    """DFM pre-training format: ``{"model", "optimizer", "step", samplers}``."""
    save_atomic(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "train_sampler": {"epoch": 0, "seed": s.seed},
            "test_sampler": {"epoch": 0, "seed": s.seed},
        },
        path,
    )


def _save_student(path, teacher, student, ema, opt, step, s):
    save_atomic(
        {
            "step": step,
            "train_sampler": {"epoch": 0, "seed": s.seed},
            "test_sampler": {"epoch": 0, "seed": s.seed},
            "teacher_model": teacher.state_dict(),
            "student_model": student.state_dict(),
            "student_ema_model": ema.state_dict(),
            "student_optimizer": opt.state_dict(),
        },
        path,
    )


def write_config(s: Settings, work: Path) -> None:
    """The model:/flow: part of a training config, for ``fsdfm-mlx convert --config``."""
    import yaml

    cfg = {
        "model": {
            "hidden_size": s.hidden_size,
            "cond_dim": s.cond_dim,
            "n_blocks": s.n_blocks,
            "n_heads": s.n_heads,
            "dropout": 0.0,
            "length": s.length,
            "compile": True,
        },
        "flow": {
            "source_distribution": "uniform",
            "scheduler_type": "polynomial",
            "exponent": 1.0,
            "student_solver": "mixture_euler_with_cumulative_scalar",
            "sampling_steps": 1024,
        },
    }
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["teacher", "student"])
    ap.add_argument("--data", default="examples/train_demo/data")
    ap.add_argument("--work", default="runs/demo")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--teacher-mlx",
        default=None,
        help="student stage: take the teacher from this converted MLX folder (dequantized)",
    )
    ap.add_argument(
        "--init-mlx",
        default=None,
        help="student stage: start the student from this converted MLX student (a new run only)",
    )
    for f, v in asdict(Settings(stage="x")).items():
        if f == "stage" or isinstance(v, tuple):
            continue
        ap.add_argument("--" + f.replace("_", "-"), type=type(v), default=None)
    a = ap.parse_args()
    s = Settings(
        stage=a.stage,
        **{
            k: v
            for k, v in vars(a).items()
            if k in Settings.__dataclass_fields__ and k != "stage" and v is not None
        },
    )
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    write_config(s, work)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if a.stage == "teacher":
        train_teacher(s, Path(a.data), work, device)
    else:
        train_student(s, Path(a.data), work, device, a.teacher_mlx, a.init_mlx)


if __name__ == "__main__":
    main()
