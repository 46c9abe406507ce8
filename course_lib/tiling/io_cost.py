"""HBM traffic of standard and tiled attention: the FlashAttention paper's IO analysis.

Counts are elements read plus written per (batch element, head), times the bytes per element.

- Standard attention (the paper's Algorithm 0) writes the ``T x S`` scores to HBM, reads them
  back for the softmax, writes P and reads P again for ``P V``:
  ``2 T d + 2 S d + 4 T S`` elements, Theta(N d + N^2) for ``T = S = N``.
- FlashAttention with the FA1 loop order (Algorithm 1) reads K and V once, but for every one of
  the ``ceil(S / B_c)`` K/V blocks it streams all of Q, O, m and l through SRAM. With the
  paper's block size ``B_c = ceil(M / 4d)`` for an SRAM of ``M`` elements that is
  Theta(N^2 d^2 / M) (Theorem 2): far less than N^2 whenever ``d^2 < M``.
- The FA2 loop order reads Q and writes O once, and reads K and V once per Q block.

The formulas count exactly what :func:`flash_attention` does when causal is off (the tests
check this against its :class:`FlashStats`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..checks import check_choice, check_float, check_int

__all__ = ["IOCost", "io_cost"]


@dataclass(frozen=True)
class IOCost:
    """HBM bytes of standard and tiled attention for one (batch element, head)."""

    standard_bytes: float
    tiled_bytes: float
    block_q: int
    block_k: int
    loop_order: str

    @property
    def ratio(self) -> float:
        """How many times fewer bytes the tiled version moves."""
        return self.standard_bytes / self.tiled_bytes


def io_cost(
    N: int,
    d: int,
    *,
    S: int | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    sram_bytes: float | None = None,
    bytes_per_element: float = 2,
    loop_order: str = "fa1",
) -> IOCost:
    """HBM bytes read and written by standard attention and by tiled (Flash) attention.

    Args:
        N: query length T (and key length unless ``S`` is given).
        d: head dim (of queries, keys and values).
        S: key/value length; defaults to ``N``.
        block_q, block_k: tile rows of Q and of K/V. When left out they follow the paper from
            the SRAM size ``M = sram_bytes / bytes_per_element`` elements:
            ``block_k = ceil(M / 4d)`` and ``block_q = min(block_k, d)``.
        sram_bytes: on-chip memory per SM, used only to choose the block sizes.
        bytes_per_element: 2 for fp16/bf16, 4 for float32.
        loop_order: ``"fa1"`` (outer loop over K/V) or ``"fa2"`` (outer loop over Q).
    """
    N = check_int(N, "N", min=1)
    d = check_int(d, "d", min=1)
    S = N if S is None else check_int(S, "S", min=1)
    size = check_float(bytes_per_element, "bytes_per_element", min=0, min_open=True)
    check_choice(loop_order, "loop_order", ("fa1", "fa2"))
    if block_q is None or block_k is None:
        if sram_bytes is None:
            raise ValueError("sram_bytes must be given when block_q or block_k is left out")
        sram_elements = check_float(sram_bytes, "sram_bytes", min=0, min_open=True) / size
        paper_block = max(1, math.ceil(sram_elements / (4 * d)))
        block_k = paper_block if block_k is None else block_k
        block_q = min(paper_block, d) if block_q is None else block_q
    block_q = check_int(block_q, "block_q", min=1)
    block_k = check_int(block_k, "block_k", min=1)
    T = N

    standard = 2 * T * d + 2 * S * d + 4 * T * S
    if loop_order == "fa1":
        kv_blocks = math.ceil(S / block_k)
        initialise = T * d + 2 * T  # O, m, l written once before the loops
        per_kv_block = 2 * T * d + 2 * T + T * d + 2 * T  # read Q, O, m, l; write O, m, l
        epilogue = 2 * T + T  # read m, l; write the logsumexp
        tiled = initialise + 2 * S * d + kv_blocks * per_kv_block + epilogue
    else:
        q_blocks = math.ceil(T / block_q)
        tiled = T * d + q_blocks * 2 * S * d + T * d + T  # Q once, K and V per Q block, O and lse once
    return IOCost(standard * size, tiled * size, block_q, block_k, loop_order)
