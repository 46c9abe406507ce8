"""Checkers for notebook 01: scaled dot-product attention, a causal mask, head split/merge."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .common import compare, run_cases

__all__ = ["check_scaled_dot_product_attention", "check_causal_mask", "check_split_merge_heads"]


def check_scaled_dot_product_attention(fn: Callable[..., torch.Tensor]) -> None:
    """``fn(q, k, v)`` must equal softmax(q k^T / sqrt(D)) v, compared with PyTorch's SDPA."""
    generator = torch.Generator().manual_seed(1)

    def case(shape_q, shape_k, d_v):
        q = torch.randn(*shape_q, generator=generator, dtype=torch.float64)
        k = torch.randn(*shape_k, generator=generator, dtype=torch.float64)
        v = torch.randn(*shape_k[:-1], d_v, generator=generator, dtype=torch.float64)
        return lambda: compare(
            fn(q, k, v), F.scaled_dot_product_attention(q, k, v), f"q {shape_q}, k {shape_k}"
        )

    shapes = [
        ((1, 1, 4, 8), (1, 1, 4, 8), 8),
        ((2, 3, 5, 16), (2, 3, 7, 16), 4),
        ((1, 2, 1, 3), (1, 2, 9, 3), 5),
    ]
    run_cases("check_scaled_dot_product_attention", [(f"shapes {s}", case(*s)) for s in shapes])


def check_causal_mask(fn: Callable[[int], torch.Tensor]) -> None:
    """``fn(T)`` must return the (T, T) bool mask that is True where key j <= query i."""

    def case(T):
        expected = torch.tensor([[j <= i for j in range(T)] for i in range(T)])
        return lambda: compare(fn(T), expected, f"T={T}")

    run_cases("check_causal_mask", [(f"T={T}", case(T)) for T in (1, 2, 5, 8)])


def check_split_merge_heads(
    split_heads: Callable[[torch.Tensor, int], torch.Tensor],
    merge_heads: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """``split_heads(x, H)``: (B, T, H*D) -> (B, H, T, D) with head h taking columns h*D..(h+1)*D;
    ``merge_heads`` undoes it."""
    generator = torch.Generator().manual_seed(2)

    def case(B, T, H, D):
        x = torch.randn(B, T, H * D, generator=generator)
        expected = torch.stack([x[:, :, h * D : (h + 1) * D] for h in range(H)], dim=1)

        def check():
            split = split_heads(x, H)
            compare(split, expected, f"split_heads of (B={B}, T={T}, H*D={H * D}) with H={H}")
            compare(merge_heads(split), x, f"merge_heads(split_heads(x)) with H={H}")

        return check

    shapes = [(1, 3, 2, 4), (2, 5, 4, 3), (1, 1, 1, 6)]
    run_cases("check_split_merge_heads", [(f"shape {s}", case(*s)) for s in shapes])
