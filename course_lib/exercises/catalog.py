"""Every exercise of the course: importing every chapter's checkers registers them in
:data:`~course_lib.exercises.common.EXERCISES`.

Chapter 09's exercises run the reader's Triton code inside the library's kernels, so they exist only where
Triton is installed (the course's ``kernels`` extra).
"""

import importlib.util
from collections.abc import Iterator

from . import ch00, ch01, ch02, ch03, ch04, ch04b, ch05, ch06, ch07, ch08  # noqa: F401
from .common import EXERCISES, Exercise

if importlib.util.find_spec("triton") is not None:
    from . import ch09  # noqa: F401

# The notebook of each exercise module, by the prefix :attr:`Exercise.notebook` gives (chapter 04 has two).
NOTEBOOKS = {
    "00": "00_start_here.ipynb",
    "01": "01_standard_attention.ipynb",
    "02": "02_memory_hierarchy_and_roofline.ipynb",
    "03": "03_tiling_flash_attention.ipynb",
    "04": "04_kv_cache_compression.ipynb",
    "04b": "04b_serving.ipynb",
    "05": "05_sparse_attention.ipynb",
    "06": "06_linear_attention.ipynb",
    "07": "07_gated_linear_recurrences.ipynb",
    "08": "08_choosing_an_attention.ipynb",
    "09": "09_kernels_in_triton.ipynb",
}


def iter_exercises() -> Iterator[Exercise]:
    """Every registered exercise, chapter by chapter."""
    yield from sorted(EXERCISES.values(), key=lambda e: tuple(int(p) for p in e.id.split(".")))
