"""The model: a small GPT with RoPE, SwiGLU, RMSNorm and optional vector centering.

Every module calls `fastcenter.ops` and owns its computation (nanoGPT style: `x = self.attn(self.norm(x))`);
nothing is passed down but data. Which implementation the ops run is decided in one place,
`fastcenter.ops.backend()`: the Triton kernels on a GPU, the CPU implementation on a CPU. The model's one switch,
`GPTConfig.fused`, only says whether that choice is allowed: `fused=False` runs the forward inside
`ops.using("reference")`, so every op takes the eager reference (`fastcenter.reference`), the readable
specification. The same weights give the same loss and gradients either way.

The residual stream, written so that the norms can fuse the residual add. A pre-norm block is usually

    h = h + attn(norm1(h));  h = h + mlp(norm2(h))

Here every branch output (`delta`) is handed *un-added* to the next `center_rms_norm`, which adds it, subtracts the
centre (if any) and normalises in one pass, and returns the new stream as `hidden`:

    normed, h = norm1.add_and_norm(h, residual=delta, center=c)    # h <- h + delta - c; normed = norm(h)
    normed, h = norm2.add_and_norm(h, residual=attn(normed))       # h <- h + attn(...)
    delta = mlp(normed)                                            # added by the next block's first norm

and after the last block the final norm adds the last `delta`. So each element of the stream is read and written
once per norm instead of once for the add and again for the norm.

Centering placements (`GPTConfig.center`, any subset; `fastcenter.nn.VectorCentering`, mode `centering_mode`):

    embeddings  token embeddings before the first block (fused into its first norm as `center=`)
    qk          queries and keys right after the projection, BEFORE RoPE: subtracting one vector from every
                key after RoPE would change nothing (softmax ignores a per-query constant), while before RoPE
                the rotated centre differs per position, so the centering has an effect
    v           values (a position-constant shift of v shifts every attention output by the same vector)
    residual    the stream after every block, the last included (one module per block, fused into the next
                norm: the next block's first norm or the final norm); it is the union of two placements that
                can be chosen on their own:
      residual_inner  after every block but the last (inside the stack)
      residual_final  after the last block only: the stream the output head reads, whose mean direction carries
                      the token-frequency prior in this bias-free, tied-embedding model
    mlp         the SwiGLU hidden activation before the down projection

q, k and v are centred over their [B, T, H * Dh] views: one statistic per head and feature.

Architecture options (`GPTConfig.norm`, `mlp`, `positions`, `bias`; defaults: the default model). The centering
claims were measured on nanoGPT's architecture, which these options rebuild (`NANOGPT` holds the setting):

    norm="layernorm"     LayerNorm (nanoGPT's: gain, and a bias when bias=True; eps norm_eps, nanoGPT's is 1e-5)
    mlp="gelu"           up projection, exact GELU, down projection (hidden mlp_hidden, 4 * dim by default)
    positions="learned"  a learned absolute position embedding added to the token embedding (no RoPE)
    bias=True            a bias in every linear (and in LayerNorm); the head stays the tied embedding, no bias

They run as eager PyTorch ops whatever `fused` says (fastcenter has no kernel for them); RMSNorm, RoPE and SwiGLU
keep their fused ops where chosen. LayerNorm takes the same fused-residual interface as RMSNorm
(`add_and_norm`), so every placement works with every option: `embeddings` centres the stream entering the first
block (token plus position embedding), `qk` centres right after the projection (with no RoPE there is nothing to
come before; then a centre common to every key, as every mode but `causal` subtracts, is a per-query constant in
the scores and changes nothing: only the query centring acts), `mlp` centres the GELU hidden activation.

Parameter count of the default model (vocab 50257, dim 256, 4 layers, MLP hidden 1024, embedding tied to the head):
    embedding 50257 * 256 = 12,865,792;  per layer: qkv 3 * 256^2 + out 256^2 + gate|up 256 * 2048 + down 1024 * 256
    + two norm gains 2 * 256 = 1,049,088, times 4 = 4,196,352;  final norm 256;  total 17,062,400.
nanoGPT's architecture at 384 wide (NANOGPT, 6 layers, 6 heads, max_seq_len 256, vocab 50257):
    embedding 50257 * 384 = 19,298,688;  positions 256 * 384 = 98,304;  per layer: two LayerNorms 4 * 384,
    qkv 384 * 1152 + 1152, out 384^2 + 384, up 384 * 1536 + 1536, down 1536 * 384 + 384 = 1,774,464, times 6
    = 10,646,784;  final LayerNorm 768;  total 30,044,544.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from collections.abc import Iterable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .data import GPT2_VOCAB_SIZE
from .nn import CENTERING_MODES, RMSNorm, VectorCentering

__all__ = [
    "PLACEMENTS",
    "RESIDUAL_PARTS",
    "NORMS",
    "MLPS",
    "POSITIONS",
    "NANOGPT",
    "GPTConfig",
    "GPT",
    "parse_placements",
]

PLACEMENTS = ("embeddings", "qk", "v", "residual", "mlp")  # "all"
RESIDUAL_PARTS = ("residual_inner", "residual_final")  # "residual" is both
# Architecture options: the first of each is the default model's.
NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu")
POSITIONS = ("rope", "learned")
# nanoGPT's architecture (its model.py: LayerNorm with eps 1e-5, exact GELU, learned positions, bias=True as its
# GPTConfig's default), as GPTConfig fields: GPTConfig(**NANOGPT, dim=384, n_layers=6, n_heads=6, ...).
NANOGPT = {"norm": "layernorm", "mlp": "gelu", "positions": "learned", "bias": True, "norm_eps": 1e-5}


def parse_placements(center) -> tuple[str, ...]:
    """Normalise a placement spec to a sorted tuple of unique names.

    Accepts a tuple/list of names, or a string separated by commas or '+' ("qk,v", "qk+v"); "" and "none" mean
    no centering and "all" means every placement. "residual" is residual_inner + residual_final, and the two
    together are written "residual". Sorted so that equal sets compare equal and configs round-trip through JSON
    (where tuples become lists).
    """
    if center is None:
        return ()
    if isinstance(center, str):
        names = [n.strip() for n in re.split(r"[,+]", center)]
        names = [n for n in names if n and n.lower() != "none"]
    elif isinstance(center, Iterable):
        names = list(center)
    else:
        raise ValueError(f"center must be a string or a sequence of placements, got {center!r}")
    if any(not isinstance(n, str) for n in names):
        raise ValueError(f"center must hold placement names (strings), got {center!r}")
    if "all" in names:
        names = [n for n in names if n != "all"] + list(PLACEMENTS)
    unknown = sorted(set(names) - set(PLACEMENTS) - set(RESIDUAL_PARTS))
    if unknown:
        raise ValueError(
            f"center has unknown placement(s) {unknown}; expected a subset of {PLACEMENTS + RESIDUAL_PARTS}, all or none"
        )
    chosen = set(names)
    if "residual" in chosen or set(RESIDUAL_PARTS) <= chosen:
        chosen = (chosen - set(RESIDUAL_PARTS)) | {"residual"}
    return tuple(sorted(chosen))


@dataclass
class GPTConfig:
    """Model shape and options; the defaults give the default model (17,062,400 parameters)."""

    vocab_size: int = GPT2_VOCAB_SIZE
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 512
    mlp_hidden: Optional[int] = None  # None -> 4 * dim
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    center: tuple = ()  # placements, a subset of PLACEMENTS (a "qk,v" string or a list is accepted)
    centering_mode: str = "adaptive"  # one of fastcenter.nn.CENTERING_MODES
    fused: bool = False  # True: fastcenter.ops picks its implementation; False: the eager reference
    # Architecture options (see the module docstring; NANOGPT is nanoGPT's setting).
    norm: str = "rmsnorm"  # one of NORMS
    mlp: str = "swiglu"  # one of MLPS
    positions: str = "rope"  # one of POSITIONS
    bias: bool = False  # a bias in every linear and LayerNorm

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        for name, choices in (("norm", NORMS), ("mlp", MLPS), ("positions", POSITIONS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"bias must be a bool, got {self.bias!r}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"dim / n_heads = {self.head_dim} (the head size) must be even for RoPE")
        if self.mlp_hidden is not None and (
            not isinstance(self.mlp_hidden, int) or isinstance(self.mlp_hidden, bool) or self.mlp_hidden < 1
        ):
            raise ValueError(f"mlp_hidden must be None or a positive int, got {self.mlp_hidden!r}")
        if not _is_number(self.rope_base) or not 1 < self.rope_base < math.inf:
            raise ValueError(f"rope_base must be a finite number > 1, got {self.rope_base!r}")
        if not _is_number(self.norm_eps) or not 0 <= self.norm_eps < math.inf:
            raise ValueError(f"norm_eps must be a finite number >= 0, got {self.norm_eps!r}")
        self.rope_base, self.norm_eps = float(self.rope_base), float(self.norm_eps)
        self.center = parse_placements(self.center)
        if self.centering_mode not in CENTERING_MODES:
            raise ValueError(f"centering_mode must be one of {CENTERING_MODES}, got {self.centering_mode!r}")
        if not isinstance(self.fused, bool):
            raise ValueError(f"fused must be a bool, got {self.fused!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """Width of the MLP's hidden activation."""
        return 4 * self.dim if self.mlp_hidden is None else self.mlp_hidden

    def to_dict(self) -> dict:
        """A JSON-ready dict of the fields (center as a list)."""
        d = dataclasses.asdict(self)
        d["center"] = list(self.center)
        return d

    @classmethod
    def from_dict(cls, d: dict, strict: bool = True) -> "GPTConfig":
        """Inverse of `to_dict`. With strict=False, keys that are not fields (training options) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown and strict:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}")
        return cls(**{k: v for k, v in d.items() if k in names})


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _centering(config: GPTConfig, placement: str, dim: int) -> Optional[VectorCentering]:
    """A VectorCentering module if `placement` is enabled (a part of the residual stream: or all of it), else None."""
    enabled = placement in config.center or (placement in RESIDUAL_PARTS and "residual" in config.center)
    return VectorCentering(dim, config.centering_mode) if enabled else None


class LayerNorm(nn.Module):
    """LayerNorm over the last dim (gain, optional bias), eager PyTorch, with RMSNorm's fused-residual interface.

    `add_and_norm(x, residual=r, center=c)` forms the stream `hidden = x + r - c` and returns
    `(layer_norm(hidden), hidden)`, in float32 and then in x's dtype as `fastcenter.ops.center_rms_norm` does,
    so that the model's residual stream is written the same way whichever norm it has.
    """

    def __init__(self, dim: int, eps: float, bias: bool):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)

    def add_and_norm(self, x: Tensor, *, residual: Tensor | None = None, center: Tensor | None = None):
        hidden = x.float()
        if residual is not None:
            hidden = hidden + residual.float()
        if center is not None:
            hidden = hidden - center.float()
        normed = F.layer_norm(hidden, (self.dim,), self.weight, self.bias, self.eps)
        return normed.to(x.dtype), hidden.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, bias={self.bias is not None}"


def _norm(config: GPTConfig) -> nn.Module:
    if config.norm == "layernorm":
        return LayerNorm(config.dim, config.norm_eps, config.bias)
    # Every norm feeds a linear: under autocast it writes the linear's dtype itself (no cast kernel after it).
    return RMSNorm(config.dim, config.norm_eps, autocast_output=True)


class Attention(nn.Module):
    """Causal multi-head self-attention: one packed qkv projection, optional q/k/v centering, RoPE, SDPA."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=config.bias)
        self.proj = nn.Linear(config.dim, config.dim, bias=config.bias)
        self.q_center = _centering(config, "qk", config.dim)
        self.k_center = _centering(config, "qk", config.dim)
        self.v_center = _centering(config, "v", config.dim)

    def forward(self, x: Tensor, cos: Optional[Tensor], sin: Optional[Tensor]) -> Tensor:
        """cos, sin: the RoPE tables, or None for a model with learned positions (no rotation)."""
        B, T, D = x.shape
        # Views into the one packed projection: no copies unless a centering makes one.
        q, k, v = self.qkv(x).split(D, dim=-1)
        if self.q_center is not None:  # before RoPE (see the module docstring)
            q, k = self.q_center(q), self.k_center(k)
        if self.v_center is not None:
            v = self.v_center(v)
        heads = (B, T, self.n_heads, self.head_dim)
        if cos is None:
            q, k = q.view(heads), k.view(heads)
        else:
            q, k = ops.rope(q.view(heads), k.view(heads), cos, sin)
        # SDPA wants [B, H, T, Dh]; transposes are free views.
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.view(heads).transpose(1, 2), is_causal=True
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    """SwiGLU: one fused gate|up projection, silu(gate) * up, optional centering, down projection."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gate_up = nn.Linear(config.dim, 2 * config.hidden_dim, bias=config.bias)
        self.down = nn.Linear(config.hidden_dim, config.dim, bias=config.bias)
        self.hidden_center = _centering(config, "mlp", config.hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        a = ops.swiglu(self.gate_up(x))  # the packed [..., 2H] output, split inside the op
        if self.hidden_center is not None:
            a = self.hidden_center(a)
        return self.down(a)


class GeluMLP(nn.Module):
    """nanoGPT's MLP: up projection, exact GELU, optional centering, down projection (eager PyTorch)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.up = nn.Linear(config.dim, config.hidden_dim, bias=config.bias)
        self.down = nn.Linear(config.hidden_dim, config.dim, bias=config.bias)
        self.hidden_center = _centering(config, "mlp", config.hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        a = F.gelu(self.up(x))
        if self.hidden_center is not None:
            a = self.hidden_center(a)
        return self.down(a)


class Block(nn.Module):
    """Pre-norm transformer block, written for fused residual adds (see the module docstring)."""

    def __init__(self, config: GPTConfig, last: bool):
        super().__init__()
        self.attn_norm = _norm(config)
        self.attn = Attention(config)
        self.mlp_norm = _norm(config)
        self.mlp = MLP(config) if config.mlp == "swiglu" else GeluMLP(config)
        self.residual_center = _centering(config, "residual_final" if last else "residual_inner", config.dim)

    def forward(
        self, h: Tensor, delta: Optional[Tensor], center: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor]
    ):
        """Input stream h + delta - center; returns (h, delta, center) whose sum is the output stream."""
        x, h = self.attn_norm.add_and_norm(h, residual=delta, center=center)
        x, h = self.mlp_norm.add_and_norm(h, residual=self.attn(x, cos, sin))
        delta = self.mlp(x)
        # Centre the stream h + delta; the next norm performs the subtraction. Statistics are those of the sum.
        center = None if self.residual_center is None else self.residual_center.center_for(h, residual=delta)
        return h, delta, center


class GPT(nn.Module):
    """The GPT; `forward(idx, targets)` -> mean loss, `forward(idx)` -> logits [B, T, vocab_size]."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)  # also the output head (tied)
        # Learned absolute positions (nanoGPT's wpe), or None: RoPE.
        self.pos_emb = nn.Embedding(config.max_seq_len, config.dim) if config.positions == "learned" else None
        self.emb_center = _centering(config, "embeddings", config.dim)
        self.blocks = nn.ModuleList(Block(config, last=i == config.n_layers - 1) for i in range(config.n_layers))
        self.norm = _norm(config)
        if config.positions == "rope":
            # RoPE tables for every position: not parameters, not saved (recomputed from the config).
            cos, sin = ops.rope_cache(config.max_seq_len, config.head_dim, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def _ops_scope(self) -> ops.using:
        """The model's one switch: with fused=False every op inside runs the eager reference."""
        return ops.using(None if self.config.fused else "reference")

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) for every matrix (the position embedding too); norm gains 1; biases and centres 0.

        The output projections of attention and MLP are scaled by 1/sqrt(2 * n_layers): each of the 2 * n_layers
        residual branches adds its output to the stream, so with unscaled init the stream's variance at init
        would grow linearly with depth; scaled, it stays about that of the embeddings whatever the depth.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (RMSNorm, LayerNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, VectorCentering) and module.center is not None:
                nn.init.zeros_(module.center)
        branch_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=branch_std)
            nn.init.normal_(block.mlp.down.weight, mean=0.0, std=branch_std)

    # ----------------------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------------------

    def _check_tokens(self, name: str, t, max_len: Optional[int]) -> None:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(t).__name__}")
        if t.dtype != torch.long:
            raise TypeError(f"{name} must hold int64 token ids, got {t.dtype}")
        if t.dim() != 2 or t.shape[1] < 1:
            raise ValueError(f"{name} must have shape [batch, seq_len] with seq_len >= 1, got {tuple(t.shape)}")
        if max_len is not None and t.shape[1] > max_len:
            raise ValueError(f"{name} has seq_len {t.shape[1]} > max_seq_len {max_len}")
        if t.device != self.tok_emb.weight.device:
            raise ValueError(f"{name} is on {t.device} but the model is on {self.tok_emb.weight.device}")

    def hidden_states(self, idx: Tensor) -> Tensor:
        """The final-normed hidden states [B, T, dim], i.e. what the tied head turns into logits."""
        T = idx.shape[1]
        x = self.tok_emb(idx)
        if self.pos_emb is None:
            cos, sin = self.rope_cos[:T].float(), self.rope_sin[:T].float()
        else:  # learned absolute positions, added to the token embeddings: no rotation in attention
            cos = sin = None
            x = x + self.pos_emb.weight[:T]
        center = None if self.emb_center is None else self.emb_center.center_for(x)
        h, delta = x, None  # the stream is h + delta - center, materialised lazily by the next norm
        with self._ops_scope():
            for block in self.blocks:
                h, delta, center = block(h, delta, center, cos, sin)
            normed, _ = self.norm.add_and_norm(h, residual=delta, center=center)
        return normed

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None) -> Tensor:
        """Mean cross-entropy loss (float32 scalar) if `targets` [B, T] is given, else logits [B, T, vocab]."""
        self._check_tokens("idx", idx, self.config.max_seq_len)
        if targets is not None:
            self._check_tokens("targets", targets, None)
            if targets.shape != idx.shape:
                raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
        x = self.hidden_states(idx)
        if targets is None:
            return F.linear(x, self.tok_emb.weight)
        # Every implementation follows autocast like F.linear: the GEMMs run in bf16/fp16. The fused one takes the
        # float32 tied weight as it is and returns its gradient from a float32 accumulator (no bf16 round trip).
        with self._ops_scope():
            return ops.linear_cross_entropy(x, self.tok_emb.weight, targets)

    # ----------------------------------------------------------------------------------------------------------
    # Sampling
    # ----------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Append `max_new_tokens` sampled tokens to idx [B, T]; returns [B, T + max_new_tokens].

        No KV cache: each step reruns the (cropped to max_seq_len) context, which is simple and fast enough for a
        model this size. temperature 0 means greedy; top_k keeps the k most likely tokens. Runs in eval mode
        (centering uses its running statistics) and restores the previous mode afterwards.
        """
        self._check_tokens("idx", idx, None)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
            raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                context = idx[:, -self.config.max_seq_len :]
                logits = F.linear(self.hidden_states(context)[:, -1], self.tok_emb.weight).float()
                if temperature == 0:
                    next_id = logits.argmax(dim=-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None and top_k < logits.shape[-1]:
                        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    next_id = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
                idx = torch.cat((idx, next_id), dim=1)
        finally:
            self.train(was_training)
        return idx

    # ----------------------------------------------------------------------------------------------------------
    # Bookkeeping for the training script
    # ----------------------------------------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (the tied embedding once); non_embedding=True leaves the embedding matrices out (the
        token embedding, and the position embedding where there is one)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(e.weight.numel() for e in (self.tok_emb, self.pos_emb) if e is not None)
        return n

    def flops_per_token(self, seq_len: Optional[int] = None) -> int:
        """Training FLOPs (forward + backward) per token, for MFU.

            6 * N_matmul + 12 * n_layers * dim * seq_len

        N_matmul counts the weights of every matrix multiply: the linears of all blocks plus the embedding matrix
        once, as the output head (the embedding lookup itself is free; norm gains and centres are negligible).
        Each weight costs 2 FLOPs per token forward and 4 backward. The attention term is QK^T and AV: 2 matmuls
        x 2 FLOPs x seq_len x dim per token per layer forward, times 3 for forward + backward. It counts the full
        T x T score matrix (the PaLM / nanoGPT convention) although causal kernels skip about half of it.
        """
        T = self.config.max_seq_len if seq_len is None else seq_len
        n_matmul = self.tok_emb.weight.numel() + sum(
            m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear)
        )
        return 6 * n_matmul + 12 * self.config.n_layers * self.config.dim * T

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: weight decay on 2-D matrices only (linears and the tied embedding, once);
        none on norm gains, biases and learnable centres (decaying a centre would pull it to 0 for no reason)."""
        decay, no_decay = [], []
        for p in self.parameters():  # parameters() yields the tied embedding once
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizer(
        self, lr: float, betas=(0.9, 0.95), weight_decay: float = 0.1, device_type: str = "cpu"
    ) -> torch.optim.AdamW:
        """AdamW over `optim_groups`, using the fused CUDA implementation on GPUs."""
        return torch.optim.AdamW(
            self.optim_groups(weight_decay), lr=lr, betas=tuple(betas), fused=(device_type == "cuda")
        )
