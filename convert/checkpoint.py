"""Read an official FS-DFM / DFM PyTorch checkpoint lazily and work out the model it holds.

Both official formats are understood: the FS-DFM distillation checkpoint (``teacher_model``,
``student_model``, ``student_ema_model`` + optimizers) and the DFM pre-training checkpoint (``model`` +
``optimizer``). Files are opened with ``torch.load(weights_only=True, mmap=True)``: a pickle that tries to
run code is refused before it runs, and no tensor (optimizer state included) is read until touched.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..model import ModelArgs, strip_prefixes

PRESETS: dict[str, dict[str, int]] = {
    "170m": {"hidden_size": 768, "cond_dim": 128, "n_blocks": 12, "n_heads": 12},
    "1.3b": {"hidden_size": 2048, "cond_dim": 256, "n_blocks": 21, "n_heads": 32},
    "1.7b": {"hidden_size": 2048, "cond_dim": 256, "n_blocks": 28, "n_heads": 32},
}
GPT2_VOCAB = 50257

# CLI name -> checkpoint entry
WEIGHT_ENTRIES = {
    "student": "student_model",
    "student_ema": "student_ema_model",
    "teacher": "teacher_model",
}
# the official evaluation's choice first, then the pre-training model, then the teacher
DEFAULT_ORDER = ("student_model", "model", "teacher_model")


class CheckpointError(ValueError):
    """A checkpoint (or the options that describe it) cannot be used; the message is one line."""


@dataclass
class OfficialCheckpoint:
    """The model found in an official checkpoint.

    Attributes:
        args: the model configuration (shapes from the weights, heads/source from config or options).
        state_dict: tensor name -> torch.Tensor (memory-mapped), prefixes stripped, buffers dropped.
        selection: the checkpoint entry the weights came from (e.g. ``student_model``).
        step: the training step stored in the checkpoint, if any.
        notes: things the user should know (assumptions made).
        path: the file read.
    """

    args: ModelArgs
    state_dict: dict[str, Any]
    selection: str
    step: int | None = None
    notes: list[str] = field(default_factory=list)
    path: str | None = None


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CheckpointError(
            "reading a PyTorch checkpoint needs torch: pip install 'fsdfm-mlx[convert]'"
        ) from e
    return torch


def open_checkpoint(path: str | os.PathLike) -> dict:
    """Open a ``.pth`` with ``weights_only=True`` and memory-mapping (no tensor data is read).

    Raises:
        CheckpointError: missing file, not a checkpoint, truncated, or a pickle that would run code.
    """
    torch = _torch()
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no such checkpoint: {p}")
    if p.is_dir():
        raise CheckpointError(f"{p} is a folder, not a checkpoint file")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p} is empty")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    is_zip = magic == b"PK\x03\x04"
    if is_zip and not zipfile.is_zipfile(p):
        raise CheckpointError(
            f"{p} is damaged or truncated (its zip archive has no central directory)"
        )
    try:
        if is_zip:
            ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        else:
            # the legacy (pre-1.6) format cannot be memory-mapped
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "GLOBAL" in text or "Unsupported global" in text:
            raise CheckpointError(
                f"{p} was refused: its pickle asks to run code ({_global_name(text)}); "
                "nothing in it was executed"
            ) from None
        raise CheckpointError(f"{p} is not a PyTorch checkpoint ({_reason(text)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as e:
        if is_zip:
            raise CheckpointError(f"{p} is damaged or truncated ({_reason(str(e))})") from None
        raise CheckpointError(f"{p} is not a PyTorch checkpoint ({_reason(str(e))})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{p} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def _global_name(msg: str) -> str:
    import re

    m = re.search(r"GLOBAL ([\w.]+)", msg) or re.search(r"global: ?GLOBAL ([\w.]+)", msg)
    return f"it names {m.group(1)}" if m else "an unsupported global"


def _reason(msg: str) -> str:
    """The first informative line of a torch error, shortened."""
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    for ln in lines:
        if "WeightsUnpickler error" in ln or ln.startswith(
            ("Weights only load failed", "Please file")
        ):
            continue
        return ln.split(". ")[0].rstrip(".")[:160]
    return "unreadable"


def _is_state_dict(obj: Any) -> bool:
    torch = _torch()
    return (
        isinstance(obj, dict)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and any(strip_prefixes(k) == "vocab_embed.weight" for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def select_weights(ckpt: dict, weights: str | None = None) -> tuple[str, dict]:
    """Pick the model state dict in a checkpoint.

    Args:
        ckpt: the opened checkpoint dict.
        weights: ``student``, ``student_ema``, ``teacher`` or None (the official evaluation's choice,
            ``student_model``, else the pre-training ``model``, else the teacher).

    Returns:
        (entry name, state dict).
    """
    if _is_state_dict(ckpt):  # a bare state dict
        if weights not in (None,):
            raise CheckpointError(
                f"--weights {weights} was asked for, but the file is a bare state dict"
            )
        return "state_dict", ckpt
    found = [k for k in (*WEIGHT_ENTRIES.values(), "model") if _is_state_dict(ckpt.get(k))]
    if weights is not None:
        if weights not in WEIGHT_ENTRIES:
            raise CheckpointError(
                f"unknown --weights {weights!r}: choose from {', '.join(WEIGHT_ENTRIES)}"
            )
        entry = WEIGHT_ENTRIES[weights]
        if entry not in found:
            have = ", ".join(found) or "none"
            raise CheckpointError(f"the checkpoint has no {entry} (model weights present: {have})")
        return entry, ckpt[entry]
    for entry in DEFAULT_ORDER:
        if entry in found:
            return entry, ckpt[entry]
    keys = ", ".join(sorted(map(str, ckpt))[:8]) or "nothing"
    raise CheckpointError(f"no model weights in the checkpoint (it holds: {keys})")


def read_yaml_config(path: str | os.PathLike) -> dict:
    """Read a training config (``.hydra/config.yaml`` or its ``model:``/``flow:`` part)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no such config file: {p}")
    try:
        cfg = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise CheckpointError(f"{p} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise CheckpointError(f"{p} has no 'model:' section (expected the training run's config)")
    return cfg


def infer_args(
    state_dict: dict,
    *,
    config: dict | None = None,
    preset: str | None = None,
    n_heads: int | None = None,
    source: str | None = None,
    vocab_size: int | None = None,
    notes: list[str] | None = None,
) -> ModelArgs:
    """Work out ModelArgs from the weights' shapes plus what the weights cannot say.

    The head count comes from ``n_heads``, else the config's ``model.n_heads``, else the preset, else
    head_dim 64 is assumed (and a note says so). The source is mask iff the embedding has one row more
    than the tokenizer vocabulary; a config's ``flow.source_distribution`` or ``source`` decides when
    the row count does not tell.
    """
    notes = notes if notes is not None else []
    sd = {strip_prefixes(k): v for k, v in state_dict.items()}
    required = ["vocab_embed.weight", "time_embedding.mlp.0.weight", "output_layer.linear.weight"]
    for k in required:
        if k not in sd:
            raise CheckpointError(f"the weights lack {k}: not an FS-DFM/DFM transformer")
    rows, D = (int(s) for s in sd["vocab_embed.weight"].shape)
    C = int(sd["time_embedding.mlp.0.weight"].shape[0])
    freq = int(sd["time_embedding.mlp.0.weight"].shape[1])
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")})
    if blocks != list(range(len(blocks))):
        raise CheckpointError("the block indices in the weights are not contiguous")
    n_blocks = len(blocks)
    mlp_ratio = int(sd["blocks.0.mlp.0.weight"].shape[0]) // D if n_blocks else 4
    student = any(k.startswith("dt_embedding.") for k in sd)
    model_cfg = (config or {}).get("model", {}) if config else {}
    flow_cfg = (config or {}).get("flow", {}) if config else {}

    # shapes in a config or preset must agree with the weights
    if preset is not None:
        if preset.lower() not in PRESETS:
            raise CheckpointError(f"unknown --preset {preset!r}: choose from {', '.join(PRESETS)}")
        pr = PRESETS[preset.lower()]
        for key, have in (("hidden_size", D), ("cond_dim", C), ("n_blocks", n_blocks)):
            if pr[key] != have:
                raise CheckpointError(
                    f"--preset {preset} has {key}={pr[key]} but the weights have {have}"
                )
    for key, have in (("hidden_size", D), ("cond_dim", C), ("n_blocks", n_blocks)):
        if key in model_cfg and int(model_cfg[key]) != have:
            raise CheckpointError(
                f"the config says {key}={model_cfg[key]} but the weights have {have}"
            )

    if n_heads is not None:
        heads = int(n_heads)
    elif "n_heads" in model_cfg:
        heads = int(model_cfg["n_heads"])
    elif preset is not None:
        heads = PRESETS[preset.lower()]["n_heads"]
    else:
        heads = max(1, D // 64)
        notes.append(
            f"head count not given (no --config, --preset or --n-heads): assuming head_dim 64, "
            f"so n_heads={heads}"
        )
    if heads <= 0 or D % heads != 0:
        raise CheckpointError(f"--n-heads {heads} does not divide the hidden size {D}")

    cfg_source = flow_cfg.get("source_distribution")
    if source is None:
        source = cfg_source
    if source is not None and source not in ("uniform", "mask"):
        raise CheckpointError(f"unknown source distribution {source!r}: use uniform or mask")
    if source is None:
        tok_vocab = vocab_size or GPT2_VOCAB
        if rows == tok_vocab + 1:
            source = "mask"
        elif rows == tok_vocab:
            source = "uniform"
        else:
            raise CheckpointError(
                f"cannot tell the source distribution: the embedding has {rows} rows and the tokenizer "
                f"{tok_vocab} tokens; pass --config or --source uniform|mask"
            )
    vocab = rows - 1 if source == "mask" else rows
    if int(sd["output_layer.linear.weight"].shape[0]) != rows:
        raise CheckpointError("the output layer and the embedding disagree on the vocabulary size")

    solver = flow_cfg.get("student_solver") if student else None
    if solver is not None and solver not in (
        "mixture_euler",
        "mixture_euler_with_cumulative_scalar",
    ):
        solver = None
    length = int(model_cfg.get("length", 1024))
    sched = {
        "type": str(flow_cfg.get("scheduler_type", "polynomial")),
        "exponent": float(flow_cfg.get("exponent", 1.0)),
    }
    if sched["type"] != "polynomial":
        raise CheckpointError(f"scheduler {sched['type']!r} is not supported (only polynomial)")
    return ModelArgs(
        hidden_size=D,
        cond_dim=C,
        n_blocks=n_blocks,
        n_heads=heads,
        vocab_size=vocab,
        source_distribution=source,
        dt_conditioned=student,
        mlp_ratio=mlp_ratio,
        length=length,
        frequency_embedding_size=freq,
        default_solver=solver,
        scheduler=sched,
    )


def check_complete(args: ModelArgs, state_dict: dict) -> None:
    """Raise if the weights do not have exactly the tensors and shapes the model needs."""
    expected = expected_shapes(args)
    have = {k: tuple(int(s) for s in v.shape) for k, v in state_dict.items()}
    missing = sorted(set(expected) - set(have))
    extra = sorted(set(have) - set(expected))
    if missing:
        raise CheckpointError(f"the weights lack {len(missing)} tensor(s), e.g. {missing[0]}")
    if extra:
        raise CheckpointError(
            f"the weights have {len(extra)} unexpected tensor(s), e.g. {extra[0]}"
        )
    for k, shape in expected.items():
        if have[k] != shape:
            raise CheckpointError(f"{k} has shape {list(have[k])}, expected {list(shape)}")


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every weight of a model with these args, with its shape (official key names)."""
    D, C, F, V = args.hidden_size, args.cond_dim, args.frequency_embedding_size, args.num_tokens
    M = args.mlp_ratio * D
    s: dict[str, tuple[int, ...]] = {"vocab_embed.weight": (V, D)}

    def embedder(name):
        s.update({f"{name}.mlp.0.weight": (C, F), f"{name}.mlp.0.bias": (C,)})
        s.update({f"{name}.mlp.2.weight": (C, C), f"{name}.mlp.2.bias": (C,)})

    embedder("time_embedding")
    if args.dt_conditioned:
        embedder("dt_embedding")
        s.update(
            {"time_condition_fuser.weight": (2 * C, 2 * C), "time_condition_fuser.bias": (2 * C,)}
        )
    for i in range(args.n_blocks):
        b = f"blocks.{i}."
        s.update({b + "norm1.weight": (D,), b + "norm2.weight": (D,)})
        for n in ("qw", "kw", "vw", "attn_out"):
            s[b + n + ".weight"] = (D, D)
        s.update({b + "mlp.0.weight": (M, D), b + "mlp.0.bias": (M,)})
        s.update({b + "mlp.2.weight": (D, M), b + "mlp.2.bias": (D,)})
        if args.dt_conditioned:
            s.update({b + "condition_fuser.weight": (C, 2 * C), b + "condition_fuser.bias": (C,)})
        s.update({b + "adaLN_modulation.weight": (6 * D, C), b + "adaLN_modulation.bias": (6 * D,)})
    o = "output_layer."
    s.update({o + "norm_final.weight": (D,), o + "linear.weight": (V, D), o + "linear.bias": (V,)})
    if args.dt_conditioned:
        s.update({o + "condition_fuser.weight": (C, 2 * C), o + "condition_fuser.bias": (C,)})
    s.update({o + "adaLN_modulation.weight": (2 * D, C), o + "adaLN_modulation.bias": (2 * D,)})
    return s


def read_official(
    path: str | os.PathLike,
    *,
    weights: str | None = None,
    config: str | os.PathLike | None = None,
    preset: str | None = None,
    n_heads: int | None = None,
    source: str | None = None,
    vocab_size: int | None = None,
) -> OfficialCheckpoint:
    """Open an official checkpoint and describe the model in it, without reading tensor data.

    Args:
        path: the ``.pth`` file.
        weights: ``student`` | ``student_ema`` | ``teacher`` | None (official default order).
        config: the training run's YAML config (head count from ``model.n_heads``).
        preset: ``170m`` | ``1.3b`` | ``1.7b``.
        n_heads: explicit head count.
        source: ``uniform`` | ``mask`` when neither the config nor the row count tells.
        vocab_size: the tokenizer's vocabulary size (default GPT-2's 50,257).

    Returns:
        An OfficialCheckpoint whose ``state_dict`` holds memory-mapped torch tensors.

    Raises:
        CheckpointError: with a one-line reason.
    """
    if n_heads is not None and int(n_heads) <= 0:
        raise CheckpointError(f"--n-heads must be positive, got {n_heads}")
    cfg = read_yaml_config(config) if config is not None else None
    ckpt = open_checkpoint(path)
    selection, raw = select_weights(ckpt, weights)
    notes: list[str] = []
    sd = {}
    for k, v in raw.items():
        k2 = strip_prefixes(k)
        if k2.endswith("rotary_emb.inv_freq"):
            continue
        if k2 in sd:
            raise CheckpointError(f"two tensors map to {k2} after stripping prefixes")
        sd[k2] = v
    args = infer_args(
        sd,
        config=cfg,
        preset=preset,
        n_heads=n_heads,
        source=source,
        vocab_size=vocab_size,
        notes=notes,
    )
    check_complete(args, sd)
    step = ckpt.get("step") if isinstance(ckpt.get("step"), int) else None
    return OfficialCheckpoint(
        args=args, state_dict=sd, selection=selection, step=step, notes=notes, path=str(path)
    )
