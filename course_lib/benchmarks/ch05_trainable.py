"""Chapter 05's benchmark of the trainable sparse attentions: NSA and MoBA vs dense and the window.

    python -m course_lib.bench trainable_sparse                    # T = 1024 .. 8192
    python -m course_lib.bench trainable_sparse --lengths 2048 8192 --threads 1

One sequence, 2 query heads sharing 1 key/value head (GQA, so NSA's group shares its blocks),
D = 64, causal, float32, the papers' block sizes with fewer blocks selected, so that the
selection is sparse at a CPU's lengths (:data:`~course_lib.studies.sparse_kernels.NSA_OPTIONS`,
:data:`~course_lib.studies.sparse_kernels.MOBA_OPTIONS`). The kernels and inputs are those of
:func:`course_lib.studies.sparse_kernels.routing_methods`. After the table, the report says how
many (query, key block) pairs and scores each skipping kernel computed against a dense causal
kernel, and its peak memory against the same selection given to dense attention as a mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..measure import Measurement, format_bytes
from ..studies.sparse_kernels import (
    HEAD_DIM,
    HEADS,
    MOBA_OPTIONS,
    NSA_OPTIONS,
    ROUTING_REFERENCE,
    routing_methods,
)

__all__ = ["SUITES", "trainable_sparse_suite", "trainable_sparse_report"]


def trainable_sparse_suite(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """NSA and MoBA (gathering their blocks, and as dense masks) vs dense causal attention and the window.

    One sequence, 2 query heads, 1 key/value head, D = 64; T = 1024 .. 8192. Reference: causal SDPA.
    """
    return routing_methods(device, dtype), ROUTING_REFERENCE, [1024, 2048, 4096, 8192]


def trainable_sparse_report(results: Sequence[Measurement]) -> str:
    """Work and memory of each skipping kernel at each T, against dense and against its own mask."""
    by_key = {(r.method, r.T): r for r in results}
    lines = ["work counted by the kernels, and peak memory against the same selection as a dense mask:"]
    for kernel in ("nsa", "moba"):
        for T in sorted({r.T for r in results if r.method == kernel}):
            r = by_key[(kernel, T)]
            e = r.extra
            line = (
                f"  {kernel:<5} T={T:<6} blocks {e['blocks_computed']:>9,} "
                f"of {e['blocks_causal']:>9,} causal "
                f"({e['blocks_computed'] / max(e['blocks_causal'], 1):.1%}), "
                f"scores {e['scores_computed'] / max(e['scores_dense'], 1):.1%} of T x S"
            )
            masked = by_key.get((f"{kernel}_masked", T))
            if masked is not None and r.peak_bytes is not None and masked.peak_bytes:
                line += (
                    f"; peak {format_bytes(r.peak_bytes)} vs {format_bytes(masked.peak_bytes)} masked "
                    f"({r.peak_bytes / masked.peak_bytes:.0%})"
                )
            lines.append(line)
    return "\n".join(lines)


trainable_sparse_suite.report = trainable_sparse_report
trainable_sparse_suite.shape = {
    "B": 1,
    "H": HEADS,
    "H_kv": 1,
    "D": HEAD_DIM,
    "nsa": ", ".join(f"{k}={v}" for k, v in NSA_OPTIONS.items()),
    "moba": ", ".join(f"{k}={v}" for k, v in MOBA_OPTIONS.items()),
}
SUITES = {"trainable_sparse": trainable_sparse_suite}
