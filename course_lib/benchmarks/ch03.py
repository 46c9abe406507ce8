"""Chapter 03's benchmark: naive attention vs the course's FlashAttention vs PyTorch's SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..measure import random_qkv
from ..standard import attention
from ..tiling import flash_attention

__all__ = ["SUITES", "flash_suite", "FLASH_BLOCK"]

# Tiles of 64 x 64 are what a GPU kernel uses; in PyTorch every tile costs Python overhead, so the
# benchmark uses larger ones. The memory behaviour (no T x T tensor) is the same.
FLASH_BLOCK = 256
BATCH, HEADS, HEAD_DIM = 1, 8, 64


def flash_suite(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Causal forward: naive attention vs the course's FlashAttention vs SDPA; T = 512 .. 8192.

    One sequence, 8 heads, D = 64. Reference: SDPA.
    ``naive`` materialises the T x T scores (course_lib.attention); ``flash`` is the course's
    tiled FA2 loop in PyTorch, blocks of :data:`FLASH_BLOCK`; ``sdpa`` is PyTorch's fused kernel.
    """

    def naive(T: int):
        q, k, v = random_qkv(T, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, device=device, dtype=dtype)
        return lambda: attention(q, k, v, causal=True)

    def flash(T: int):
        q, k, v = random_qkv(T, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, device=device, dtype=dtype)
        return lambda: flash_attention(q, k, v, causal=True, block_q=FLASH_BLOCK, block_k=FLASH_BLOCK)

    def sdpa(T: int):
        q, k, v = random_qkv(T, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, device=device, dtype=dtype)
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return {"naive": naive, "flash": flash, "sdpa": sdpa}, "sdpa", [512, 1024, 2048, 4096, 8192]


flash_suite.shape = {"B": BATCH, "H": HEADS, "D": HEAD_DIM, "block": FLASH_BLOCK}
SUITES = {"flash": flash_suite}
