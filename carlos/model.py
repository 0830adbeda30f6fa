"""A tiny decoder-only GPT in plain PyTorch.

Reads top-down: config, rotary positions, attention, MLP, block, GPT, KV cache. Nothing here knows
about Lightning or files, so `carlos sample` can use it without importing Lightning.

Two families share the code: the baseline (GPT-2: learned positions, LayerNorm, GELU MLP, biases) and
`modern` (rotary positions, RMSNorm, SwiGLU MLP, no biases), chosen by GPTConfig's norm, mlp and pos.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from carlos.config import ModelConfig
from carlos.errors import short


class ModelConfigError(ValueError):
    """An impossible model shape; the message says which setting to change."""


def _check_type(name: str, value, kind) -> None:
    """A setting of its field's type: bool is no int here, an int is a fine float (YAML writes 0 for 0.0)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is bool or kind is str:
        ok = isinstance(value, kind)
    elif kind is int:
        ok = number and isinstance(value, int)
    else:  # float, or float | None
        ok = number or (value is None and kind is not float)
    if not ok:
        want = "a number or None" if kind == float | None else kind.__name__
        raise ModelConfigError(f"model.{name} is {short(value)} ({type(value).__name__}), not {want}")


@dataclass
class GPTConfig(ModelConfig):
    """The architecture (ModelConfig, the model group's settings) with what the prepared data fixes."""

    vocab_size: int  # 256 bytes, plus BOS and EOS when the data has them
    block_size: int  # context length: the prepared seq_len

    @classmethod
    def for_data(cls, model: ModelConfig, vocab_size: int, block_size: int) -> GPTConfig:
        return cls(**asdict(model), vocab_size=vocab_size, block_size=block_size)

    def __post_init__(self) -> None:
        for name, kind in typing.get_type_hints(GPTConfig).items():  # settings read from a checkpoint or export
            _check_type(name, getattr(self, name), kind)
        for name in ("vocab_size", "block_size", "d_model", "n_layers", "n_heads", "d_ff"):
            if getattr(self, name) <= 0:
                raise ModelConfigError(f"model.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads != 0:
            heads = [h for h in range(1, min(self.d_model, 1024) + 1) if self.d_model % h == 0]
            raise ModelConfigError(
                f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}; pick n_heads among {heads}"
            )
        # the rotary frequencies are powers of 1 / base: a base below 1 makes them grow to inf (NaN fails too)
        if not (isinstance(self.rope_base, (int, float)) and 1 < self.rope_base < math.inf):
            raise ModelConfigError(f"model.rope_base must be a number above 1 (10000 is usual), got {self.rope_base!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        cap = self.logit_softcap
        if cap is not None and not (isinstance(cap, (int, float)) and not isinstance(cap, bool) and 1 <= cap <= 1000):
            # below 1 every logit is squeezed towards 0; far above, float32 overflows on the way back
            raise ModelConfigError(
                f"model.logit_softcap must be a number from 1 to 1000 (e.g. 30) or null, got {cap!r}"
            )
        for name, choices in (
            ("norm", ("layernorm", "rmsnorm")),
            ("mlp", ("gelu", "swiglu", "relu2")),
            ("pos", ("learned", "rope")),
        ):
            if getattr(self, name) not in choices:
                raise ModelConfigError(f"model.{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.pos == "rope" and (self.d_model // self.n_heads) % 2:
            raise ModelConfigError(
                f"model.pos=rope needs an even head size, got d_model/n_heads = {self.d_model // self.n_heads}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def _dropout(p: float) -> nn.Module:
    # nn.Dropout(0.0) still costs a kernel forward and backward; tiny models train without dropout
    return nn.Dropout(p) if p > 0 else nn.Identity()


def _norm(cfg: GPTConfig) -> nn.Module:
    return nn.LayerNorm(cfg.d_model, bias=cfg.bias) if cfg.norm == "layernorm" else nn.RMSNorm(cfg.d_model)


def _shapes_only() -> bool:
    """Whether modules are being built on the meta device, for their names and shapes only: there the
    weights' init and the rotary tables are skipped, since normal_ and tensor arithmetic on that device
    import torch._dynamo (1.5 s of every carlos sample and eval that checks a checkpoint)."""
    return torch.empty(0).is_meta


def rope_tables(head_dim: int, length: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (length, head_dim // 2), of the rotation angles pos * base^(-2i / head_dim)."""
    if _shapes_only():
        return torch.empty(length, head_dim // 2), torch.empty(length, head_dim // 2)
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (length, head_dim // 2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head of x (B, H, T, head_dim) by the angles of its positions."""
    x1, x2 = x.chunk(2, dim=-1)  # 2 x (B, H, T, head_dim // 2)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.qkv.weight.stacked = 3  # Q, K and V stacked: MuonWithAdamW(split_qkv=True) orthogonalizes each
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.proj.residual_init = True  # scaled at init, GPT-2 style
        self.dropout = cfg.dropout
        self.qk_norm = cfg.qk_norm

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, rope=None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, n_heads, T, head_dim)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:  # no gain: the attention logits' scale is what the norm fixes
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        if rope is not None:  # keys are cached rotated: their positions are absolute
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is None:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        else:
            start = cache.length
            k, v = cache.update(layer, k, v)  # (B, n_heads, start + T, head_dim)
            if T == 1:
                # one new token attends to everything cached: no mask needed
                y = F.scaled_dot_product_attention(q, k, v)
            else:
                # a prefill of T tokens after `start` cached ones: token i sees keys 0..start+i
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, n_heads, T, head_dim) -> (B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    """GELU: proj(gelu(fc(x))). ReLU^2: proj(relu(fc(x))^2). SwiGLU: proj(silu(gate(x)) * up(x)), gate
    and up as one matmul."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.relu2 = cfg.mlp == "relu2"
        self.fc = nn.Linear(cfg.d_model, (2 if self.swiglu else 1) * cfg.d_ff, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.proj.residual_init = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.fc(x).chunk(2, dim=-1)  # 2 x (B, T, d_ff)
            return self.proj(F.silu(gate) * up)
        if self.relu2:
            return self.proj(F.relu(self.fc(x)).square())
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = _norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = _norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = _dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, rope=None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), cache, layer, rope))
        return x + self.drop(self.mlp(self.ln2(x)))


def _embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding, left uninitialized when only its shape is wanted (_shapes_only)."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim)) if _shapes_only() else nn.Embedding(num, dim)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = _embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = _embedding(cfg.block_size, cfg.d_model) if cfg.pos == "learned" else None
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg.d_model // cfg.n_heads, cfg.block_size, cfg.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = _dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = _norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied input and output embeddings
        if not _shapes_only():
            self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 * n_layers)
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_init", False):
                std = 0.0 if self.cfg.zero_init else std / math.sqrt(2 * self.cfg.n_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Parameter count; the tied embedding is counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids idx (B, T); with a cache, idx continues it."""
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.cfg.block_size}")
        x = self.tok_emb(idx)  # (B, T, d_model)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[start : start + T]
        else:
            rope = (self.rope_cos[start : start + T], self.rope_sin[start : start + T])
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i, rope)
        if cache is not None:
            cache.length += T
        logits = self.head(self.ln_f(x))  # (B, T, vocab)
        if self.cfg.logit_softcap is not None:
            logits = self.cfg.logit_softcap * torch.tanh(logits / self.cfg.logit_softcap)
        return logits

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy in nats; targets of -1 (overlap of the packed tail window) are not scored."""
        logits = self(idx)
        return F.cross_entropy(
            logits.view(-1, logits.size(-1)).float(), targets.reshape(-1).long(), ignore_index=-1, reduction=reduction
        )

    def param_groups(self, weight_decay: float, muon: bool = False) -> list[dict]:
        """AdamW groups: decay matrices and embeddings, never biases or norm gains (decays). With muon,
        the blocks' weight matrices come first, as a group of their own marked for Muon."""
        matrices = [p for p in self.blocks.parameters() if p.dim() == 2] if muon else []
        decay = [p for p in self.parameters() if decays(p) and all(p is not m for m in matrices)]
        no_decay = [p for p in self.parameters() if not decays(p)]
        return [
            *([{"params": matrices, "weight_decay": weight_decay, "muon": True}] if muon else []),
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]


def decays(p: torch.Tensor) -> bool:
    """Weight decay applies to matrices and embeddings (dim >= 2), never to biases or norm gains."""
    return p.dim() >= 2


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to the context."""

    def __init__(self, model: GPT, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        cfg = model.cfg
        shape = (cfg.n_layers, batch_size, cfg.n_heads, cfg.block_size, cfg.d_model // cfg.n_heads)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self) -> None:
        self.length = 0
