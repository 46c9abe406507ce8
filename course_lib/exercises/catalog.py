"""Imports every chapter's checkers, so that :data:`~course_lib.exercises.common.EXERCISES` lists them all.

Chapter 09's exercises run the reader's Triton code inside the library's kernels, so they exist only where
Triton is installed (the course's ``kernels`` extra).
"""

import importlib.util

from . import ch00, ch01, ch02, ch03, ch04, ch05, ch06, ch07, ch08  # noqa: F401

if importlib.util.find_spec("triton") is not None:
    from . import ch09  # noqa: F401

NOTEBOOKS = {
    0: "00_start_here.ipynb",
    1: "01_standard_attention.ipynb",
    2: "02_memory_hierarchy_and_roofline.ipynb",
    3: "03_tiling_flash_attention.ipynb",
    4: "04_kv_cache_compression.ipynb",
    5: "05_sparse_attention.ipynb",
    6: "06_linear_attention.ipynb",
    7: "07_gated_linear_recurrences.ipynb",
    8: "08_choosing_an_attention.ipynb",
    9: "09_kernels_in_triton.ipynb",
}
