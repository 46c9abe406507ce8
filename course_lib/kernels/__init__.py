"""Chapter 09: the course's loops written as Triton kernels.

Three kernels, each in a short file that mirrors a PyTorch loop of the library:

- ``flash_forward`` and ``flash_backward``: FlashAttention-2 (``course_lib.tiling.flash``'s FA2
  loop), forward and the dK/dV and dQ backward kernels, wrapped by :func:`flash_attention`;
- ``paged_decode``: one decode step reading K/V through a paged block table, split over the keys
  as in FlashDecoding (``course_lib.kv_cache.paged`` and ``course_lib.tiling.decoding``);
- ``gla_chunk``: chunked gated linear attention (``course_lib.recurrent._common.chunk_gated_scan``).

**Triton's interpreter.** Without an NVIDIA GPU, Triton has no driver to compile for. Its
interpreter (``TRITON_INTERPRET=1``) runs the same kernels with NumPy on CPU tensors, one program
after another: slow, but every ``tl.load``, mask and ``tl.dot`` means what it means on a GPU.
Triton reads the variable when a kernel is *defined* (at ``@triton.jit``), not when it runs, so it
must be set before any kernel module is imported. This package does that for you: when CUDA is
absent it sets ``TRITON_INTERPRET=1`` (unless you set the variable yourself) before importing
Triton. A kernel you write in a notebook after ``import course_lib.kernels`` is interpreted too.

Triton is an optional extra (``pip install -e ".[kernels]"``); the rest of the course never
imports this package.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Before triton is imported: @triton.jit picks the interpreter from this variable.
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "course_lib.kernels needs Triton: install the course's kernels extra, "
        "pip install -c constraints.txt -e '.[kernels]'"
    ) from error

from .common import BLOCK_SIZES, INTERPRET, MAX_HEAD_DIM, kernel_device
from .flash_backward import fa2_backward_dkdv_kernel, fa2_backward_dq_kernel, flash_attention
from .flash_forward import attend_block, causal_key_end, fa2_forward, fa2_forward_kernel
from .gla_chunk import gla_chunk, gla_chunk_kernel
from .paged_decode import combine_splits_kernel, page_offsets, paged_decode, paged_decode_kernel, paged_tables

__all__ = [
    "INTERPRET",
    "BLOCK_SIZES",
    "MAX_HEAD_DIM",
    "kernel_device",
    "fa2_forward_kernel",
    "attend_block",
    "causal_key_end",
    "fa2_forward",
    "fa2_backward_dkdv_kernel",
    "fa2_backward_dq_kernel",
    "flash_attention",
    "paged_decode_kernel",
    "page_offsets",
    "combine_splits_kernel",
    "paged_decode",
    "paged_tables",
    "gla_chunk_kernel",
    "gla_chunk",
]
