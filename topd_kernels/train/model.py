"""A small decoder-only transformer in plain PyTorch (pre-norm, learned positions, causal attention)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of a `DecoderLM`."""

    vocab_size: int
    max_len: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP, each with a residual connection."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.norm_attn = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.attn_out = nn.Linear(d_model, d_model)
        self.norm_mlp = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D).

        With `cache` (a list, empty or [keys, values] of (B, H, T_past, D/H)), x continues the cached
        positions and the cache is extended in place. Cached decoding feeds one position at a time.
        """
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm_attn(x)).split(d, dim=-1)
        q, k, v = (y.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for y in (q, k, v))
        has_past = bool(cache)
        if cache is not None:
            if has_past:
                if t != 1:
                    raise ValueError("cached decoding continues one position at a time")
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=not has_past)
        x = x + self.attn_out(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm_mlp(x))


class DecoderLM(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size); position t predicts token t + 1.

    For incremental decoding pass `cache=model.new_cache()` with the prefix, then one token at a time
    with the same cache.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.max_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config.d_model, config.n_heads) for _ in range(config.n_layers))
        self.norm_out = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size)

    def new_cache(self) -> list[list]:
        """An empty key/value cache, one slot per block."""
        return [[] for _ in self.blocks]

    def forward(self, tokens: torch.Tensor, cache: list[list] | None = None) -> torch.Tensor:
        past = cache[0][0].shape[2] if cache and cache[0] else 0
        t = past + tokens.shape[1]
        if t > self.config.max_len:
            raise ValueError(f"sequence of {t} tokens is longer than max_len={self.config.max_len}")
        positions = torch.arange(past, t, device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache[i])
        return self.head(self.norm_out(x))


def build_model(config: ModelConfig, seed: int) -> DecoderLM:
    """A freshly initialised model whose weights depend only on `config` and `seed`."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = DecoderLM(config)
    torch.random.set_rng_state(generator_state)
    return model
