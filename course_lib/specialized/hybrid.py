"""Hybrid stacks: cheap local (or linear) layers with a full-attention layer every few layers.

Sliding-window layers cost ``O(T w)`` and keep a KV cache of ``w`` tokens; linear-attention layers
keep a constant state. Neither can fetch an exact token from far back in one step. A few full
attention layers in between restore exact long-range retrieval while most layers stay cheap —
the pattern of Gemma 2/3 (local and global layers alternating), Jamba and Zamba (recurrent layers
with occasional attention). :meth:`HybridAttentionStack.cost_report` prints the bill per layer.

Every layer is a pre-norm residual block ``x + W_o(mixer(norm(x)))``, causal (a decoder).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checks import check_choice, check_int, check_tensor
from ..linear import linear_attention
from ..sparse import sliding_window_attention
from ..standard import attention

__all__ = ["MIXERS", "hybrid_pattern", "LayerCost", "mixer_cost", "HybridLayer", "HybridAttentionStack"]

MIXERS = ("full", "window", "linear")


def hybrid_pattern(num_layers: int, *, global_every: int, local: str = "window") -> list[str]:
    """Layer kinds: ``local`` everywhere except every ``global_every``-th layer, which is ``"full"``.

    ``hybrid_pattern(6, global_every=3)`` is ``window, window, full, window, window, full``;
    ``global_every=1`` gives an all-full stack.
    """
    num_layers = check_int(num_layers, "num_layers", min=1)
    global_every = check_int(global_every, "global_every", min=1)
    check_choice(local, "local", MIXERS)
    return ["full" if (index + 1) % global_every == 0 else local for index in range(num_layers)]


@dataclass
class LayerCost:
    """Cost of one causal layer over ``seq_len`` tokens (one sequence).

    ``score_pairs``: query-key pairs computed; ``flops``: multiply-adds x 2 of the mixer (the
    projections, equal for every kind, are left out); ``cache_bytes``: what decoding must keep
    after ``seq_len`` tokens (K and V, or the recurrent state).
    """

    index: int
    kind: str
    score_pairs: int
    flops: int
    cache_bytes: int


def mixer_cost(
    kind: str,
    seq_len: int,
    *,
    num_heads: int,
    head_dim: int,
    window: int | None = None,
    dtype: torch.dtype = torch.float32,
    index: int = 0,
) -> LayerCost:
    """The :class:`LayerCost` of one mixer: full, sliding-window or linear attention."""
    check_choice(kind, "kind", MIXERS)
    T = check_int(seq_len, "seq_len", min=1)
    H, D = check_int(num_heads, "num_heads", min=1), check_int(head_dim, "head_dim", min=1)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    element = torch.empty((), dtype=dtype).element_size()
    if kind == "full":
        pairs = T * (T + 1) // 2
        # Two products per pair (q.k and the weighted sum of v), 2 FLOPs per multiply-add.
        return LayerCost(index, kind, pairs, 4 * H * D * pairs, 2 * H * T * D * element)
    if kind == "window":
        w = check_int(window, "window", min=1)
        reach = min(w, T)
        pairs = reach * (reach + 1) // 2 + (T - reach) * w  # the first queries see fewer keys
        return LayerCost(index, kind, pairs, 4 * H * D * pairs, 2 * H * reach * D * element)
    # Linear: per token, write k v^T into a D x D state and read it with q (plus the normaliser).
    return LayerCost(index, kind, 0, 4 * H * T * D * (D + 1), H * D * (D + 1) * element)


class HybridLayer(nn.Module):
    """One pre-norm residual block ``x + W_o(mixer(q, k, v))`` with ``kind`` in :data:`MIXERS`."""

    def __init__(self, embed_dim: int, num_heads: int, kind: str, *, window: int | None = None) -> None:
        super().__init__()
        embed_dim = check_int(embed_dim, "embed_dim", min=1)
        num_heads = check_int(num_heads, "num_heads", min=1)
        if embed_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide embed_dim={embed_dim}")
        self.kind = check_choice(kind, "kind", MIXERS)
        self.window = check_int(window, "window", min=1) if kind == "window" else None
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.norm = nn.LayerNorm(embed_dim)
        self.W_qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.W_o = nn.Linear(embed_dim, embed_dim)

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The layer's attention on ``(B, H, T, D)`` heads, causal."""
        if self.kind == "full":
            return attention(q, k, v, causal=True)
        if self.kind == "window":
            return sliding_window_attention(q, k, v, self.window, causal=True)
        return linear_attention(q, k, v, causal=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, T, embed_dim)`` -> same shape."""
        check_tensor(x, "x", ndim=3, floating=True)
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must have last dim embed_dim={self.embed_dim}, got shape {tuple(x.shape)}")
        B, T, C = x.shape
        q, k, v = self.W_qkv(self.norm(x)).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        heads = self.mix(q, k, v)
        return x + self.W_o(heads.transpose(1, 2).reshape(B, T, C))


class HybridAttentionStack(nn.Module):
    """A stack of :class:`HybridLayer` whose kinds follow ``pattern`` (see :func:`hybrid_pattern`).

    Args:
        embed_dim, num_heads: width and heads of every layer.
        pattern: list of kinds, one per layer, e.g. ``hybrid_pattern(6, global_every=3)``.
        window: the sliding window of the ``"window"`` layers.
    """

    def __init__(self, embed_dim: int, num_heads: int, pattern: list[str], *, window: int = 8) -> None:
        super().__init__()
        if isinstance(pattern, str) or not isinstance(pattern, (list, tuple)) or len(pattern) == 0:
            raise TypeError("pattern must be a non-empty list of layer kinds")
        for index, kind in enumerate(pattern):
            check_choice(kind, f"pattern[{index}]", MIXERS)
        self.pattern = list(pattern)
        self.window = check_int(window, "window", min=1)
        self.layers = nn.ModuleList(
            HybridLayer(embed_dim, num_heads, kind, window=window if kind == "window" else None)
            for kind in pattern
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, T, embed_dim)`` through every layer in order."""
        for layer in self.layers:
            x = layer(x)
        return x

    def cost_report(self, seq_len: int, *, dtype: torch.dtype = torch.float32) -> list[LayerCost]:
        """One :class:`LayerCost` per layer for a sequence of ``seq_len`` tokens."""
        first = self.layers[0]
        return [
            mixer_cost(
                layer.kind,
                seq_len,
                num_heads=first.num_heads,
                head_dim=first.head_dim,
                window=layer.window,
                dtype=dtype,
                index=index,
            )
            for index, layer in enumerate(self.layers)
        ]
