"""The FS-DFM / DFM transformer (a DiT over tokens with adaLN time conditioning) in MLX.

Module names follow the official checkpoint keys, so weight mapping is a prefix strip. Shape letters:
B batch, L length, D hidden size, C conditioning size, H heads, V rows of the vocabulary (+1 with a mask
source).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

SOLVERS = ("mixture_euler_with_cumulative_scalar", "mixture_euler", "dfm_euler")


def check_default_temp(value, name: str = "default_temp") -> float:
    """A sampling temperature for a model's config: a finite number >= 0, returned as a float.

    Raises:
        ValueError: anything else (one line, naming ``name``).
    """
    if isinstance(value, bool) or not (
        isinstance(value, (int, float)) and 0 <= value < float("inf")
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclass
class ModelArgs:
    """Everything needed to build the network and sample from it (what `config.json` holds).

    Attributes:
        hidden_size: D, the width of the residual stream.
        cond_dim: C, the width of the time (and step-size) embedding.
        n_blocks: number of transformer blocks.
        n_heads: attention heads (D / n_heads is the head dim; not readable from the weights).
        vocab_size: tokenizer vocabulary the model writes (50,257 for GPT-2), without the mask row.
        source_distribution: ``"uniform"`` or ``"mask"``; a mask source adds row ``vocab_size``.
        dt_conditioned: True for FS-DFM students (step-size conditioned), False for DFM teachers.
        mlp_ratio: width of the MLP over D.
        length: sequence length the model was trained on.
        frequency_embedding_size: width of the sinusoidal time features.
        rope_base: RoPE base.
        default_solver: the solver the official evaluation uses for this kind of model.
        default_steps: the step count that goes with it.
        default_temp: the sampling temperature ``generate`` and ``eval`` use when none is given
            (1.0 = the model's own distribution; a converted model may ship a lower one, see
            ``fsdfm-mlx convert --default-temp``).
        scheduler: the probability path's scheduler (``{"type": "polynomial", "exponent": 1.0}``).
    """

    hidden_size: int
    cond_dim: int
    n_blocks: int
    n_heads: int
    vocab_size: int
    model_type: str = "fsdfm"
    source_distribution: str = "uniform"
    dt_conditioned: bool = False
    mlp_ratio: int = 4
    length: int = 1024
    frequency_embedding_size: int = 256
    rope_base: float = 10000.0
    default_solver: str | None = None
    default_steps: int | None = None
    default_temp: float = 1.0
    scheduler: dict = field(default_factory=lambda: {"type": "polynomial", "exponent": 1.0})

    def __post_init__(self):
        if self.source_distribution not in ("uniform", "mask"):
            raise ValueError(
                f"source_distribution must be 'uniform' or 'mask', got {self.source_distribution!r}"
            )
        if self.hidden_size % self.n_heads != 0:
            raise ValueError(
                f"n_heads={self.n_heads} does not divide hidden_size={self.hidden_size}"
            )
        if self.default_solver is None:
            self.default_solver = (
                "mixture_euler_with_cumulative_scalar" if self.dt_conditioned else "dfm_euler"
            )
        if self.default_steps is None:
            self.default_steps = 8 if self.dt_conditioned else 1024
        self.default_temp = check_default_temp(self.default_temp)

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> ModelArgs:
        """Build from a config dict, ignoring keys this class does not know."""
        names = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in params.items() if k in names})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @property
    def masked(self) -> bool:
        return self.source_distribution == "mask"

    @property
    def mask_token_id(self) -> int | None:
        """The mask token's id (== vocab_size) for a mask source, else None."""
        return self.vocab_size if self.masked else None

    @property
    def num_tokens(self) -> int:
        """Rows of the embedding and of the logits: V, plus one for the mask token."""
        return self.vocab_size + int(self.masked)


def timestep_embedding(t: mx.array, dim: int, max_period: float = 10000.0) -> mx.array:
    """Sinusoidal features of per-sequence times, cosine half first: [B] -> [B, dim] (float32)."""
    half = dim // 2
    freqs = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / half)
    args = t.astype(mx.float32)[:, None] * freqs[None]
    emb = mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)
    if dim % 2:
        emb = mx.concatenate([emb, mx.zeros_like(emb[:, :1])], axis=-1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, cond_dim: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = [
            nn.Linear(frequency_embedding_size, cond_dim),
            nn.SiLU(),
            nn.Linear(cond_dim, cond_dim),
        ]

    def __call__(self, t: mx.array) -> mx.array:
        h = timestep_embedding(t, self.frequency_embedding_size)
        for layer in self.mlp:
            h = layer(h)
        return h


class LayerNorm(nn.Module):
    """LayerNorm without bias, normalised in float32 as the official model does."""

    def __init__(self, dims: int, eps: float = 1e-5):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.layer_norm(
            x.astype(mx.float32), self.weight.astype(mx.float32), None, self.eps
        )


def _on_cpu() -> bool:
    return mx.default_device().type == mx.cpu


def _rope_computes_in_input_dtype() -> bool:
    """True where ``mx.fast.rope`` has no float32 kernel (MLX's CPU backend) for bf16 / fp16 input."""
    return _on_cpu()


# --- CPU fast path for exp ----------------------------------------------------------------------------
# MLX's x86 CPU backend evaluates exp and tanh one element at a time through scalar code (~15 ns an
# element on this project's 2-core machine): the GELU's tanh and attention's softmax took about a third
# of a 170M forward pass. Written with multiplies and adds, under `mx.compile`, exp runs as one fused
# loop that the C++ compiler vectorises, ~5x faster and more accurate (within 1e-7 relative in
# float32, against 2e-6 for MLX's CPU exp). GPUs keep MLX's own kernels. The first use of each fused
# loop runs a C++ compiler (~0.5 s; MLX caches the result on disk), which only pays on large arrays:
# smaller ones (the shipped demo model at batch 1) keep MLX's own ops.
CPU_FAST_MIN_SIZE = 1 << 19

# ln 2 split in two, so that n * _LN2_HI is exact for the n that occur
_LN2_HI, _LN2_LO = 0.693145751953125, 1.428606765330187e-06
_ROUND = 12582912.0  # 1.5 * 2^23: (t + _ROUND) - _ROUND rounds t to an integer in float32


def _cpu_fast_path(size: int) -> bool:
    return size >= CPU_FAST_MIN_SIZE and _on_cpu()


@mx.compile
def exp_poly(x: mx.array) -> mx.array:
    """exp in multiplies, adds and an exponent-bit shift (float32; clamped to [e^-87, e^88])."""
    x = mx.clip(x.astype(mx.float32), -87.0, 88.0)
    n = (x * 1.4426950408889634 + _ROUND) - _ROUND  # x = n ln2 + r, |r| <= ln2 / 2
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = 1.0 / 5040.0  # exp(r) by its Taylor series to r^7 (error < 6e-9 relative)
    for c in (1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
        p = p * r + c
    return p * ((n.astype(mx.int32) + 127) << 23).view(mx.float32)  # p * 2^n


@mx.compile
def _gelu_tanh_cpu(x: mx.array) -> mx.array:
    # 0.5 x (1 + tanh(y)) == x * sigmoid(2y) == x / (1 + exp(-2y))
    x32 = x.astype(mx.float32)
    y = 0.7978845608028654 * (x32 + 0.044715 * x32 * x32 * x32)
    return (x32 / (1.0 + exp_poly(-2.0 * y))).astype(x.dtype)


def gelu(x: mx.array) -> mx.array:
    """GELU with the tanh approximation, as the official model uses it."""
    return _gelu_tanh_cpu(x) if _cpu_fast_path(x.size) else nn.gelu_approx(x)


class GELU(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return gelu(x)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Bidirectional softmax attention: [B, H, L, Dh] x 3 -> [B, H, L, Dh]."""
    B, H, L, _ = q.shape
    if not _cpu_fast_path(B * H * L * k.shape[2]):  # the size of the scores
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    s = (q * scale) @ k.swapaxes(-1, -2)  # [B, H, L, L]
    e = exp_poly(s - mx.max(s, axis=-1, keepdims=True))
    p = e / mx.sum(e, axis=-1, keepdims=True)
    return p.astype(v.dtype) @ v


def modulate(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    return x * (1 + scale) + shift


class DDiTBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, C = args.hidden_size, args.cond_dim
        self.n_heads = args.n_heads
        self.head_dim = args.head_dim
        self.rope_base = args.rope_base
        self.dt_conditioned = args.dt_conditioned
        self.norm1 = LayerNorm(D)
        self.qw = nn.Linear(D, D, bias=False)
        self.kw = nn.Linear(D, D, bias=False)
        self.vw = nn.Linear(D, D, bias=False)
        self.attn_out = nn.Linear(D, D, bias=False)
        self.norm2 = LayerNorm(D)
        self.mlp = [
            nn.Linear(D, args.mlp_ratio * D),
            GELU(),
            nn.Linear(args.mlp_ratio * D, D),
        ]
        if args.dt_conditioned:
            self.condition_fuser = nn.Linear(2 * C, C)
        self.adaLN_modulation = nn.Linear(C, 6 * D)

    def __call__(self, x: mx.array, c: mx.array, dtype: mx.Dtype) -> mx.array:
        B, L, D = x.shape
        if self.dt_conditioned:
            c = nn.silu(self.condition_fuser(c))
        mod = self.adaLN_modulation(c)[:, None, :]  # [B, 1, 6D]
        shift1, scale1, gate1, shift2, scale2, gate2 = mx.split(mod, 6, axis=-1)

        h = modulate(self.norm1(x), shift1, scale1).astype(dtype)

        def heads(x: mx.array) -> mx.array:  # [B, L, D] -> [B, H, L, Dh]
            return x.reshape(B, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)

        def rope(x: mx.array) -> mx.array:
            # Rotate-half layout over the whole head dim, positions 0..L-1, in float32 arithmetic
            # as the official model does. The Metal and CUDA kernels read and write the input's
            # dtype but compute in float32, so they take bf16 directly (two casts and a float32
            # copy of q and k fewer per block); MLX's CPU version computes in the input dtype.
            upcast = x.dtype != mx.float32 and _rope_computes_in_input_dtype()
            y = mx.fast.rope(
                x.astype(mx.float32) if upcast else x,
                self.head_dim,
                traditional=False,
                base=self.rope_base,
                scale=1.0,
                offset=0,
            )
            return y.astype(dtype)

        q, k, v = rope(heads(self.qw(h))), rope(heads(self.kw(h))), heads(self.vw(h))
        a = attention(q, k, v, self.head_dim**-0.5)  # [B, H, L, Dh]
        a = a.transpose(0, 2, 1, 3).reshape(B, L, D)
        x = x + gate1 * self.attn_out(a)

        h = modulate(self.norm2(x), shift2, scale2).astype(dtype)
        for layer in self.mlp:
            h = layer(h)
        return x + gate2 * h


# The output projection's rows are padded to a multiple of this (50,257 -> 50,304), and the logits
# sliced back. With an odd row count the logits' row stride is odd, and on the H100 cuBLAS then
# runs this matmul (a tenth of the model's FLOPs) at ~100 TFLOP/s instead of ~600.
OUTPUT_ROW_MULTIPLE = 128


def padded_rows(n: int) -> int:
    """``n`` rounded up to a multiple of ``OUTPUT_ROW_MULTIPLE``."""
    return -(-n // OUTPUT_ROW_MULTIPLE) * OUTPUT_ROW_MULTIPLE


class DDitFinalLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, C = args.hidden_size, args.cond_dim
        self.dt_conditioned = args.dt_conditioned
        self.rows = args.num_tokens
        self.norm_final = LayerNorm(D)
        self.linear = nn.Linear(D, padded_rows(args.num_tokens))  # rows past V(+1) are zeros
        if args.dt_conditioned:
            self.condition_fuser = nn.Linear(2 * C, C)
        self.adaLN_modulation = nn.Linear(C, 2 * D)

    def __call__(self, x: mx.array, c: mx.array, dtype) -> mx.array:
        if self.dt_conditioned:
            c = nn.silu(self.condition_fuser(c))
        shift, scale = mx.split(self.adaLN_modulation(c)[:, None, :], 2, axis=-1)
        logits = self.linear(modulate(self.norm_final(x), shift, scale).astype(dtype))
        return logits[..., : self.rows] if logits.shape[-1] != self.rows else logits


class Model(nn.Module):
    """The FS-DFM transformer: ``model(tokens, t, dt) -> logits``.

    Args:
        args: the model's configuration.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        C = args.cond_dim
        self.vocab_embed = nn.Embedding(args.num_tokens, args.hidden_size)
        self.time_embedding = TimestepEmbedder(C, args.frequency_embedding_size)
        if args.dt_conditioned:
            self.dt_embedding = TimestepEmbedder(C, args.frequency_embedding_size)
            self.time_condition_fuser = nn.Linear(2 * C, 2 * C)
        self.blocks = [DDiTBlock(args) for _ in range(args.n_blocks)]
        self.output_layer = DDitFinalLayer(args)

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype of the matmuls (the dtype of the scales for a quantized model)."""
        lin = self.blocks[0].qw if self.blocks else self.output_layer.linear
        return lin.scales.dtype if "scales" in lin else lin.weight.dtype

    def condition(self, t: mx.array, dt: mx.array | None = None) -> mx.array:
        """The time conditioning vector ``c``: [B] (, [B]) -> [B, C] (teacher) or [B, 2C] (student)."""
        te = self.time_embedding(t)
        if not self.args.dt_conditioned:
            return nn.silu(te)
        if dt is None:
            raise ValueError("this model is step-size conditioned (a student): pass dt")
        de = self.dt_embedding(dt)
        return nn.silu(self.time_condition_fuser(mx.concatenate([te, de], axis=-1)))

    def __call__(self, tokens: mx.array, t: mx.array, dt: mx.array | None = None) -> mx.array:
        """Logits of the posterior ``p_{1|t}(x_1 | x_t)``.

        Args:
            tokens: [B, L] int token ids ``x_t``.
            t: [B] float times in [0, 1].
            dt: [B] float step sizes (students only; ignored by teachers).

        Returns:
            [B, L, V(+1)] logits in the model's dtype.
        """
        x, c = self.embed(tokens, t, dt)
        x = self.run_blocks(x, c)
        return self.head(x, c)

    def embed(
        self, tokens: mx.array, t: mx.array, dt: mx.array | None = None
    ) -> tuple[mx.array, mx.array]:
        """The forward pass up to the first block: ``(x [B, L, D] float32, c [B, C | 2C])``.

        ``__call__`` is ``head(run_blocks(*embed(tokens, t, dt)))``; the pieces exist so that a
        caller can evaluate the blocks a few at a time (see ``fsdfm_mlx.generate.make_forward``).
        """
        t = mx.broadcast_to(mx.array(t, dtype=mx.float32), (tokens.shape[0],))
        if dt is not None:
            dt = mx.broadcast_to(mx.array(dt, dtype=mx.float32), (tokens.shape[0],))
        c = self.condition(t, dt)
        # The residual stream stays float32, as under the official bf16 autocast.
        return self.vocab_embed(tokens).astype(mx.float32), c

    def run_blocks(
        self, x: mx.array, c: mx.array, start: int = 0, stop: int | None = None
    ) -> mx.array:
        """Blocks ``start`` to ``stop - 1`` on the residual stream ``x`` [B, L, D]."""
        dtype = self.dtype
        for block in self.blocks[start:stop]:
            x = block(x, c, dtype)
        return x

    def head(self, x: mx.array, c: mx.array) -> mx.array:
        """The final layer: residual stream [B, L, D] -> logits [B, L, V(+1)]."""
        return self.output_layer(x, c, self.dtype)

    def checkpoint_weights(self) -> dict[str, mx.array]:
        """The parameters as a flat dict in checkpoint shapes (the output rows' padding dropped):
        the inverse of :meth:`sanitize`, for saving or handing to another implementation."""
        rows = self.args.num_tokens
        return {
            k: v[:rows] if k.startswith("output_layer.linear.") else v
            for k, v in tree_flatten(self.parameters())
        }

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map official state-dict keys to this model's: strip DDP / compile prefixes, drop buffers,
        pad the output projection's rows (weight, bias, and a quantized layer's scales and biases)
        with zeros to this model's padded row count."""
        out = {}
        rows = self.output_layer.linear.weight.shape[0]
        for k, v in weights.items():
            k = strip_prefixes(k)
            if k.endswith("rotary_emb.inv_freq"):
                continue
            if k.startswith("output_layer.linear.") and v.shape[0] < rows:
                v = mx.concatenate([v, mx.zeros((rows - v.shape[0], *v.shape[1:]), v.dtype)])
            out[k] = v
        return out


def strip_prefixes(key: str) -> str:
    """Remove any leading ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes."""
    changed = True
    while changed:
        changed = False
        for p in ("module.", "_orig_mod."):
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key
