"""Chapter 05's kernels that skip work, as timing methods: a sliding-window mask given to dense
kernels vs kernels that never compute the masked pairs.

:func:`sparse_methods` builds, for a causal window of ``window`` keys on one sequence of
:data:`HEADS` heads of :data:`HEAD_DIM`, one builder per kernel for :func:`course_lib.measure.sweep`
(``build(T)`` makes the inputs and returns the zero-argument call to measure). The mask is built
outside the timed call (it is an input), so every method is charged only for its own work.
Chapter 05's timing widget and the ``sparse`` benchmark suite measure them.

:func:`routing_methods` does the same for the trainable sparse attentions of 2025 (NSA and MoBA)
against dense causal attention, the same selections given to dense attention as explicit masks,
and NSA's sliding window alone; each skipping kernel's call carries the blocks and scores it
computed (``call.extra``), counted by the kernel itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..checks import check_int
from ..kv_cache.gqa import repeat_kv
from ..measure import random_qkv
from ..sparse import (
    BlockWork,
    block_sparse_attention,
    moba_attention,
    moba_reference,
    nsa_attention,
    nsa_reference,
    sliding_window_attention,
    sliding_window_mask,
)
from ..standard import attention

__all__ = [
    "WINDOW",
    "HEADS",
    "HEAD_DIM",
    "REFERENCE",
    "sparse_methods",
    "NSA_OPTIONS",
    "MOBA_OPTIONS",
    "ROUTING_REFERENCE",
    "routing_methods",
    "routing_work",
]

WINDOW = 256
HEADS = 2  # so that dense T x T scores still fit in memory at T = 16384
HEAD_DIM = 64
REFERENCE = "sdpa_masked"


def sparse_methods(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *, window: int = WINDOW
) -> dict[str, Callable[[int], Callable[[], torch.Tensor]]]:
    """Builders ``{kernel: build}`` for a causal window of ``window`` keys (the query included).

    - ``dense_masked``: :func:`course_lib.attention` with :func:`sliding_window_mask` (all T x T
      scores computed, then masked).
    - ``sliding_window``: :func:`sliding_window_attention` (O(T w): never builds T x T).
    - ``block_band``: :func:`block_sparse_attention` with blocks of ``window`` and a layout of the
      diagonal block and the one before it, causal: a slightly wider pattern (each query sees
      between ``window`` and ``2 window - 1`` keys) computed tile by tile.
    - ``sdpa_masked``: :func:`torch.nn.functional.scaled_dot_product_attention` with the mask
      (:data:`REFERENCE`).
    """
    window = check_int(window, "window", min=1)

    def inputs(T: int):
        return random_qkv(T, heads=HEADS, head_dim=HEAD_DIM, device=device, dtype=dtype)

    def dense_masked(T: int):
        q, k, v = inputs(T)
        mask = sliding_window_mask(T, window, device=device)
        return lambda: attention(q, k, v, mask)

    def sliding_window(T: int):
        q, k, v = inputs(T)
        return lambda: sliding_window_attention(q, k, v, window)

    def block_band(T: int):
        q, k, v = inputs(T)
        blocks = -(-T // window)
        rows = torch.arange(blocks, device=device)
        layout = (rows[:, None] - rows[None, :] >= 0) & (rows[:, None] - rows[None, :] <= 1)
        return lambda: block_sparse_attention(q, k, v, layout, window, causal=True)

    def sdpa_masked(T: int):
        q, k, v = inputs(T)
        mask = sliding_window_mask(T, window, device=device)
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    methods = {
        "dense_masked": dense_masked,
        "sliding_window": sliding_window,
        "block_band": block_band,
        "sdpa_masked": sdpa_masked,
    }
    return methods


# --- NSA and MoBA: kernels that route each query to a few key blocks ----------------------------------

# The papers work at 32K-1M tokens: NSA (Yuan et al., 2025) selects 16 blocks of 64 beside a window
# of 512, MoBA (Lu et al., 2025) 3 blocks of 512. At a CPU's 1K-8K tokens those would read every
# block, so the benchmark keeps their block and compression sizes and selects less: NSA 8 blocks of
# 64 (the first and the two local ones forced), a window of 256, compressed blocks of 32 every 16
# keys; MoBA the 3 best blocks of 256, its own included.
NSA_OPTIONS = {
    "block_size": 64,
    "num_selected": 8,
    "window": 256,
    "compress_block": 32,
    "compress_stride": 16,
    "num_initial_blocks": 1,
    "num_local_blocks": 2,
}
MOBA_OPTIONS = {"block_size": 256, "top_k": 3}
ROUTING_REFERENCE = "sdpa_causal"


def routing_methods(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    kv_heads: int = 1,
    nsa_options: dict | None = None,
    moba_options: dict | None = None,
) -> dict[str, Callable[[int], Callable[[], torch.Tensor]]]:
    """Builders ``{kernel: build}`` for one causal sequence of :data:`HEADS` query heads sharing
    ``kv_heads`` key/value heads (GQA), :data:`HEAD_DIM` dims.

    - ``sdpa_causal``: PyTorch's fused causal SDPA (:data:`ROUTING_REFERENCE`);
    - ``dense_causal``: :func:`course_lib.attention`, causal (all T x T scores stored);
    - ``window``: :func:`sliding_window_attention` with NSA's window alone;
    - ``nsa`` / ``nsa_masked``: :func:`nsa_attention` (gathers the selected blocks) and
      :func:`nsa_reference` (three dense attentions with explicit masks), gates fixed at random
      values in (0, 1);
    - ``moba`` / ``moba_masked``: :func:`moba_attention` and :func:`moba_reference` (dense with
      :func:`moba_mask`).

    The skipping kernels' calls carry ``extra``: ``blocks_computed``, ``blocks_causal`` and
    ``scores_computed``, ``scores_dense`` (a :class:`~course_lib.sparse.BlockWork`, counted once
    when the inputs are built). Options default to :data:`NSA_OPTIONS` and :data:`MOBA_OPTIONS`.
    """
    kv_heads = check_int(kv_heads, "kv_heads", min=1, max=HEADS)
    if HEADS % kv_heads:
        raise ValueError(f"kv_heads={kv_heads} must divide the {HEADS} query heads")
    nsa_options = {**NSA_OPTIONS, **(nsa_options or {})}
    moba_options = {**MOBA_OPTIONS, **(moba_options or {})}
    group = HEADS // kv_heads

    def inputs(T: int):
        q = random_qkv(T, heads=HEADS, head_dim=HEAD_DIM, device=device, dtype=dtype)[0]
        k, v = random_qkv(T, heads=kv_heads, head_dim=HEAD_DIM, device=device, dtype=dtype, seed=1)[:2]
        generator = torch.Generator().manual_seed(2)
        gates = torch.sigmoid(torch.randn(1, HEADS, T, 3, generator=generator)).to(device, dtype)
        return q, k, v, gates

    def with_work(call, work):
        call.extra = {
            "blocks_computed": work.blocks_computed,
            "blocks_causal": work.blocks_causal,
            "scores_computed": work.scores_computed,
            "scores_dense": work.scores_dense,
        }
        return call

    def sdpa_causal(T: int):
        q, k, v, _ = inputs(T)
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)

    def dense_causal(T: int):
        q, k, v, _ = inputs(T)
        return lambda: attention(q, repeat_kv(k, group), repeat_kv(v, group), causal=True)

    def window(T: int):
        q, k, v, _ = inputs(T)
        w = nsa_options["window"]
        return lambda: sliding_window_attention(q, repeat_kv(k, group), repeat_kv(v, group), w)

    def nsa(T: int):
        q, k, v, gates = inputs(T)
        _, work = nsa_attention(q, k, v, gates, return_work=True, **nsa_options)
        return with_work(lambda: nsa_attention(q, k, v, gates, **nsa_options), work)

    def nsa_masked(T: int):
        q, k, v, gates = inputs(T)
        return lambda: nsa_reference(q, k, v, gates, **nsa_options)

    def moba(T: int):
        q, k, v, _ = inputs(T)
        _, work = moba_attention(q, k, v, return_work=True, **moba_options)
        return with_work(lambda: moba_attention(q, k, v, **moba_options), work)

    def moba_masked(T: int):
        q, k, v, _ = inputs(T)
        return lambda: moba_reference(q, k, v, **moba_options)

    return {
        "sdpa_causal": sdpa_causal,
        "dense_causal": dense_causal,
        "window": window,
        "nsa": nsa,
        "nsa_masked": nsa_masked,
        "moba": moba,
        "moba_masked": moba_masked,
    }


def routing_work(
    lengths: list[int] | tuple[int, ...],
    *,
    kv_heads: int = 1,
    nsa_options: dict | None = None,
    moba_options: dict | None = None,
) -> dict[str, list]:
    """``{"nsa": [BlockWork per T], "moba": [...]}``: the work each kernel counts as it runs, on the
    inputs of :func:`routing_methods` (float32, CPU) at each length."""
    lengths = [check_int(T, "lengths", min=1) for T in lengths]
    methods = routing_methods(kv_heads=kv_heads, nsa_options=nsa_options, moba_options=moba_options)
    work: dict[str, list] = {"nsa": [], "moba": []}
    for T in lengths:
        for kernel in work:
            extra = methods[kernel](T).extra
            work[kernel].append(BlockWork(**extra))
    return work
