"""Learned sparsity: a gate that picks keys, and a window whose size is predicted per query.

Both are small self-attention layers whose sparsity is trained with the rest of the model.
The source sketches of these two ideas carry two bugs worth showing, and fixed here:
- gating whole *query rows* with ``-inf`` leaves rows with nothing to attend to, and softmax of
  an all ``-inf`` row is NaN. Here the gate picks *keys*, and an empty row returns zeros.
- casting the predicted window size to ``int`` has no gradient, so the predictor never learns.
  Here the window edge is soft: key weights are scaled by ``sigmoid((window - distance - 1/2) / t)``,
  which is differentiable in the window and tends to a hard window as the temperature ``t -> 0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_bool, check_float, check_int, check_tensor
from ..standard import attention

__all__ = ["LearnedSparseAttention", "AdaptiveWindowAttention"]


class _SelfAttentionProjections(nn.Module):
    """Q, K, V and output projections of a multi-head self-attention layer."""

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.embed_dim = check_int(embed_dim, "embed_dim", min=1)
        self.num_heads = check_int(num_heads, "num_heads", min=1)
        if embed_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide embed_dim={embed_dim}")
        self.head_dim = embed_dim // num_heads
        self.W_q = nn.Linear(embed_dim, embed_dim)
        self.W_k = nn.Linear(embed_dim, embed_dim)
        self.W_v = nn.Linear(embed_dim, embed_dim)
        self.W_o = nn.Linear(embed_dim, embed_dim)

    def check_input(self, x: object) -> torch.Tensor:
        check_tensor(x, "x", ndim=3, floating=True)
        assert isinstance(x, torch.Tensor)
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must have last dim embed_dim={self.embed_dim}, got shape {tuple(x.shape)}")
        return x

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

        return split(self.W_q(x)), split(self.W_k(x)), split(self.W_v(x))

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        B, H, T, D = out.shape
        return self.W_o(out.transpose(1, 2).reshape(B, T, H * D))


class LearnedSparseAttention(_SelfAttentionProjections):
    """Self-attention over the keys a learned gate keeps: ``keep_ratio * T`` keys per head.

    A linear gate scores every token per head. The top-scoring keys are kept (their keys and
    values are gathered, so the others cost nothing); the hard choice has no gradient, so each
    kept key's weight is also multiplied by ``sigmoid(gate)`` (a ``log sigmoid`` bias on its
    score), which is how the gate learns. A query whose visible keys were all dropped (e.g. the
    first query under ``causal``) gets zeros before the output projection, never NaN.
    """

    def __init__(
        self, embed_dim: int, num_heads: int, *, keep_ratio: float = 0.25, causal: bool = False
    ) -> None:
        super().__init__(embed_dim, num_heads)
        self.keep_ratio = check_float(keep_ratio, "keep_ratio", min=0.0, max=1.0)
        self.causal = check_bool(causal, "causal")
        self.gate = nn.Linear(embed_dim, num_heads)

    def forward(
        self, x: torch.Tensor, *, return_keep: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``(B, T, embed_dim)`` -> ``(B, T, embed_dim)`` (and the kept indices ``(B, H, n)``)."""
        x = self.check_input(x)
        check_bool(return_keep, "return_keep")
        B, T, _ = x.shape
        q, k, v = self.heads(x)
        gate_logits = self.gate(x).transpose(1, 2)  # (B, H, T): one score per key and head
        num_kept = round(self.keep_ratio * T)
        if num_kept == 0:
            out = q.new_zeros(B, self.num_heads, T, self.head_dim)
            kept = torch.zeros(B, self.num_heads, 0, dtype=torch.long, device=x.device)
            return (self.merge(out), kept) if return_keep else self.merge(out)

        kept = gate_logits.topk(num_kept, dim=-1).indices.sort(dim=-1).values  # (B, H, n)
        kept_keys = k.gather(2, kept.unsqueeze(-1).expand(-1, -1, -1, self.head_dim))
        kept_values = v.gather(2, kept.unsqueeze(-1).expand(-1, -1, -1, self.head_dim))
        gate_bias = F.logsigmoid(gate_logits.gather(-1, kept)).unsqueeze(-2)  # (B, H, 1, n)
        mask = None
        if self.causal:
            mask = kept.unsqueeze(-2) <= torch.arange(T, device=x.device).view(1, 1, T, 1)
        out = attention(q, kept_keys, kept_values, mask, bias=gate_bias)
        return (self.merge(out), kept) if return_keep else self.merge(out)


class AdaptiveWindowAttention(_SelfAttentionProjections):
    """Sliding-window self-attention whose window size each query predicts, differentiably.

    A linear predictor gives each query and head a real window
    ``w = min_window + sigmoid(logit) * (max_window - min_window)``. The key at distance ``d``
    gets its weight multiplied by ``sigmoid((w - d - 1/2) / temperature)``: about 1 inside the
    window, about 0 outside, smooth in ``w`` so the predictor receives a gradient. Keys at
    distance ``>= max_window`` are masked outright. With ``causal=False`` the distance is ``|i - j|``.
    The scores are computed densely (``O(T^2)``); a banded kernel could skip beyond ``max_window``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        min_window: int = 1,
        max_window: int = 16,
        causal: bool = True,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(embed_dim, num_heads)
        self.min_window = check_int(min_window, "min_window", min=1)
        self.max_window = check_int(max_window, "max_window", min=min_window)
        self.causal = check_bool(causal, "causal")
        self.temperature = check_float(temperature, "temperature", min=0.0, min_open=True)
        self.window_predictor = nn.Linear(embed_dim, num_heads)

    def forward(
        self, x: torch.Tensor, *, return_window: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``(B, T, embed_dim)`` -> ``(B, T, embed_dim)`` (and the windows ``(B, H, T)``)."""
        x = self.check_input(x)
        check_bool(return_window, "return_window")
        T = x.shape[1]
        q, k, v = self.heads(x)
        fraction = torch.sigmoid(self.window_predictor(x).transpose(1, 2))  # (B, H, T)
        window = self.min_window + fraction * (self.max_window - self.min_window)

        positions = torch.arange(T, device=x.device)
        distance = positions.unsqueeze(1) - positions.unsqueeze(0)
        if not self.causal:
            distance = distance.abs()
        reachable = (distance >= 0) & (distance < self.max_window)
        soft_edge = (window.unsqueeze(-1) - distance.to(window.dtype) - 0.5) / self.temperature
        out = attention(q, k, v, reachable, bias=F.logsigmoid(soft_edge))
        return (self.merge(out), window) if return_window else self.merge(out)
