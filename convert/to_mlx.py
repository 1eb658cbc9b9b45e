"""Convert an official FS-DFM checkpoint into an MLX model folder (mlx-lm's layout).

The output folder holds ``config.json``, ``model.safetensors`` (or shards plus
``model.safetensors.index.json`` past 5 GB), the tokenizer files and a model card. Conversion streams:
the checkpoint is memory-mapped, optimizer state is never touched, and each tensor is converted and
written on its own, so peak memory stays near the largest single tensor rather than the whole model.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import shutil
import struct
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..model import ModelArgs, check_default_temp
from .checkpoint import CheckpointError, OfficialCheckpoint, expected_shapes, read_official

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
ST_DTYPE = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32"}
ITEMSIZE = {mx.float32: 4, mx.float16: 2, mx.bfloat16: 2, mx.uint32: 4}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
MAX_SHARD_BYTES = 5 << 30


def default_tokenizer_dir() -> Path:
    """The GPT-2 tokenizer shipped in the package (so conversion works offline)."""
    import fsdfm_mlx

    return Path(fsdfm_mlx.__file__).resolve().parent / "assets" / "gpt2"


@dataclass
class ConvertResult:
    """What `convert` produced."""

    mlx_path: str
    args: dict
    selection: str
    dtype: str
    quantization: dict | None
    files: list[str]
    bytes_written: int
    parameters: int
    seconds: float
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- planning the output tensors


@dataclass
class _Out:
    name: str  # output tensor name
    src: str  # source tensor name
    part: str  # "full" | "weight" | "scales" | "biases"
    dtype: mx.Dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for s in self.shape:
            n *= s
        return n


def quantizable(name: str, shape: tuple[int, ...], group_size: int) -> bool:
    """Linear and embedding weights whose input width is a multiple of the group size."""
    return name.endswith(".weight") and len(shape) == 2 and shape[-1] % group_size == 0


def plan_tensors(args: ModelArgs, dtype: mx.Dtype, quant: dict | None) -> list[_Out]:
    """Every tensor the output will hold, with dtype and shape, computed before any data is read."""
    out = []
    for name, shape in expected_shapes(args).items():
        if quant and quantizable(name, shape, quant["group_size"]):
            rows, cols = shape
            base = name[: -len(".weight")]
            g, bits = quant["group_size"], quant["bits"]
            out.append(_Out(name, name, "weight", mx.uint32, (rows, cols * bits // 32)))
            out.append(_Out(base + ".scales", name, "scales", dtype, (rows, cols // g)))
            out.append(_Out(base + ".biases", name, "biases", dtype, (rows, cols // g)))
        else:
            # LayerNorm gains stay float32: the norm runs in float32 and they cost D floats each
            keep = mx.float32 if is_norm(name) else dtype
            out.append(_Out(name, name, "full", keep, tuple(shape)))
    return out


def is_norm(name: str) -> bool:
    """LayerNorm gains (``norm1``, ``norm2``, ``norm_final``)."""
    return name.rsplit(".", 2)[-2].startswith("norm") and name.endswith(".weight")


def make_shards(tensors: list[_Out], max_bytes: int = MAX_SHARD_BYTES) -> list[list[_Out]]:
    """Split into shards of at most ``max_bytes`` (a bigger tensor gets a shard of its own).

    The scales and biases of a quantized weight stay in the weight's shard.
    """
    shards: list[list[_Out]] = []
    size = 0
    for t in tensors:
        if not shards or (
            t.part in ("full", "weight") and size + t.nbytes > max_bytes and shards[-1]
        ):
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


# ---------------------------------------------------------------- streaming safetensors writer


def _release(tensor) -> None:
    """Drop a memory-mapped source tensor's pages from this process (they stay in the file)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        storage = tensor.untyped_storage()
        ptr, n = storage.data_ptr(), storage.nbytes()
        page = mmap.PAGESIZE
        start = (ptr // page) * page
        length = ((ptr + n + page - 1) // page) * page - start
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), 4)  # MADV_DONTNEED
    except Exception:  # best effort only; correctness never depends on it
        pass


def _to_bytes(a: mx.array) -> memoryview:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return memoryview(np.array(a, copy=False)).cast("B")


def _convert_one(
    src_tensor, dtype: mx.Dtype, quant: dict | None, quantize_it: bool
) -> dict[str, mx.array]:
    """One source tensor -> its output arrays (keyed by part); ``dtype`` is the output's."""
    x = mx.array(src_tensor.float().numpy())
    if quantize_it:
        wq, scales, biases = mx.quantize(
            x.astype(dtype), group_size=quant["group_size"], bits=quant["bits"]
        )
        res = {"weight": wq, "scales": scales.astype(dtype), "biases": biases.astype(dtype)}
    else:
        res = {"full": x.astype(dtype)}
    mx.eval(res)
    return res


def write_shards(
    ckpt: OfficialCheckpoint,
    folder: Path,
    dtype: mx.Dtype,
    quant: dict | None,
    *,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress=None,
) -> list[str]:
    """Write the converted weights as safetensors shards, one tensor in memory at a time."""
    tensors = plan_tensors(ckpt.args, dtype, quant)
    shards = make_shards(tensors, max_shard_bytes)
    n = len(shards)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    weight_map = {}
    for shard, fname in zip(shards, names, strict=True):
        header: dict = {"__metadata__": {"format": "mlx"}}
        off = 0
        for t in shard:
            header[t.name] = {
                "dtype": ST_DTYPE[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [off, off + t.nbytes],
            }
            off += t.nbytes
            weight_map[t.name] = fname
        hbytes = json.dumps(header, separators=(",", ":")).encode()
        hbytes += b" " * (-len(hbytes) % 8)
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(hbytes)))
            f.write(hbytes)
            pending: dict[str, mx.array] = {}
            for t in shard:
                if t.part in ("full", "weight"):
                    src = ckpt.state_dict[t.src]
                    out_dtype = t.dtype if t.part == "full" else dtype
                    pending = _convert_one(src, out_dtype, quant, t.part == "weight")
                    _release(src)
                arr = pending.pop(t.part)
                if tuple(arr.shape) != t.shape or arr.dtype != t.dtype:
                    raise CheckpointError(
                        f"internal: {t.name} came out {arr.dtype}{list(arr.shape)}"
                    )
                f.write(_to_bytes(arr))
                if progress is not None:
                    progress(t.nbytes)
            f.flush()
            os.fsync(f.fileno())
    if n > 1:
        total = sum(t.nbytes for t in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


# ---------------------------------------------------------------- the rest of the folder


def resolve_checkpoint(model: str, filename: str | None) -> Path:
    """A local ``.pth`` path, or a Hugging Face repo id plus ``filename`` (downloaded, cached)."""
    p = Path(model).expanduser()
    if p.exists() or filename is None:
        if filename is not None and p.is_dir():
            p = p / filename
        if not p.exists():
            hint = (
                " (for a Hugging Face repo, also pass --filename)"
                if "/" in model and not model.startswith((".", "/"))
                else ""
            )
            raise CheckpointError(f"no such checkpoint: {model}{hint}")
        return p
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id=model, filename=filename))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{model}/{filename} is not in the local Hugging Face cache and downloads are off "
            "(HF_HUB_OFFLINE) or unreachable"
        ) from None
    except HFValidationError:
        raise CheckpointError(
            f"{model!r} is neither a local file nor a Hugging Face repo id"
        ) from None
    except Exception as e:  # network / 404 / auth: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"could not download {filename} from {model}: {first}") from None


def resolve_tokenizer(tokenizer: str | None) -> Path:
    """A local tokenizer folder, a Hugging Face repo id, or (None) the shipped GPT-2 files."""
    if tokenizer is None:
        return default_tokenizer_dir()
    p = Path(tokenizer).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"--tokenizer {tokenizer} is a file; give the folder that holds it")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=tokenizer, allow_patterns=list(TOKENIZER_FILES)))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"no tokenizer at {tokenizer} ({first})") from None


def tokenizer_vocab_size(folder: Path) -> int:
    """Number of tokens of the tokenizer in ``folder`` (raises if there is none)."""
    if not any((folder / f).exists() for f in ("tokenizer.json", "vocab.json")):
        raise CheckpointError(f"{folder} holds no tokenizer (tokenizer.json or vocab.json)")
    from mlx_lm.utils import load_tokenizer

    try:
        tok = load_tokenizer(folder)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load the tokenizer in {folder} ({first})") from None
    return len(tok._tokenizer)


def model_card(
    args: ModelArgs, ckpt: OfficialCheckpoint, source: str, dtype: str, quant: dict | None
) -> str:
    kind = (
        "FS-DFM student (step-size conditioned)" if args.dt_conditioned else "DFM model (teacher)"
    )
    q = f", {quant['bits']}-bit quantized (group {quant['group_size']})" if quant else ""
    temp = (
        f"\nIts config sets `default_temp: {args.default_temp:g}`: `generate` and `eval` sample at "
        "that temperature unless `--temp` is given (`--temp 1` is the model's own distribution).\n"
        if args.default_temp != 1.0
        else ""
    )
    return f"""---
library_name: mlx
tags:
- mlx
- fsdfm
- discrete-flow-matching
- text-generation
---

# {Path(source).name} ({ckpt.selection}) for MLX

A {kind} with {args.n_blocks} blocks, hidden size {args.hidden_size}, {args.n_heads} heads and a
{args.source_distribution} source, converted to MLX ({dtype}{q}) by fsdfm-mlx from `{source}`
(entry `{ckpt.selection}`, training step {ckpt.step}).
{temp}
```bash
pip install fsdfm-mlx
fsdfm-mlx generate --model <this folder or repo> --steps {args.default_steps} --solver {args.default_solver}
```

```python
import fsdfm_mlx
model, tokenizer = fsdfm_mlx.load("<this folder or repo>")
```
"""


def convert(
    model: str,
    mlx_path: str = "mlx_model",
    *,
    filename: str | None = None,
    config: str | None = None,
    preset: str | None = None,
    n_heads: int | None = None,
    source: str | None = None,
    weights: str | None = None,
    dtype: str = "bfloat16",
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    tokenizer: str | None = None,
    upload_repo: str | None = None,
    force: bool = False,
    progress: bool = True,
    max_shard_size_gb: float = 5.0,
    default_temp: float | None = None,
) -> ConvertResult:
    """Convert an official FS-DFM / DFM PyTorch checkpoint into an MLX model folder.

    Args:
        model: a local ``.pth`` file, or a Hugging Face repo id (with ``filename``).
        mlx_path: the output folder (refused if it exists, unless ``force``).
        filename: the checkpoint's file name inside the Hugging Face repo.
        config: the training run's YAML config (``model.n_heads``, ``flow.source_distribution``).
        preset: ``170m`` | ``1.3b`` | ``1.7b`` (gives the head count).
        n_heads: the head count (otherwise head_dim 64 is assumed, and said so).
        source: ``uniform`` | ``mask``, when neither the config nor the shapes tell.
        weights: ``student`` | ``student_ema`` | ``teacher``; default ``student_model``, else the
            pre-training ``model``, else the teacher.
        dtype: ``float32`` | ``float16`` | ``bfloat16`` for the stored weights.
        quantize: MLX affine quantization of linear/embedding weights.
        q_bits: 4 or 8.
        q_group_size: 32, 64 or 128.
        tokenizer: a tokenizer folder or repo; default the GPT-2 files shipped in the package.
        upload_repo: a Hugging Face repo to upload the folder to.
        force: replace an existing ``mlx_path`` (only once the new one is complete).
        progress: show a progress bar.
        max_shard_size_gb: shard size limit.
        default_temp: the sampling temperature stored in the config, used by ``generate`` and
            ``eval`` when the user gives none (default 1.0, the model's own distribution).

    Returns:
        A ConvertResult describing the folder.

    Raises:
        CheckpointError: bad input, with a one-line message; nothing is left behind.
    """
    start = time.perf_counter()
    if default_temp is not None:  # checked before the checkpoint is read
        try:
            default_temp = check_default_temp(default_temp, "--default-temp")
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown --dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    if quantize:
        if q_bits not in (4, 8):
            raise CheckpointError(f"--q-bits must be 4 or 8, got {q_bits}")
        if q_group_size not in (32, 64, 128):
            raise CheckpointError(f"--q-group-size must be 32, 64 or 128, got {q_group_size}")
    out = Path(mlx_path).expanduser()
    if out.exists() and not force:
        raise CheckpointError(f"{out} already exists (pass --force to replace it)")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a folder")

    tok_dir = resolve_tokenizer(tokenizer)
    tok_vocab = tokenizer_vocab_size(tok_dir)
    path = resolve_checkpoint(model, filename)
    ckpt = read_official(
        path,
        weights=weights,
        config=config,
        preset=preset,
        n_heads=n_heads,
        source=source,
        vocab_size=tok_vocab,
    )
    args = ckpt.args
    if default_temp is not None:
        args = replace(args, default_temp=default_temp)
    notes = list(ckpt.notes)
    if tok_vocab != args.vocab_size:
        notes.append(
            f"the tokenizer has {tok_vocab} tokens but the model {args.vocab_size}: "
            "only ids below the smaller count decode"
        )
    quant = {"group_size": q_group_size, "bits": q_bits} if quantize else None
    mxdtype = DTYPES[dtype]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        total = sum(t.nbytes for t in plan_tensors(args, mxdtype, quant))
        bar = _progress_bar(total, f"converting {ckpt.selection}", enabled=progress)
        with bar as advance:
            write_shards(
                ckpt,
                tmp,
                mxdtype,
                quant,
                max_shard_bytes=int(max_shard_size_gb * (1 << 30)),
                progress=advance,
            )
        cfg = asdict(args)
        cfg.update(
            {
                "head_dim": args.head_dim,
                "num_tokens": args.num_tokens,
                "mask_token_id": args.mask_token_id,
                "dtype": dtype,
                "source": {
                    "checkpoint": str(model),
                    "filename": filename,
                    "weights": ckpt.selection,
                    "step": ckpt.step,
                },
            }
        )
        if quant:
            cfg["quantization"] = dict(quant)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        for f in TOKENIZER_FILES:
            if (tok_dir / f).exists():
                shutil.copyfile(tok_dir / f, tmp / f)
        (tmp / "README.md").write_text(model_card(args, ckpt, str(model), dtype, quant))
        _fsync_dir(tmp)
        if out.exists():  # force: swap only now that the new folder is complete
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    params = sum(int(np.prod(s)) for s in expected_shapes(args).values())
    result = ConvertResult(
        mlx_path=str(out),
        args=asdict(args),
        selection=ckpt.selection,
        dtype=dtype,
        quantization=quant,
        files=sorted(p.name for p in out.iterdir()),
        bytes_written=sum(p.stat().st_size for p in out.iterdir()),
        parameters=params,
        seconds=time.perf_counter() - start,
        notes=notes,
    )
    if upload_repo:
        upload(out, upload_repo)
    return result


def upload(path: Path, upload_repo: str) -> None:
    """Upload a converted folder to the Hugging Face Hub."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id=upload_repo, exist_ok=True)
    api.upload_folder(folder_path=str(path), repo_id=upload_repo, repo_type="model")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


class _progress_bar:
    """A rich progress bar over bytes; a no-op when disabled."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.enabled = total, desc, enabled
        self._p = None

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._p = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        self._p.__enter__()
        task = self._p.add_task(self.desc, total=self.total)
        return lambda n: self._p.advance(task, n)

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)
        return False
