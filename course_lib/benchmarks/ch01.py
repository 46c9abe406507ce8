"""Chapter 01's benchmark: the course's naive attention (materialises T x T) vs PyTorch's SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..bench import random_qkv
from ..standard import attention

__all__ = ["SUITES", "standard_suite"]


def standard_suite(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """One sequence, 8 heads, D = 64, causal; T from 256 to 4096. Reference: SDPA."""

    def naive(T: int):
        q, k, v = random_qkv(T, device=device, dtype=dtype)
        return lambda: attention(q, k, v, causal=True)

    def sdpa(T: int):
        q, k, v = random_qkv(T, device=device, dtype=dtype)
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return {"naive": naive, "sdpa": sdpa}, "sdpa", [256, 512, 1024, 2048, 4096]


SUITES = {"standard": standard_suite}
