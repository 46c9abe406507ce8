"""Chapter 01's quadratic wall in bytes: the score matrices standard attention materialises,
and the memory of real accelerators to hold them (the memory calculator and its figure)."""

from __future__ import annotations

from ..checks import check_choice, check_int
from ..hardware import ACCELERATORS

__all__ = ["ACCELERATOR_MEMORY_GIB", "DTYPE_BYTES", "score_memory"]

# The hardware chapter's accelerator table (with sources), by memory size for "does it fit".
ACCELERATOR_MEMORY_GIB = {
    f"{name} ({accelerator.memory_bytes / 1e9:.0f} GB)": accelerator.memory_bytes / 2**30
    for name, accelerator in ACCELERATORS.items()
}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1}


def score_memory(seq_len: int, heads: int, layers: int, batch: int, dtype: str = "float16") -> dict[str, int]:
    """Bytes of the ``(T, T)`` score/weight matrices that standard attention materialises.

    ``one_matrix``: one head, one sequence. ``one_layer``: all heads of one layer for the whole
    batch, what inference holds at a time. ``all_layers``: what training keeps for the backward
    pass when every layer's weights are stored.
    """
    seq_len = check_int(seq_len, "seq_len", min=1)
    heads = check_int(heads, "heads", min=1)
    layers = check_int(layers, "layers", min=1)
    batch = check_int(batch, "batch", min=1)
    check_choice(dtype, "dtype", DTYPE_BYTES)
    one_matrix = seq_len * seq_len * DTYPE_BYTES[dtype]
    return {
        "one_matrix": one_matrix,
        "one_layer": one_matrix * heads * batch,
        "all_layers": one_matrix * heads * batch * layers,
    }
