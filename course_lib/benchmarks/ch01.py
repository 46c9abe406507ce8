"""Chapter 01's benchmark: the course's naive attention (materialises T x T) vs PyTorch's SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..measure import random_qkv
from ..standard import attention

__all__ = ["SUITES", "standard_suite"]

BATCH, HEADS, HEAD_DIM = 1, 8, 64


def standard_suite(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Causal forward: the course's naive attention (T x T scores) vs SDPA; T = 256 .. 4096.

    One sequence, 8 heads, D = 64. Reference: SDPA.
    """

    def naive(T: int):
        q, k, v = random_qkv(T, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, device=device, dtype=dtype)
        return lambda: attention(q, k, v, causal=True)

    def sdpa(T: int):
        q, k, v = random_qkv(T, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, device=device, dtype=dtype)
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return {"naive": naive, "sdpa": sdpa}, "sdpa", [256, 512, 1024, 2048, 4096]


standard_suite.shape = {"B": BATCH, "H": HEADS, "D": HEAD_DIM}
SUITES = {"standard": standard_suite}
