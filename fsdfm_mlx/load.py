"""Load a converted MLX model folder (or Hugging Face repo): config -> args -> model -> weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .model import Model, ModelArgs

ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "README.md"]
DEFAULT_MODEL = "shakespeare-fsdfm-q4"


def default_model_path() -> Path:
    """The demo model shipped in the package: an FS-DFM student trained on Shakespeare.

    It is what ``generate``, ``profile`` and ``eval`` use when no model is named (no download).
    See ``examples/train_demo`` for how it was trained and converted.
    """
    return Path(__file__).resolve().parent / "assets" / "models" / DEFAULT_MODEL


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
    name = str(path_or_repo)
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"no such model folder: {name}")  # a path, not a repo id
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=ALLOW_PATTERNS))
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


def compute_dtype(dtype: str | mx.Dtype | None, stored: mx.Dtype) -> mx.Dtype:
    """The dtype to run in: as asked, else float32 on a CPU device for half-precision weights.

    MLX's CPU backend runs bfloat16/float16 matmuls ~100x slower than float32, so on CPU a half
    precision model is widened on load (the bytes on disk are unchanged); GPUs keep the stored dtype.
    """
    if dtype is not None:
        names = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
        if isinstance(dtype, str):
            if dtype not in names:
                raise ValueError(f"unknown dtype {dtype!r}: choose from {', '.join(names)}")
            return names[dtype]
        return dtype
    if mx.default_device().type == mx.cpu and stored in (mx.float16, mx.bfloat16):
        return mx.float32
    return stored


def read_weights(path: Path) -> dict[str, mx.array]:
    """All tensors of a model folder's ``model*.safetensors`` (one file or shards)."""
    files = sorted(Path(path).glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no model*.safetensors")
    weights: dict[str, mx.array] = {}
    for f in files:
        weights.update(mx.load(str(f)))
    return weights


#: Input widths at or below this are kept dense on MLX's CUDA backend: there (MLX 0.32.4) quantized
#: matmuls with K = 64 return wrong results (relative error 1 to 1e38 in
#: ``benchmarks/diagnose_gpu.py --parts qmm``; the FS-DFM layers hit are the adaLN and time-embedding
#: layers of models with a 64-wide conditioning). Metal and CPU are not affected.
CUDA_DENSE_MAX_IN = 64


def cuda_backend() -> bool:
    """True when arrays are computed by MLX's CUDA backend (the default device is a CUDA GPU)."""
    return mx.default_device().type == mx.gpu and mx.cuda.is_available()


def quantized_in_features(packed: mx.array, bits: int) -> int:
    """The input width of a quantized weight from its packed [out, in * bits / 32] uint32 form."""
    return packed.shape[-1] * 32 // bits


def dequantize_weights(
    weights: dict[str, mx.array], quantization: dict, max_in_features: int | None = None
) -> dict[str, mx.array]:
    """Turn quantized (weight, scales, biases) triples back into dense weights.

    Args:
        weights: tensors as stored.
        quantization: ``config["quantization"]``: ``group_size``, ``bits`` (and ``mode``), with
            optional per-layer dicts keyed by the layer's path, as mlx-lm writes them.
        max_in_features: only layers whose input width is at most this (None = every layer).
    """
    out = {}
    for k, v in weights.items():
        base = k.rsplit(".", 1)[0]
        layer = quantization.get(base)
        layer = layer if isinstance(layer, dict) else quantization
        bits = int(layer.get("bits", 4))
        quantized = f"{base}.scales" in weights and (
            max_in_features is None
            or quantized_in_features(weights[f"{base}.weight"], bits) <= max_in_features
        )
        if k.endswith((".scales", ".biases")) and quantized:
            continue
        if k.endswith(".weight") and quantized:
            kw = {"group_size": int(layer.get("group_size", 64)), "bits": bits}
            if layer.get("mode", "affine") != "affine":
                kw["mode"] = layer["mode"]
            s = weights[f"{base}.scales"]
            v = mx.dequantize(v, s, weights.get(f"{base}.biases"), **kw).astype(s.dtype)
        out[k] = v
    return out


def should_dequantize(dequantize: bool | None, config: dict) -> bool:
    """Default: dequantize on a CPU device when the dense float32 model stays under 2 GB.

    MLX's CPU quantized matmul is ~20x slower than a float32 BLAS matmul, so on CPU a small quantized
    model runs faster dense; on GPUs quantized matmuls are the fast path and stay.
    """
    if config.get("quantization") is None:
        return False
    if dequantize is not None:
        return bool(dequantize)
    if mx.default_device().type != mx.cpu:
        return False
    params = sum(v.size for v in Model(ModelArgs.from_dict(config)).checkpoint_weights().values())
    return params * 4 < 2e9


def load_model(
    path: str | os.PathLike,
    *,
    lazy: bool = False,
    dtype: str | mx.Dtype | None = None,
    dequantize: bool | None = None,
) -> tuple[Model, dict]:
    """Build the model from a folder and load its weights (strict).

    Args:
        path: the model folder.
        lazy: leave the weights unevaluated (they load on first use).
        dtype: compute dtype for floating weights and quantization scales (default: as stored, but
            float32 on a CPU device).
        dequantize: expand a quantized model to dense weights (default: on CPU, if under 2 GB).

    Returns:
        (model, config dict).
    """
    path = Path(path)
    config = load_config(path)
    args = ModelArgs.from_dict(config)
    model = Model(args)
    weights = model.sanitize(read_weights(path))
    q = config.get("quantization")
    if q is not None and should_dequantize(dequantize, config):
        weights = dequantize_weights(weights, q)
        q = None
    elif q is not None and cuda_backend():
        weights = dequantize_weights(weights, q, max_in_features=CUDA_DENSE_MAX_IN)
    if q is not None:
        nn.quantize(
            model,
            group_size=q["group_size"],
            bits=q["bits"],
            class_predicate=lambda p, m: f"{p}.scales" in weights,
        )
    stored = next(
        (
            v.dtype
            for k, v in weights.items()
            if k.endswith("qw.weight") or k.endswith("qw.scales")
            if mx.issubdtype(v.dtype, mx.floating)
        ),
        mx.float32,
    )
    target = compute_dtype(dtype, stored)
    if target != stored:
        weights = {
            k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) and not _is_norm(k) else v
            for k, v in weights.items()
        }
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, config


def _is_norm(key: str) -> bool:
    return ".norm" in key or key.startswith("norm")


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


def load(
    path_or_repo: str | os.PathLike,
    *,
    lazy: bool = False,
    dtype: str | None = None,
    dequantize: bool | None = None,
):
    """Load a converted FS-DFM model and its tokenizer.

    Args:
        path_or_repo: a folder made by ``fsdfm-mlx convert`` or a Hugging Face repo id holding one.
        lazy: leave the weights unevaluated until first use.
        dtype: compute dtype (``float32`` | ``float16`` | ``bfloat16``); default: as stored, except
            that half-precision weights run in float32 on a CPU device.

    Returns:
        (model, tokenizer): ``model(tokens, t, dt=None) -> logits`` and an mlx-lm TokenizerWrapper.
    """
    path = resolve_model_path(path_or_repo)
    model, _ = load_model(path, lazy=lazy, dtype=dtype, dequantize=dequantize)
    return model, load_tokenizer(path)


def model_info(path_or_repo: str | os.PathLike) -> dict:
    """Config, parameter count, size on disk and quantization of a converted model folder."""
    path = resolve_model_path(path_or_repo)
    config = load_config(path)
    args = ModelArgs.from_dict(config)
    # a fresh (unquantized, lazy) model gives the parameter count without reading any weight
    params = sum(v.size for v in Model(args).checkpoint_weights().values())
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
