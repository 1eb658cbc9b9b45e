"""Load a converted MLX model folder (or Hugging Face repo): config -> args -> model -> weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .model import Model, ModelArgs

ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "README.md"]


def resolve_model_path(path_or_repo: str | os.PathLike) -> Path:
    """A local folder, or a Hugging Face repo id downloaded (or found in the cache) with huggingface_hub.

    Raises:
        FileNotFoundError: neither a folder nor a reachable repo.
    """
    p = Path(path_or_repo).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise FileNotFoundError(
            f"{p} is a file; a model is a folder with config.json (convert a .pth first)"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=str(path_or_repo), allow_patterns=ALLOW_PATTERNS))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"no model at {path_or_repo}: not a folder, and not a reachable Hugging Face repo ({first})"
        ) from None


def load_config(path: Path) -> dict:
    """Read and check ``config.json``."""
    f = path / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not an fsdfm-mlx model folder")
    try:
        config = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON ({e})") from None
    if config.get("model_type") != "fsdfm":
        raise ValueError(f"{path} holds model_type {config.get('model_type')!r}, not 'fsdfm'")
    return config


def load_model(path: str | os.PathLike, *, lazy: bool = False) -> tuple[Model, dict]:
    """Build the model from a folder and load its weights (strict).

    Args:
        path: the model folder.
        lazy: leave the weights unevaluated (they load on first use).

    Returns:
        (model, config dict).
    """
    path = Path(path)
    config = load_config(path)
    args = ModelArgs.from_dict(config)
    model = Model(args)
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no model*.safetensors")
    weights: dict[str, mx.array] = {}
    for f in files:
        weights.update(mx.load(str(f)))
    weights = model.sanitize(weights)
    if (q := config.get("quantization")) is not None:
        nn.quantize(
            model,
            group_size=q["group_size"],
            bits=q["bits"],
            class_predicate=lambda p, m: f"{p}.scales" in weights,
        )
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, config


def load_tokenizer(path: str | os.PathLike):
    """The model folder's tokenizer as an mlx-lm ``TokenizerWrapper``."""
    from mlx_lm.utils import load_tokenizer as _load
    from transformers.utils import logging as hf_logging

    # transformers reads config.json, sees model_type "fsdfm" and warns; the tokenizer is plain GPT-2
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return _load(Path(path))
    finally:
        hf_logging.set_verbosity(level)


def load(path_or_repo: str | os.PathLike, *, lazy: bool = False):
    """Load a converted FS-DFM model and its tokenizer.

    Args:
        path_or_repo: a folder made by ``fsdfm-mlx convert`` or a Hugging Face repo id holding one.
        lazy: leave the weights unevaluated until first use.

    Returns:
        (model, tokenizer): ``model(tokens, t, dt=None) -> logits`` and an mlx-lm TokenizerWrapper.
    """
    path = resolve_model_path(path_or_repo)
    model, _ = load_model(path, lazy=lazy)
    return model, load_tokenizer(path)


def model_info(path_or_repo: str | os.PathLike) -> dict:
    """Config, parameter count, size on disk and quantization of a converted model folder."""
    path = resolve_model_path(path_or_repo)
    config = load_config(path)
    args = ModelArgs.from_dict(config)
    # a fresh (unquantized, lazy) model gives the parameter count without reading any weight
    params = sum(v.size for _, v in tree_flatten(Model(args).parameters()))
    files = [p for p in path.iterdir() if p.is_file()]
    weights_bytes = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    return {
        "path": str(path),
        "config": config,
        "parameters": int(params),
        "size_on_disk_bytes": sum(p.stat().st_size for p in files),
        "weights_bytes": weights_bytes,
        "bits_per_parameter": 8 * weights_bytes / max(params, 1),
        "quantization": config.get("quantization"),
        "dtype": config.get("dtype"),
    }
