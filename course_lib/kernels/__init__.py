"""Chapter 09: the course's loops written as Triton kernels.

Three kernels, each in a short file that mirrors a PyTorch loop of the library:

- ``flash_forward`` and ``flash_backward``: FlashAttention-2 (``course_lib.tiling.flash``'s FA2
  loop), forward and the dK/dV and dQ backward kernels, wrapped by :func:`flash_attention`;
- ``decode``: one decode step reading K/V through a paged block table, split over the keys
  as in FlashDecoding (``course_lib.kv_cache.paged`` and ``course_lib.tiling.decoding``);
- ``gla``: chunked gated linear attention (``course_lib.recurrent.chunk_gated_scan``).

**Triton's interpreter.** Without an NVIDIA GPU, Triton has no driver to compile for. Its
interpreter (``TRITON_INTERPRET=1``) runs the same kernels with NumPy on CPU tensors, one program
after another: slow, but every ``tl.load``, mask and ``tl.dot`` means what it means on a GPU.
Triton reads the variable when a kernel is *defined* (at ``@triton.jit``), not when it runs, so it
must be set before Triton itself is imported (its own library functions, ``tl.max``,
``tl.sum``..., are kernels too). This package does that for you: when CUDA is absent it sets
``TRITON_INTERPRET=1`` (unless you set the variable yourself) before importing Triton, and if
something imported Triton earlier without it (PyTorch's FlexAttention does), it imports Triton's
Python modules afresh. A kernel you write in a notebook after ``import course_lib.kernels`` is
interpreted too.

Triton is an optional extra (``pip install -e ".[kernels]"``); the rest of the course never
imports this package.
"""

# ruff: noqa: E402  (the interpreter is switched on before Triton and the kernels are imported)
from __future__ import annotations

import os
import sys

import torch


def _switch_on_the_interpreter() -> None:
    """Without CUDA, make ``@triton.jit`` build interpreted kernels (see the module docstring)."""
    if torch.cuda.is_available():
        return
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"].lower() not in ("1", "true", "on", "yes"):
        return  # the reader asked for compiled kernels: CPU tensors will be refused with a clear error
    triton = sys.modules.get("triton")
    standard = getattr(getattr(triton, "language", None), "standard", None)
    if standard is None or type(standard.max).__name__ == "InterpretedFunction":
        return
    # Triton was imported with the interpreter off: its tl.max, tl.sum, ... are compiled-mode
    # functions the interpreter cannot call. Import its Python modules again (the C extension stays).
    for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        if not name.startswith("triton._C"):
            del sys.modules[name]


_switch_on_the_interpreter()

try:
    import triton  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "course_lib.kernels needs Triton: install the course's kernels extra, "
        "pip install -c constraints.txt -e '.[kernels]'"
    ) from error

from ..kv_cache import PagedKVCache as _PagedKVCache
from ..recurrent import chunk_gated_scan as _chunk_gated_scan
from ..tiling import combine_partials as _combine_partials
from ..tiling import flash_backward as _flash_backward
from ..tiling import flash_forward_fa2 as _flash_forward_fa2
from .common import BLOCK_SIZES, INTERPRET, MAX_HEAD_DIM, kernel_device
from .decode import combine_splits_kernel, page_offsets, paged_decode, paged_decode_kernel, paged_tables
from .flash_backward import fa2_backward_dkdv_kernel, fa2_backward_dq_kernel, flash_attention
from .flash_forward import attend_block, causal_key_end, fa2_forward, fa2_forward_kernel
from .gla import gla_chunk, gla_chunk_kernel

# Each kernel next to the PyTorch code it mirrors (notebook 09 shows them side by side).
TWINS = {
    "fa2 forward": (_flash_forward_fa2, fa2_forward_kernel),
    "fa2 backward, dK and dV": (_flash_backward, fa2_backward_dkdv_kernel),
    "paged decode": (_PagedKVCache.attention, paged_decode_kernel),
    "split combine": (_combine_partials, combine_splits_kernel),
    "chunked gla": (_chunk_gated_scan, gla_chunk_kernel),
}

__all__ = [
    "TWINS",
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
