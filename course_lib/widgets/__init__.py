"""Interactive explorers for the notebooks, one module per chapter (``course_lib.widgets.ch01``, ...).

Each explorer is two functions: a plain ``*_view`` function that computes (and draws) what the
widget shows and returns it, so tests can call it directly, and a constructor that wires
``ipywidgets`` controls to it and returns the widget. Notebooks import from the chapter module.
"""

from .ch01 import (
    ACCELERATOR_MEMORY_GIB,
    DTYPE_BYTES,
    EXPLORER_MASKS,
    attention_explorer,
    attention_explorer_view,
    memory_calculator,
    memory_calculator_view,
    score_memory,
    toy_embeddings,
)

__all__ = [
    "ACCELERATOR_MEMORY_GIB",
    "DTYPE_BYTES",
    "EXPLORER_MASKS",
    "attention_explorer",
    "attention_explorer_view",
    "memory_calculator",
    "memory_calculator_view",
    "score_memory",
    "toy_embeddings",
]
