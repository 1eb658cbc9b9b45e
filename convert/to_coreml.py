"""Export an FS-DFM / DFM model to a Core ML package (``.mlpackage``, ML Program) for apps.

Pipeline: build the PyTorch port (``torch_model.FSDFMTorch``) -> ``torch.jit.trace`` ->
``coremltools.convert`` (mlprogram) -> optional weight compression (``coremltools.optimize.coreml``)
-> descriptions and metadata -> save beside the output, then rename (nothing is left behind on
failure).

The package computes one model call, ``logits = model(tokens, t, dt)``; the app runs the few-step
sampler around it (see ``docs/coreml.md``). The GPT-2 tokenizer files are written next to the
package in ``<name>.tokenizer/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from fsdfm_mlx.model import ModelArgs

PRECISIONS = ("float16", "float32")
COMPUTE_UNITS = ("all", "cpu_only", "cpu_and_gpu", "cpu_and_ne")
DEPLOYMENT_TARGETS = ("iOS17", "iOS18", "macOS14", "macOS15")
QUANTIZATIONS = ("none", "int8", "int4", "palettize4", "palettize6")
ATTENTIONS = ("split_einsum", "original")
# split_einsum is the default: apps run with compute units "all", where the Neural Engine is the
# fastest and most power-efficient engine, and the (B, C, 1, S) layout is what lets Core ML place
# the blocks there; on a Mac GPU ("cpu_and_gpu") "original" is usually faster (fewer, larger ops).
DEFAULT_ATTENTION = "split_einsum"

TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "LICENSE",
    "SOURCE.md",
)
GPT2_ASSETS = Path(__file__).resolve().parent.parent / "fsdfm_mlx" / "assets" / "gpt2"

CUMULATIVE_SCALAR_TEXT = (
    "kappa(t) = t ** exponent (polynomial scheduler); at a non-final step from t to t + h: "
    "alpha = (ln(clamp(1 - kappa(t), 1e-8, 1)) - ln(clamp(1 - kappa(t + h), 1e-8, 1))) "
    "/ (h + 1e-8); "
    "a position holding token z jumps with probability 1 - exp(-h * alpha * (1 - p_z)) to a token "
    "drawn from p with z excluded (renormalised); final step: every position takes x1 ~ p "
    "(mask source: mask column zeroed first, and only still-masked positions are written)"
)
TIME_GRID_TEXT = (
    "n steps: t_i = i / n for i = 0..n-1, t_n = 1; h_i = t_(i+1) - t_i; students get dt = h_i"
)


# -- validation ---------------------------------------------------------------------------------


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: choose one of {', '.join(choices)}")


def _validate_options(
    precision: str,
    compute_units: str,
    min_deployment_target: str,
    quantize: str,
    attention: str,
    batch_size: int,
) -> None:
    _check_choice("precision", precision, PRECISIONS)
    _check_choice("compute units", compute_units, COMPUTE_UNITS)
    _check_choice("deployment target", min_deployment_target, DEPLOYMENT_TARGETS)
    _check_choice("quantization", quantize, QUANTIZATIONS)
    _check_choice("attention", attention, ATTENTIONS)
    if int(batch_size) < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if quantize == "int4" and min_deployment_target not in ("iOS18", "macOS15"):
        raise ValueError("int4 (per-block) weights need --min-deployment-target iOS18 or macOS15")


def _resolve_lengths(
    length: int | None, lengths: list[int] | str | None, args: ModelArgs, allow_longer: bool
) -> tuple[list[int], int]:
    """The sorted enumerated lengths and the default one (``length`` if given, else the longest)."""
    if isinstance(lengths, str):
        try:
            lengths = [int(x) for x in lengths.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"lengths must be comma-separated integers, got {lengths!r}") from None
    values = sorted(set(int(x) for x in (lengths or [])))
    if length is not None:
        values = sorted(set(values) | {int(length)})
    if not values:
        values = [int(args.length)]
    default = int(length) if length is not None else values[-1]
    if values[0] < 1:
        raise ValueError(f"lengths must be >= 1, got {values[0]}")
    if values[-1] > args.length and not allow_longer:
        raise ValueError(
            f"length {values[-1]} is above the model's training length {args.length} "
            "(pass allow_longer / --allow-longer to export it anyway)"
        )
    return values, default


def _validate_output(output: str | Path, force: bool) -> tuple[Path, Path]:
    out = Path(output)
    if out.suffix != ".mlpackage":
        raise ValueError(f"output must end in .mlpackage, got {str(output)!r}")
    tok = out.with_suffix(".tokenizer")
    if not force:
        for p in (out, tok):
            if p.exists():
                raise ValueError(f"{p} already exists (pass force / --force to replace it)")
    return out, tok


# -- model loading ------------------------------------------------------------------------------


def _load_source(model: Any, checkpoint_kwargs: dict) -> tuple[ModelArgs, Any, Path | None]:
    """``(args, state dict or module, tokenizer folder or None)`` of a folder, .pth or module."""
    from .torch_model import FSDFMTorch, read_mlx_folder

    if isinstance(model, FSDFMTorch):
        return model.args, model, None
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"no such model folder or checkpoint: {path}")
    if path.is_dir():
        if checkpoint_kwargs:
            raise ValueError(
                f"checkpoint options ({', '.join(sorted(checkpoint_kwargs))}) apply only to a .pth"
            )
        args, state_dict = read_mlx_folder(path)
        return args, state_dict, path
    from .checkpoint import read_official

    ck = read_official(path, **checkpoint_kwargs)
    return ck.args, ck.state_dict, None


def _tokenizer_source(folder: Path | None) -> Path:
    if (
        folder is not None
        and (folder / "vocab.json").is_file()
        and (folder / "merges.txt").is_file()
    ):
        return folder
    if folder is not None and (folder / "tokenizer.json").is_file():
        return folder
    return GPT2_ASSETS


# -- compression --------------------------------------------------------------------------------


def kmeans_lut(nbits: int, bins: int = 4096, iters: int = 50):
    """A ``lut_function`` for ``OpPalettizerConfig(mode="custom")``: 1-D k-means on a histogram.

    Clustering the 4096-bin histogram instead of every weight keeps it O(n) in the tensor size and
    needs neither scikit-learn nor kmeans1d. The LUT is sorted; indices are the nearest entry.
    """
    k = 1 << nbits

    def lut_function(weight: np.ndarray):
        w = np.asarray(weight, dtype=np.float32).ravel()
        lo, hi = float(w.min()), float(w.max())
        if hi <= lo:
            return np.full(k, lo, dtype=weight.dtype), np.zeros(w.size, dtype=np.uint8)
        counts, edges = np.histogram(w, bins=bins, range=(lo, hi))
        centers = 0.5 * (edges[:-1] + edges[1:])
        counts = counts.astype(np.float64)
        cdf = np.cumsum(counts) / counts.sum()
        lut = np.interp((np.arange(k) + 0.5) / k, cdf, centers)  # quantile initialisation
        for _ in range(iters):
            assign = np.searchsorted(0.5 * (lut[1:] + lut[:-1]), centers)
            mass = np.bincount(assign, weights=counts, minlength=k)
            total = np.bincount(assign, weights=counts * centers, minlength=k)
            new = np.sort(np.where(mass > 0, total / np.maximum(mass, 1e-30), lut))
            if np.allclose(new, lut, rtol=0, atol=1e-7 * (hi - lo)):
                lut = new
                break
            lut = new
        idx = np.searchsorted(0.5 * (lut[1:] + lut[:-1]), w).astype(np.uint8)
        return lut.astype(weight.dtype), idx

    return lut_function


def _compress(mlmodel, quantize: str):
    import coremltools.optimize.coreml as cto

    if quantize == "none":
        return mlmodel
    if quantize == "int8":
        op = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel"
        )
        return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=op))
    if quantize == "int4":
        op = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=32
        )
        return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=op))
    nbits = 4 if quantize == "palettize4" else 6
    op = cto.OpPalettizerConfig(
        mode="custom", lut_function=kmeans_lut(nbits), granularity="per_tensor"
    )
    return cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=op))


# -- spec helpers (also used by the tests) --------------------------------------------------------


def count_ops(spec) -> dict[str, int]:
    """Op counts by type in an ML Program spec's ``main`` function (nested blocks included)."""
    counts: Counter = Counter()

    def walk(block):
        for op in block.operations:
            counts[op.type] += 1
            for nested in op.blocks:
                walk(nested)

    fn = spec.mlProgram.functions["main"]
    walk(fn.block_specializations[fn.opset])
    return dict(sorted(counts.items()))


def dir_size(path: Path) -> int:
    """Total bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _metadata(
    args: ModelArgs,
    lengths,
    default_length,
    batch_size,
    precision,
    quantize,
    attention,
    tokenizer_dir: str,
) -> dict[str, str]:
    from fsdfm_mlx import __version__

    config = dataclasses.asdict(args)
    return {
        "model_type": str(args.model_type),
        "source_distribution": args.source_distribution,
        "vocab_size": str(args.vocab_size),
        "num_tokens": str(args.num_tokens),
        "mask_token_id": "none" if args.mask_token_id is None else str(args.mask_token_id),
        "eos_token_id": "50256" if args.vocab_size == 50257 else "none",
        "dt_conditioned": "true" if args.dt_conditioned else "false",
        "inputs": "tokens,t,dt" if args.dt_conditioned else "tokens,t",
        "default_solver": str(args.default_solver),
        "default_steps": str(args.default_steps),
        "default_temp": f"{args.default_temp:g}",
        "lengths": ",".join(str(n) for n in lengths),
        "default_length": str(default_length),
        "training_length": str(args.length),
        "batch_size": str(batch_size),
        "scheduler": json.dumps(args.scheduler),
        "cumulative_scalar": CUMULATIVE_SCALAR_TEXT,
        "time_grid": TIME_GRID_TEXT,
        "precision": precision,
        "logits_dtype": precision,
        "quantize": quantize,
        "attention": attention,
        "tokenizer": f"GPT-2 BPE files in {tokenizer_dir}/ next to this package",
        "config": json.dumps(config, sort_keys=True),
        "exporter": f"fsdfm-mlx {__version__}",
    }


def _descriptions(args: ModelArgs, lengths, batch_size: int) -> dict[str, str]:
    B, Ls = batch_size, ",".join(str(n) for n in lengths)
    mask = f"; the mask token is {args.mask_token_id}" if args.masked else ""
    return {
        "tokens": (
            f"Current tokens x_t: int32 [B={B}, L] ids in [0, {args.num_tokens}){mask}; "
            f"L in {{{Ls}}}"
        ),
        "t": f"Time t in [0, 1] of each sequence: float32 [B={B}]",
        "dt": f"Step size h = t_next - t of each sequence: float32 [B={B}] (step conditioning)",
        "logits": (
            f"Logits of p(x_1 | x_t): [B={B}, L, {args.num_tokens}]; softmax over the last axis "
            "in float32"
        ),
    }


# -- export -------------------------------------------------------------------------------------


def export_coreml(
    model,
    output: str | os.PathLike,
    *,
    length: int | None = None,
    lengths: list[int] | str | None = None,
    batch_size: int = 1,
    precision: str = "float16",
    compute_units: str = "all",
    min_deployment_target: str = "iOS17",
    quantize: str = "none",
    attention: str = DEFAULT_ATTENTION,
    allow_longer: bool = False,
    force: bool = False,
    progress: bool = True,
    weights: str | None = None,
    config: str | None = None,
    preset: str | None = None,
    n_heads: int | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Export a model to a Core ML ``.mlpackage`` with its tokenizer beside it.

    Args:
        model: a converted MLX folder, an official ``.pth`` checkpoint, or an ``FSDFMTorch`` module.
        output: the package path, ``NAME.mlpackage``; the tokenizer goes to ``NAME.tokenizer/``.
        length: the (default) sequence length; defaults to the longest of ``lengths``, else the
            model's training length.
        lengths: sequence lengths the package accepts (``ct.EnumeratedShapes``): a list or
            "128,256".
        batch_size: the fixed batch size B.
        precision: compute precision, ``"float16"`` or ``"float32"`` (also the logits' dtype).
        compute_units: ``"all"``, ``"cpu_only"``, ``"cpu_and_gpu"`` or ``"cpu_and_ne"``.
        min_deployment_target: ``"iOS17"``, ``"iOS18"``, ``"macOS14"`` or ``"macOS15"``.
        quantize: ``"none"``, ``"int8"`` (per-channel), ``"int4"`` (per-block 32; iOS18/macOS15),
            ``"palettize4"`` or ``"palettize6"`` (k-means LUT, per tensor).
        attention: ``"split_einsum"`` (Neural-Engine layout, the default) or ``"original"``.
        allow_longer: allow lengths above the model's training length.
        force: replace an existing output (only once the new one is complete).
        progress: show coremltools' progress bars.
        weights, config, preset, n_heads, source: passed to ``read_official`` for a ``.pth``.

    Returns:
        A summary: ``path``, ``tokenizer``, ``size_bytes``, ``params``, ``bytes_per_param``, ``ops``
        (counts by op type), ``ops_total``, ``lengths``, ``seconds``, ``peak_rss_bytes`` and the
        options.

    Raises:
        ValueError: an unknown option value, a length above the training length without
            ``allow_longer``, an existing output without ``force``, or a bad checkpoint.
        FileNotFoundError: the model does not exist.
    """
    start = time.perf_counter()
    _validate_options(
        precision, compute_units, min_deployment_target, quantize, attention, batch_size
    )
    out, tok_out = _validate_output(output, force)
    checkpoint_kwargs = {
        k: v
        for k, v in dict(
            weights=weights, config=config, preset=preset, n_heads=n_heads, source=source
        ).items()
        if v is not None
    }
    args, weights_or_module, folder = _load_source(model, checkpoint_kwargs)
    lengths_list, default_length = _resolve_lengths(length, lengths, args, allow_longer)

    import coremltools as ct
    import torch

    from .torch_model import FSDFMTorch

    flexible = len(lengths_list) > 1
    if isinstance(weights_or_module, FSDFMTorch):
        dtype = next(weights_or_module.parameters()).dtype
        weights_or_module = weights_or_module.state_dict()  # shared storage, not a copy
    else:
        dtype = torch.float32
    net = FSDFMTorch.from_state_dict(
        args,
        weights_or_module,
        attention=attention,
        max_length=lengths_list[-1],
        exact_length=not flexible,
        dtype=dtype,
    )
    del weights_or_module
    net = net.eval()
    params = sum(p.numel() for p in net.parameters())

    B = int(batch_size)
    g = torch.Generator().manual_seed(0)
    example = [
        torch.randint(0, args.vocab_size, (B, default_length), generator=g, dtype=torch.int64).to(
            torch.int32
        ),
        torch.full((B,), 0.5, dtype=torch.float32),
    ]
    if args.dt_conditioned:
        example.append(torch.full((B,), 0.125, dtype=torch.float32))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", DeprecationWarning
        )  # jit.trace: still what ct.convert takes
        traced = torch.jit.trace(net, tuple(example), check_trace=False)
    del net

    if flexible:
        token_shape = ct.EnumeratedShapes(
            shapes=[(B, n) for n in lengths_list], default=(B, default_length)
        )
    else:
        token_shape = (B, default_length)
    inputs = [
        ct.TensorType(name="tokens", shape=token_shape, dtype=np.int32),
        ct.TensorType(name="t", shape=(B,), dtype=np.float32),
    ]
    if args.dt_conditioned:
        inputs.append(ct.TensorType(name="dt", shape=(B,), dtype=np.float32))
    fp16 = precision == "float16"
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    with quiet:
        mlmodel = ct.convert(
            traced,
            inputs=inputs,
            outputs=[ct.TensorType(name="logits", dtype=np.float16 if fp16 else np.float32)],
            convert_to="mlprogram",
            minimum_deployment_target=getattr(ct.target, min_deployment_target),
            compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32,
            compute_units=getattr(ct.ComputeUnit, compute_units.upper()),
            skip_model_load=True,
        )
        del traced
        mlmodel = _compress(mlmodel, quantize)

    tokenizer_dir = tok_out.name
    desc = _descriptions(args, lengths_list, B)
    for name in [i.name for i in inputs]:
        mlmodel.input_description[name] = desc[name]
    mlmodel.output_description["logits"] = desc["logits"]
    kind = "FS-DFM student (step-size conditioned)" if args.dt_conditioned else "DFM teacher"
    mlmodel.short_description = (
        f"{kind}, {args.source_distribution} source: one call of the discrete flow-matching "
        "transformer (logits of p(x_1 | x_t)); run the few-step sampler around it"
    )
    mlmodel.version = "1"
    mlmodel.user_defined_metadata.update(
        _metadata(
            args, lengths_list, default_length, B, precision, quantize, attention, tokenizer_dir
        )
    )
    ops = count_ops(mlmodel.get_spec())

    _save_atomically(mlmodel, out, tok_out, _tokenizer_source(folder), force)
    size = dir_size(out)
    return {
        "path": str(out),
        "tokenizer": str(tok_out),
        "size_bytes": size,
        "params": int(params),
        "bytes_per_param": size / max(params, 1),
        "ops": ops,
        "ops_total": sum(ops.values()),
        "ops_non_const": sum(v for k, v in ops.items() if not k.startswith("const")),
        "lengths": lengths_list,
        "default_length": default_length,
        "batch_size": B,
        "precision": precision,
        "quantize": quantize,
        "attention": attention,
        "compute_units": compute_units,
        "min_deployment_target": min_deployment_target,
        "seconds": time.perf_counter() - start,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _save_atomically(mlmodel, out: Path, tok_out: Path, tok_src: Path, force: bool) -> None:
    """Write package + tokenizer in a temp folder beside ``out``, then move them into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.stem}.export-", dir=out.parent))
    try:
        new_pkg, new_tok = tmp / out.name, tmp / tok_out.name
        mlmodel.save(str(new_pkg))
        new_tok.mkdir()
        for name in TOKENIZER_FILES:
            if (tok_src / name).is_file():
                shutil.copy2(tok_src / name, new_tok / name)
        if not force and (out.exists() or tok_out.exists()):
            raise ValueError(f"{out} appeared while exporting; not replacing it without force")
        old = tmp / "old"
        old.mkdir()
        for src, dst in ((new_pkg, out), (new_tok, tok_out)):
            if dst.exists():
                dst.rename(old / dst.name)
            src.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
