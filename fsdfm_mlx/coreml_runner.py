"""Drive an exported Core ML package (``.mlpackage``) from Python, so the MLX samplers can use it.

macOS only: Core ML runs packages only on Apple platforms. ``coremltools`` is imported lazily, so
this module imports anywhere (the runtime never needs torch or coremltools to be installed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .model import ModelArgs

# Max |Core ML logits - MLX float32 logits| accepted by check_parity, by the package's precision.
# float16: the fp16 PyTorch trace of the fixture models lands at ~1e-2 (logits are O(5)); 5e-2 is
# the project's bfloat16/float16 tolerance. Quantized packages change the weights: no default.
PARITY_THRESHOLDS = {"float32": 1e-3, "float16": 5e-2}

_NOT_MACOS = "Core ML packages run only on macOS (coremltools cannot execute a model on {platform})"


class ParityError(AssertionError):
    """Core ML and MLX logits differ by more than the threshold."""


def _require_macos() -> None:
    if sys.platform != "darwin":
        raise RuntimeError(_NOT_MACOS.format(platform=sys.platform))


class CoreMLModel:
    """A Core ML FS-DFM package called like the MLX model: ``model(tokens, t, dt) -> logits``.

    Args:
        path: the ``.mlpackage`` written by ``export_coreml``.
        compute_units: ``"all"``, ``"cpu_only"``, ``"cpu_and_gpu"`` or ``"cpu_and_ne"``.

    Attributes:
        args: the model's ``ModelArgs`` (from the package metadata), for the sampler.
        metadata: the package's user-defined metadata.
        lengths: the sequence lengths the package accepts.
        batch_size: the fixed batch size B.

    Raises:
        RuntimeError: on any platform other than macOS.
    """

    def __init__(self, path: str | Path, compute_units: str = "all"):
        _require_macos()
        import coremltools as ct

        self.path = Path(path)
        self._model = ct.models.MLModel(
            str(self.path), compute_units=getattr(ct.ComputeUnit, compute_units.upper())
        )
        self.metadata: dict[str, str] = dict(self._model.user_defined_metadata)
        self.args = ModelArgs.from_dict(json.loads(self.metadata["config"]))
        self.lengths = [int(n) for n in self.metadata["lengths"].split(",")]
        self.batch_size = int(self.metadata["batch_size"])
        self.precision = self.metadata.get("precision", "float16")
        self.quantize = self.metadata.get("quantize", "none")

    def __call__(self, tokens, t, dt=None) -> mx.array:
        """Logits for ``tokens`` [B, L] at times ``t`` [B] (and step sizes ``dt`` [B] for students).

        ``t`` / ``dt`` may be scalars (broadcast over the batch). Returns float32 [B, L, V(+1)].
        """
        tok = np.asarray(tokens, dtype=np.int32)
        B, L = tok.shape
        if B != self.batch_size or L not in self.lengths:
            raise ValueError(
                f"this package takes tokens of shape [{self.batch_size}, L] with L in "
                f"{self.lengths}, got [{B}, {L}]"
            )
        feed = {"tokens": tok, "t": np.broadcast_to(np.asarray(t, np.float32), (B,)).copy()}
        if self.args.dt_conditioned:
            if dt is None:
                raise ValueError("this model is step-size conditioned (a student): pass dt")
            feed["dt"] = np.broadcast_to(np.asarray(dt, np.float32), (B,)).copy()
        out = self._model.predict(feed)["logits"]
        return mx.array(np.asarray(out, dtype=np.float32))


def check_parity(
    mlpackage: str | Path,
    mlx_model_dir: str | Path,
    threshold: float | None = None,
    *,
    length: int | None = None,
    seed: int = 0,
    compute_units: str = "all",
) -> dict[str, Any]:
    """Compare a package's logits with the MLX model's on random inputs.

    Args:
        mlpackage: the exported package.
        mlx_model_dir: the converted MLX model folder it was exported from.
        threshold: max accepted absolute difference; default ``PARITY_THRESHOLDS[precision]``
            (1e-3 float32, 5e-2 float16). Required for a quantized package.
        length: the sequence length to test (default: the package's default length).
        seed: seed of the random tokens and times.
        compute_units: Core ML compute units.

    Returns:
        ``{"max_abs_diff", "mean_abs_diff", "top1_agreement", "threshold", "length", "precision"}``.

    Raises:
        RuntimeError: not on macOS.
        ValueError: no threshold for a quantized package.
        ParityError: the max absolute difference is above the threshold.
    """
    _require_macos()
    from .load import load

    cm = CoreMLModel(mlpackage, compute_units=compute_units)
    if threshold is None:
        if cm.quantize != "none":
            raise ValueError(f"pass a threshold for a quantized ({cm.quantize}) package")
        threshold = PARITY_THRESHOLDS[cm.precision]
    model, _ = load(str(mlx_model_dir))
    L = int(length or cm.metadata.get("default_length", cm.lengths[-1]))
    rng = np.random.default_rng(seed)
    B, args = cm.batch_size, cm.args
    tokens = rng.integers(0, args.vocab_size, size=(B, L)).astype(np.int32)
    if args.masked:
        tokens[rng.random((B, L)) < 0.5] = args.mask_token_id
    t = rng.uniform(0.0, 1.0, size=B).astype(np.float32)
    dt = np.full(B, 0.125, np.float32) if args.dt_conditioned else None
    ref = model(mx.array(tokens), mx.array(t), None if dt is None else mx.array(dt)).astype(
        mx.float32
    )
    got = cm(tokens, t, dt)
    diff = mx.abs(got - ref)
    result = {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float(
            (mx.argmax(got, -1) == mx.argmax(ref, -1)).astype(mx.float32).mean()
        ),
        "threshold": float(threshold),
        "length": L,
        "precision": cm.precision,
    }
    if result["max_abs_diff"] > threshold:
        raise ParityError(
            f"Core ML logits differ from MLX by {result['max_abs_diff']:.3g} > {threshold:g}"
        )
    return result
