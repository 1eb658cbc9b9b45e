"""A PyTorch port of the FS-DFM / DFM transformer, for tracing (Core ML) and training.

Module names and parameter shapes are those of the official checkpoints, so an official
(prefix-stripped) state dict loads with ``strict=True`` whatever the attention layout. Everything
that depends only on the length (RoPE cos/sin) or on nothing (the sinusoid frequencies) is
precomputed into non-persistent buffers, and the forward pass has no data-dependent control flow,
so ``torch.jit.trace`` records one straight-line graph.

Two layouts of the same computation:

* ``attention="original"``: activations ``[B, L, D]``, ``nn.Linear``, batched
  ``F.scaled_dot_product_attention`` over ``[B, H, L, Dh]``.
* ``attention="split_einsum"``: the Neural-Engine-friendly layout: activations ``[B, D, 1, L]``
  (channels first, sequence last), every projection a 1x1 ``conv2d`` with the Linear weight viewed
  as ``[out, in, 1, 1]``, LayerNorm over the channel axis, and attention computed head by head with
  ``einsum`` so no op needs a ``[B, H, L, Dh]`` transpose.

Shape letters: B batch, L length, D hidden size, C conditioning size, H heads, Dh head dim, V rows
of the vocabulary (+1 with a mask source).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsdfm_mlx.model import ModelArgs

ATTENTION_KINDS = ("original", "split_einsum")


def rope_tables(length: int, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """Rotate-half RoPE tables for positions ``0..length-1``: two float32 ``[length, head_dim]``."""
    # explicit device: the tables stay real when the module is built under torch.device("meta")
    arange = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu")
    inv_freq = 1.0 / (base ** (arange / head_dim))
    angles = torch.arange(length, dtype=torch.float32, device="cpu")[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


class TimestepEmbedder(nn.Module):
    """Sinusoidal features (cosine half first) -> Linear -> SiLU -> Linear: ``[B] -> [B, C]``."""

    def __init__(self, cond_dim: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, cond_dim),
            nn.SiLU(),
            nn.Linear(cond_dim, cond_dim),
        )
        half = frequency_embedding_size // 2
        steps = torch.arange(half, dtype=torch.float32, device="cpu")
        freqs = torch.exp(-math.log(10000.0) * steps / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.odd = frequency_embedding_size % 2 == 1

    def forward(self, t: Tensor) -> Tensor:
        args = t.float()[:, None] * self.freqs.float()[None, :]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.odd:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LayerNorm(nn.Module):
    """Bias-free LayerNorm normalised in float32, over the last axis or (split_einsum) axis 1."""

    def __init__(self, dim: int, channels_first: bool = False, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim
        self.channels_first = channels_first
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        if self.channels_first:  # [B, D, 1, L]
            mean = x.mean(dim=1, keepdim=True)
            xc = x - mean
            var = (xc * xc).mean(dim=1, keepdim=True)
            y = xc * torch.rsqrt(var + self.eps)
            return (y * self.weight.float()[None, :, None, None]).to(dtype)
        y = F.layer_norm(x, (self.dim,), eps=self.eps)
        return (y * self.weight.float()).to(dtype)


def _conv1x1(x: Tensor, linear: nn.Linear) -> Tensor:
    """A Linear as a 1x1 conv on ``[B, in, 1, L]`` (the weight viewed as ``[out, in, 1, 1]``)."""
    return F.conv2d(x, linear.weight[:, :, None, None], linear.bias)


def _rotate_half(x: Tensor, dim: int) -> Tensor:
    x1, x2 = x.chunk(2, dim=dim)
    return torch.cat([-x2, x1], dim=dim)


class DDiTBlock(nn.Module):
    """adaLN-modulated attention + MLP block."""

    def __init__(self, args: ModelArgs, attention: str):
        super().__init__()
        D, C = args.hidden_size, args.cond_dim
        self.n_heads = args.n_heads
        self.head_dim = args.head_dim
        self.attention = attention
        split = attention == "split_einsum"
        self.norm1 = LayerNorm(D, channels_first=split)
        self.qw = nn.Linear(D, D, bias=False)
        self.kw = nn.Linear(D, D, bias=False)
        self.vw = nn.Linear(D, D, bias=False)
        self.attn_out = nn.Linear(D, D, bias=False)
        self.norm2 = LayerNorm(D, channels_first=split)
        self.mlp = nn.Sequential(
            nn.Linear(D, args.mlp_ratio * D),
            nn.GELU(approximate="tanh"),
            nn.Linear(args.mlp_ratio * D, D),
        )
        self.dt_conditioned = args.dt_conditioned
        if args.dt_conditioned:
            self.condition_fuser = nn.Linear(2 * C, C)
        self.adaLN_modulation = nn.Linear(C, 6 * D)

    def _modulation(self, c: Tensor) -> Tensor:
        if self.dt_conditioned:
            c = F.silu(self.condition_fuser(c))
        return self.adaLN_modulation(c)  # [B, 6D]

    def forward(self, x: Tensor, c: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        if self.attention == "split_einsum":
            return self._forward_split(x, c, cos, sin)
        return self._forward_original(x, c, cos, sin)

    def _forward_original(self, x: Tensor, c: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        # x: [B, L, D]; cos/sin: [L, Dh] float32
        B, L, D = x.shape
        H, Dh = self.n_heads, self.head_dim
        shift1, scale1, gate1, shift2, scale2, gate2 = self._modulation(c)[:, None, :].chunk(
            6, dim=2
        )
        h = self.norm1(x) * (1 + scale1) + shift1
        q = self.qw(h).view(B, L, H, Dh).transpose(1, 2)  # [B, H, L, Dh]
        k = self.kw(h).view(B, L, H, Dh).transpose(1, 2)
        v = self.vw(h).view(B, L, H, Dh).transpose(1, 2)
        q = (q.float() * cos + _rotate_half(q.float(), -1) * sin).to(x.dtype)
        k = (k.float() * cos + _rotate_half(k.float(), -1) * sin).to(x.dtype)
        a = F.scaled_dot_product_attention(q, k, v)  # bidirectional: no mask
        a = a.transpose(1, 2).reshape(B, L, D)
        x = x + gate1 * self.attn_out(a)
        h = self.mlp(self.norm2(x) * (1 + scale2) + shift2)
        return x + gate2 * h

    def _forward_split(self, x: Tensor, c: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        # x: [B, D, 1, L]; cos/sin: [Dh, L] float32
        B, D = x.shape[0], x.shape[1]
        H, Dh = self.n_heads, self.head_dim
        mod = self._modulation(c)[:, :, None, None]  # [B, 6D, 1, 1]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=1)
        h = self.norm1(x) * (1 + scale1) + shift1
        q = _conv1x1(h, self.qw) * (Dh**-0.5)  # the softmax scale, folded into q once
        k = _conv1x1(h, self.kw)
        v = _conv1x1(h, self.vw)
        # RoPE on all heads at once: [B, D, 1, L] -> [B, H, Dh, L], rotate-half over Dh
        q4 = q.float().reshape(B, H, Dh, -1)
        k4 = k.float().reshape(B, H, Dh, -1)
        q = (q4 * cos + _rotate_half(q4, 2) * sin).reshape(B, D, 1, -1).to(x.dtype)
        k = (k4 * cos + _rotate_half(k4, 2) * sin).reshape(B, D, 1, -1).to(x.dtype)
        kt = k.transpose(1, 3)  # [B, L, 1, D]: keys on axis 1, so both einsums are MIL-native
        heads = []
        for qh, kh, vh in zip(
            q.split(Dh, dim=1), kt.split(Dh, dim=3), v.split(Dh, dim=1), strict=True
        ):
            # qh, vh: [B, Dh, 1, L]; kh: [B, Lk, 1, Dh]; weights: [B, Lk, 1, Lq], softmax over keys
            w = torch.einsum("bkhc,bchq->bkhq", kh, qh).softmax(dim=1)
            heads.append(torch.einsum("bchk,bkhq->bchq", vh, w))  # [B, Dh, 1, Lq]
        a = torch.cat(heads, dim=1)  # [B, D, 1, L]
        x = x + gate1 * _conv1x1(a, self.attn_out)
        h = self.norm2(x) * (1 + scale2) + shift2
        h = _conv1x1(F.gelu(_conv1x1(h, self.mlp[0]), approximate="tanh"), self.mlp[2])
        return x + gate2 * h


class DDitFinalLayer(nn.Module):
    """Final adaLN LayerNorm and the vocabulary projection."""

    def __init__(self, args: ModelArgs, attention: str):
        super().__init__()
        D, C = args.hidden_size, args.cond_dim
        self.attention = attention
        self.norm_final = LayerNorm(D, channels_first=attention == "split_einsum")
        self.linear = nn.Linear(D, args.num_tokens)
        self.dt_conditioned = args.dt_conditioned
        if args.dt_conditioned:
            self.condition_fuser = nn.Linear(2 * C, C)
        self.adaLN_modulation = nn.Linear(C, 2 * D)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        if self.dt_conditioned:
            c = F.silu(self.condition_fuser(c))
        mod = self.adaLN_modulation(c)
        if self.attention == "split_einsum":
            shift, scale = mod[:, :, None, None].chunk(2, dim=1)
            h = self.norm_final(x) * (1 + scale) + shift  # [B, D, 1, L]
            # Back to [B, L, D] before the V-wide projection: transposing D is cheaper than V.
            h = h.squeeze(2).transpose(1, 2)
        else:
            shift, scale = mod[:, None, :].chunk(2, dim=2)
            h = self.norm_final(x) * (1 + scale) + shift
        return self.linear(h)  # [B, L, V]


class FSDFMTorch(nn.Module):
    """The FS-DFM transformer in PyTorch: ``model(tokens, t, dt) -> logits [B, L, V(+1)]``.

    Args:
        args: the model's configuration (``fsdfm_mlx.model.ModelArgs``).
        attention: ``"original"`` or ``"split_einsum"`` (same weights and numbers, other layout).
        max_length: longest sequence the RoPE tables cover (default ``args.length``); shorter inputs
            use a prefix of the tables.
        exact_length: promise that every input has exactly ``max_length`` tokens, so the tables are
            used whole and a traced graph has no length-dependent slice (a fixed-shape export).
    """

    def __init__(
        self,
        args: ModelArgs,
        *,
        attention: str = "original",
        max_length: int | None = None,
        exact_length: bool = False,
    ):
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        self.args = args
        self.attention = attention
        self.max_length = int(max_length or args.length)
        self.exact_length = bool(exact_length)
        C = args.cond_dim
        self.vocab_embed = nn.Embedding(args.num_tokens, args.hidden_size)
        self.time_embedding = TimestepEmbedder(C, args.frequency_embedding_size)
        if args.dt_conditioned:
            self.dt_embedding = TimestepEmbedder(C, args.frequency_embedding_size)
            self.time_condition_fuser = nn.Linear(2 * C, 2 * C)
        self.blocks = nn.ModuleList([DDiTBlock(args, attention) for _ in range(args.n_blocks)])
        self.output_layer = DDitFinalLayer(args, attention)
        cos, sin = rope_tables(self.max_length, args.head_dim, args.rope_base)
        if attention == "split_einsum":
            cos, sin = cos.T.contiguous(), sin.T.contiguous()  # [Dh, L]: sequence last
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def from_state_dict(
        cls,
        args: ModelArgs,
        state_dict: dict[str, Tensor],
        *,
        attention: str = "original",
        max_length: int | None = None,
        exact_length: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> FSDFMTorch:
        """Build from ``ModelArgs`` and an official (prefix-stripped) state dict, loaded strictly.

        ``rotary_emb.inv_freq`` and ``module.`` / ``_orig_mod.`` prefixes are tolerated and dropped.
        """
        sd = {}
        for key, value in state_dict.items():
            while key.startswith(("module.", "_orig_mod.")):
                key = key.split(".", 1)[1]
            if key.endswith("rotary_emb.inv_freq"):
                continue
            sd[key] = value
        # Built on the meta device and filled with assign=True: no second copy of the weights (the
        # model shares the given tensors' storage where their dtype is already ``dtype``).
        with torch.device("meta"):
            model = cls(args, attention=attention, max_length=max_length, exact_length=exact_length)
        model.load_state_dict(sd, strict=True, assign=True)
        return model.to(dtype).eval()

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        attention: str = "original",
        max_length: int | None = None,
        dtype: torch.dtype = torch.float32,
        **read_official_kwargs,
    ) -> FSDFMTorch:
        """Build from an official ``.pth`` via ``fsdfm_mlx.convert.checkpoint.read_official``.

        Args:
            path: the checkpoint file.
            attention: the attention layout.
            max_length: RoPE table length (default: the model's training length).
            dtype: parameter dtype.
            **read_official_kwargs: ``weights``, ``config``, ``preset``, ``n_heads``, ``source``.
        """
        from fsdfm_mlx.convert.checkpoint import read_official

        ck = read_official(path, **read_official_kwargs)
        return cls.from_state_dict(
            ck.args, ck.state_dict, attention=attention, max_length=max_length, dtype=dtype
        )

    @classmethod
    def from_mlx_folder(
        cls,
        path: str | Path,
        *,
        attention: str = "original",
        max_length: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> FSDFMTorch:
        """Build from a converted MLX folder (config.json + safetensors), dequantizing if needed."""
        args, state_dict = read_mlx_folder(path)
        return cls.from_state_dict(
            args, state_dict, attention=attention, max_length=max_length, dtype=dtype
        )

    # -- forward ------------------------------------------------------------------------------

    def condition(self, t: Tensor, dt: Tensor | None) -> Tensor:
        """``c``: [B, C] for a teacher (``silu(te)``), [B, 2C] for a student."""
        te = self.time_embedding(t)
        if not self.args.dt_conditioned:
            return F.silu(te)
        if dt is None:
            raise ValueError("this model is step-size conditioned (a student): pass dt")
        de = self.dt_embedding(dt)
        return F.silu(self.time_condition_fuser(torch.cat([te, de], dim=-1)))

    def forward(self, tokens: Tensor, t: Tensor, dt: Tensor | None = None) -> Tensor:
        """Logits of ``p_{1|t}(x_1 | x_t)``.

        Args:
            tokens: [B, L] integer ids (int32 or int64), ``L <= max_length``.
            t: [B] float times in [0, 1].
            dt: [B] float step sizes (students only).

        Returns:
            [B, L, V(+1)] logits in the parameters' dtype.
        """
        c = self.condition(t, dt)
        x = self.vocab_embed(tokens)  # [B, L, D]
        cos, sin = self.rope_cos.float(), self.rope_sin.float()
        if not self.exact_length:
            L = tokens.shape[1]  # traced as a shape op, so enumerated lengths slice correctly
            cos, sin = (
                (cos[:, :L], sin[:, :L]) if self.attention == "split_einsum" else (cos[:L], sin[:L])
            )
        if self.attention == "split_einsum":
            x = x.transpose(1, 2).unsqueeze(2)  # [B, D, 1, L]
        for block in self.blocks:
            x = block(x, c, cos, sin)
        return self.output_layer(x, c)


def read_mlx_folder(path: str | Path) -> tuple[ModelArgs, dict[str, Tensor]]:
    """Read a converted MLX folder into ``ModelArgs`` and a float32 torch state dict.

    Quantized layers (``X.weight`` packed with ``X.scales`` / ``X.biases``) are dequantized with
    ``fsdfm_mlx.load.dequantize_weights`` (group size and bits from ``config["quantization"]``,
    per-layer entries win).
    """
    import mlx.core as mx
    import numpy as np

    from fsdfm_mlx.load import dequantize_weights, load_config, read_weights

    path = Path(path)
    config = load_config(path)
    args = ModelArgs.from_dict(config)
    weights = read_weights(path)
    if config.get("quantization"):
        weights = dequantize_weights(weights, config["quantization"])
    out = {k: torch.from_numpy(np.array(v.astype(mx.float32))) for k, v in weights.items()}
    return args, out
