"""Differential attention (Ye et al., 2024, "Differential Transformer").

Two softmax maps are computed from two halves of the queries and keys, and the second is
subtracted from the first with a learnable weight lambda:

    DiffAttn = (softmax(q1 k1^T * scale) - lambda * softmax(q2 k2^T * scale)) v

Attention that both maps give to irrelevant tokens ("noise") cancels, the way a differential
amplifier cancels common-mode noise. Because the product with ``v`` is linear, the difference
of maps times ``v`` equals the difference of two ordinary attention outputs, so two calls of any
attention kernel (FlashAttention included) compute it without a new kernel.

The layer follows the paper: lambda is re-parameterised as
``exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init`` with
``lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1))`` for layer ``l = 1 .. L``; every head is normalised
on its own (RMSNorm per head, the paper's GroupNorm) and scaled by ``1 - lambda_init``.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from ..checks import (
    check_attention_inputs,
    check_bool,
    check_float,
    check_int,
    check_like,
    check_shape,
    check_tensor,
    compute_dtype,
    resolve_scale,
)
from ..standard import attention

__all__ = ["differential_lambda_init", "differential_attention", "DifferentialAttention"]


def differential_lambda_init(layer_index: int) -> float:
    """The paper's depth-dependent start value ``0.8 - 0.6 exp(-0.3 (l - 1))`` for layer ``l >= 1``.

    It grows from 0.2 in the first layer towards 0.8 in deep layers.
    """
    layer_index = check_int(layer_index, "layer_index", min=1)
    return 0.8 - 0.6 * math.exp(-0.3 * (layer_index - 1))


def _check_lambda(lambda_: object, num_heads: int, like: torch.Tensor) -> torch.Tensor:
    """lambda as a ``(1, H or 1, 1, 1)`` tensor: a number, a 0-dim tensor or one value per head."""
    if isinstance(lambda_, numbers.Real) and not isinstance(lambda_, bool):
        value = check_float(lambda_, "lambda_")
        return torch.tensor(value, dtype=torch.float64, device=like.device).view(1, 1, 1, 1)
    check_tensor(lambda_, "lambda_", ndim=(0, 1), floating=True)
    assert isinstance(lambda_, torch.Tensor)
    if lambda_.dim() == 1 and lambda_.shape[0] not in (1, num_heads):
        raise ValueError(
            f"lambda_ must be a scalar or have shape ({num_heads},) = (H,), got {tuple(lambda_.shape)}"
        )
    check_like(lambda_, "lambda_", like, "q1", dtype=False)
    return lambda_.reshape(1, -1, 1, 1)


def differential_attention(
    q1: torch.Tensor,
    k1: torch.Tensor,
    q2: torch.Tensor,
    k2: torch.Tensor,
    v: torch.Tensor,
    lambda_: float | torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(q1 k1^T s) - lambda softmax(q2 k2^T s)) v``, computed as two attention calls.

    Args:
        q1, q2: ``(B, H, T, D)`` the two query halves.
        k1, k2: ``(B, H, S, D)`` the two key halves.
        v: ``(B, H, S, D_v)`` values, shared by both maps (``D_v = 2 D`` in the paper).
        lambda_: a number, a 0-dim tensor, or an ``(H,)`` tensor (one lambda per head);
            tensors keep their gradient.
        mask, causal: as in :func:`course_lib.standard.attention`, applied to both maps.
        scale: defaults to ``D ** -0.5`` (the paper's ``1 / sqrt(d)`` of one half).
        return_weights: also return the ``(B, H, T, S)`` differential map (may be negative).

    Returns:
        ``(B, H, T, D_v)`` in the input dtype (computed in float32 for half inputs). A fully
        masked query row gets zeros.
    """
    B, H, T, S, D, D_v = check_attention_inputs(q1, k1, v)
    for name, x, like, like_name in (("q2", q2, q1, "q1"), ("k2", k2, k1, "k1")):
        check_tensor(x, name, ndim=4, floating=True)
        check_like(x, name, like, like_name)
        check_shape(x, name, like.shape, names="B, H, T, D" if name == "q2" else "B, H, S, D")
    check_bool(causal, "causal")
    check_bool(return_weights, "return_weights")
    scale = resolve_scale(scale, D)

    dtype = compute_dtype(q1)
    lam = _check_lambda(lambda_, H, q1).to(dtype)
    q1, k1, q2, k2, values = (x.to(dtype) for x in (q1, k1, q2, k2, v))
    # (A1 - lambda A2) v = A1 v - lambda A2 v: two ordinary attention calls, no new kernel needed.
    out1, weights1 = attention(q1, k1, values, mask, causal=causal, scale=scale, return_weights=True)
    out2, weights2 = attention(q2, k2, values, mask, causal=causal, scale=scale, return_weights=True)
    out = (out1 - lam * out2).to(v.dtype)
    if return_weights:
        return out, (weights1 - lam * weights2).to(v.dtype)
    return out


class _HeadRMSNorm(nn.Module):
    """RMSNorm over the last dim of ``(B, H, T, D_v)``: each head normalised on its own."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = x.to(compute_dtype(x))
        normed = compute * torch.rsqrt(compute.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(normed.dtype)).to(x.dtype)


class DifferentialAttention(nn.Module):
    """A multi-head differential attention layer as in the Differential Transformer.

    With ``H = num_heads`` heads, each head has two query/key halves of ``D = embed_dim / (2 H)``
    and values of ``2 D``, so the parameter count matches a standard layer with ``2 H`` heads.

    Args:
        embed_dim: model width; must be a multiple of ``2 * num_heads``.
        num_heads: differential heads ``H``.
        layer_index: ``l`` (1-based) of this layer; sets ``lambda_init``.
        bias: biases in the projections (the paper has none).
        eps: RMSNorm epsilon.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        layer_index: int = 1,
        bias: bool = False,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        embed_dim = check_int(embed_dim, "embed_dim", min=2)
        num_heads = check_int(num_heads, "num_heads", min=1)
        if embed_dim % (2 * num_heads):
            raise ValueError(f"num_heads={num_heads} times 2 must divide embed_dim={embed_dim}")
        check_bool(bias, "bias")
        eps = check_float(eps, "eps", min=0.0, min_open=True)
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // (2 * num_heads)
        self.lambda_init = differential_lambda_init(layer_index)
        self.W_q = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.W_k = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.W_v = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.W_o = nn.Linear(embed_dim, embed_dim, bias=bias)
        # The four re-parameterisation vectors start small, so lambda starts near lambda_init.
        self.lambda_q1 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.lambda_k1 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.lambda_q2 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.lambda_k2 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.head_norm = _HeadRMSNorm(2 * self.head_dim, eps)

    def lambda_value(self) -> torch.Tensor:
        """``exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init``, a 0-dim tensor shared by all heads."""
        first = torch.exp(torch.dot(self.lambda_q1, self.lambda_k1))
        second = torch.exp(torch.dot(self.lambda_q2, self.lambda_k2))
        return first - second + self.lambda_init

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        return_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``(B, T, embed_dim)`` -> ``(B, T, embed_dim)`` (and the ``(B, H, T, T)`` maps)."""
        check_tensor(x, "x", ndim=3, floating=True)
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must have last dim embed_dim={self.embed_dim}, got shape {tuple(x.shape)}")
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        # Queries and keys: (B, T, H, 2, D) -> two halves of (B, H, T, D) per head.
        q = self.W_q(x).view(B, T, H, 2, D).permute(3, 0, 2, 1, 4)
        k = self.W_k(x).view(B, T, H, 2, D).permute(3, 0, 2, 1, 4)
        v = self.W_v(x).view(B, T, H, 2 * D).transpose(1, 2)
        result = differential_attention(
            q[0], k[0], q[1], k[1], v, self.lambda_value(), mask, causal=causal, return_weights=return_weights
        )
        out, weights = result if return_weights else (result, None)
        # Per-head normalisation, then the paper's (1 - lambda_init) so the scale matches at init.
        out = self.head_norm(out) * (1.0 - self.lambda_init)
        out = self.W_o(out.transpose(1, 2).reshape(B, T, self.embed_dim))
        return (out, weights) if return_weights else out
