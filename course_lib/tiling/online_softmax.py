"""The online softmax: the running max and sum that make tiling possible.

Softmax needs the max and the sum of a whole row, yet a tile only sees part of it. Keeping a
running max ``m`` and a running sum ``l`` of ``exp(x - m)``, rescaled by ``exp(m_old - m_new)``
whenever the max grows, gives the same numbers as the softmax of the whole row. The same merge
combines partial attention outputs that carry their logsumexp (FlashDecoding, chunked work).

Attention folds whole blocks of scores and their values into a running ``(max, sum, accumulator)``
(:func:`start_fold`, :func:`fold_block`, :func:`finish_fold`): the paged KV cache, FlashDecoding and
the instrumented trace of FlashAttention use this one fold, with its one guard for rows that saw no
key. :func:`fold_block_` is the same fold in place and in base 2, for FlashAttention's fast loops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..checks import check_bool, check_broadcast, check_int, check_shape, check_tensor, compute_dtype

__all__ = [
    "online_softmax",
    "rescale_factor",
    "merge_softmax_stats",
    "start_fold",
    "fold_block",
    "finish_fold",
    "LOG2E",
    "fold_block_",
    "combine_partials",
]


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """Replace -inf (a row that has seen nothing yet) by 0 so ``exp(x - max)`` gives 0, not NaN."""
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def _safe_divide(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``total / count`` over the last dim of ``total``, with zeros where ``count`` is 0."""
    return total / torch.where(count > 0, count, torch.ones_like(count)).unsqueeze(-1)


def rescale_factor(old_max: torch.Tensor, new_max: torch.Tensor) -> torch.Tensor:
    """``exp(old_max - new_max)``: turns a sum kept relative to ``old_max`` into one relative to ``new_max``.

    The one guard of the online softmax: a ``new_max`` of ``-inf`` (a row that has seen nothing
    yet) is taken as 0, so the factor is ``exp(-inf) = 0`` instead of ``exp(-inf + inf) = NaN``.
    """
    return torch.exp(old_max - _finite_or_zero(new_max))


def merge_softmax_stats(
    max_a: torch.Tensor, sum_a: torch.Tensor, max_b: torch.Tensor, sum_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the (running max, running sum) of two pieces of a row into those of the union.

    ``sum_x`` is ``sum(exp(x_i - max_x))`` over piece ``x``. The merged max is the larger one and
    each sum is rescaled to it: ``l = l_a exp(m_a - m) + l_b exp(m_b - m)``. Empty pieces have
    max ``-inf`` and sum 0.
    """
    for name, x in (("max_a", max_a), ("sum_a", sum_a), ("max_b", max_b), ("sum_b", sum_b)):
        check_tensor(x, name, floating=True)
    new_max = torch.maximum(max_a, max_b)
    new_sum = sum_a * rescale_factor(max_a, new_max) + sum_b * rescale_factor(max_b, new_max)
    return new_max, new_sum


def online_softmax(
    blocks: Sequence[torch.Tensor], *, return_stats: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax over the last dim of ``torch.cat(blocks, -1)``, reading the row one block at a time.

    Pass 1 streams the blocks once, keeping only the running max and sum (:func:`merge_softmax_stats`);
    pass 2 normalises each block with the final max and sum. No step holds more than one block.

    Args:
        blocks: tensors of shape ``(..., n_i)`` with the same leading dims; consecutive pieces of
            each row. Empty pieces are allowed.
        return_stats: also return the row max and the row sum of ``exp(x - max)``, shape ``(...)``.

    Returns:
        ``(..., sum n_i)`` probabilities in the blocks' dtype (computed in float32 at least). A row
        that is all ``-inf`` (nothing to attend to) gives zeros and sum 0, never NaN.
    """
    check_bool(return_stats, "return_stats")
    if isinstance(blocks, torch.Tensor) or not isinstance(blocks, Sequence):
        raise TypeError(f"blocks must be a list or tuple of tensors, got {type(blocks).__name__}")
    if len(blocks) == 0:
        raise ValueError("blocks must hold at least one tensor")
    for index, block in enumerate(blocks):
        check_tensor(block, f"blocks[{index}]", floating=True)
        if block.dim() == 0:
            raise ValueError(f"blocks[{index}] must have at least 1 dim, got a scalar")
        if block.shape[:-1] != blocks[0].shape[:-1]:
            raise ValueError(
                f"blocks[{index}] of shape {tuple(block.shape)} must share the leading dims "
                f"{tuple(blocks[0].shape[:-1])} of blocks[0]"
            )
    dtype, accumulate = blocks[0].dtype, compute_dtype(blocks[0])
    leading = blocks[0].shape[:-1]
    row_max = torch.full(leading, float("-inf"), dtype=accumulate, device=blocks[0].device)
    row_sum = torch.zeros(leading, dtype=accumulate, device=blocks[0].device)

    # Pass 1: one block at a time, fold its own (max, sum) into the running pair.
    for block in blocks:
        if block.shape[-1] == 0:
            continue
        values = block.to(accumulate)
        block_max = values.amax(dim=-1)
        block_sum = torch.exp(values - _finite_or_zero(block_max).unsqueeze(-1)).sum(dim=-1)
        row_max, row_sum = merge_softmax_stats(row_max, row_sum, block_max, block_sum)

    # Pass 2: every block normalised with the final statistics.
    safe_max = _finite_or_zero(row_max).unsqueeze(-1)
    safe_sum = torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum)).unsqueeze(-1)
    pieces = [torch.exp(block.to(accumulate) - safe_max) / safe_sum for block in blocks]
    probabilities = torch.cat(pieces, dim=-1).to(dtype)
    if return_stats:
        return probabilities, row_max, row_sum
    return probabilities


# --- the fold of attention: blocks of scores and their values -----------------------------------


def start_fold(
    rows: tuple[int, ...] | torch.Size, value_dim: int, *, dtype: torch.dtype, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The running state of rows that have seen no key yet: max ``-inf``, sum 0, accumulator 0.

    ``rows`` are the leading dims, e.g. ``(B, H, T)``; returns ``(row_max, row_sum, accumulator)``
    of shapes ``rows``, ``rows`` and ``(*rows, value_dim)``.
    """
    value_dim = check_int(value_dim, "value_dim", min=0)
    row_max = torch.full(tuple(rows), float("-inf"), dtype=dtype, device=device)
    row_sum = torch.zeros(tuple(rows), dtype=dtype, device=device)
    return row_max, row_sum, torch.zeros(*rows, value_dim, dtype=dtype, device=device)


def fold_block(
    row_max: torch.Tensor,
    row_sum: torch.Tensor,
    accumulator: torch.Tensor,
    scores: torch.Tensor,
    values: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold one block of keys into the running softmax-weighted sum of values of R query rows.

    The state describes the keys seen so far: ``row_max`` ``(..., R)`` their largest score,
    ``row_sum`` ``(..., R)`` the sum of ``exp(s - row_max)``, ``accumulator`` ``(..., R, D_v)`` the
    unnormalised ``sum exp(s - row_max) v``. ``scores`` ``(..., R, n)`` are the new block's scores
    (``-inf`` where a key is masked) and ``values`` ``(..., n, D_v)`` its values, shared by the R
    rows. Returns the state that describes both: the max may grow, so what was accumulated is
    rescaled by ``exp(m_old - m_new)`` (:func:`rescale_factor`, which keeps a row that has seen only
    ``-inf`` at max ``-inf``, sum 0 and accumulator 0, never NaN).
    """
    for name, x in (
        ("row_max", row_max),
        ("row_sum", row_sum),
        ("accumulator", accumulator),
        ("scores", scores),
        ("values", values),
    ):
        check_tensor(x, name, floating=True)
    # Shapes must agree exactly: broadcasting would silently grow the running state to a new shape.
    rows = tuple(row_max.shape)
    check_shape(row_sum, "row_sum", rows, names="..., R")
    check_shape(accumulator, "accumulator", (*rows, None), names="..., R, D_v")
    check_shape(scores, "scores", (*rows, None), names="..., R, n")
    if values.dim() < 2 or values.shape[-2:] != (scores.shape[-1], accumulator.shape[-1]):
        raise ValueError(
            f"values must have shape (..., n={scores.shape[-1]}, D_v={accumulator.shape[-1]}), "
            f"got {tuple(values.shape)}"
        )
    check_broadcast(values, "values", (*rows[:-1], *values.shape[-2:]), names="..., n, D_v")
    if scores.shape[-1] == 0:  # an empty block changes nothing (and has no max)
        return row_max, row_sum, accumulator
    new_max = torch.maximum(row_max, scores.amax(dim=-1))
    probabilities = rescale_factor(scores, new_max.unsqueeze(-1))  # exp(s - m_new)
    # Everything accumulated so far was relative to the old max: rescale it.
    correction = rescale_factor(row_max, new_max)
    row_sum = row_sum * correction + probabilities.sum(dim=-1)
    accumulator = accumulator * correction.unsqueeze(-1) + probabilities @ values
    return new_max, row_sum, accumulator


def finish_fold(
    row_max: torch.Tensor, row_sum: torch.Tensor, accumulator: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise once at the end: ``(accumulator / row_sum, row_max + log(row_sum))``.

    Returns the output ``(..., D_v)`` and the logsumexp ``(...)`` of each row's scores; a row that
    saw no key gets zeros and logsumexp ``-inf``.
    """
    return _safe_divide(accumulator, row_sum), row_max + torch.log(row_sum)


# --- the same fold, in place and in base 2: for loops that reuse their buffers ------------------

LOG2E = 1.4426950408889634  # log2(e): exp(x) = 2 ** (x * LOG2E)


def fold_block_(
    row_max: torch.Tensor,
    row_sum: torch.Tensor,
    accumulator: torch.Tensor,
    scores: torch.Tensor,
    values: torch.Tensor,
) -> None:
    """:func:`fold_block` in place and in base 2: the fold of FlashAttention's fast loop.

    Same state and arguments as :func:`fold_block` (``values`` with the leading dims of the rows,
    ``(..., n, D_v)``), with two differences that save a fast loop its allocations and half its
    exponential time:

    - ``scores`` and ``row_max`` are in units of log2: natural scores times :data:`LOG2E`. A loop
      folds the factor into its softmax scale once; ``exp2`` is cheaper than ``exp`` (on CPUs and
      on GPUs, where it is the hardware instruction) and ``2 ** (s - m)`` is the same number.
    - Nothing is returned: the state tensors are updated in place and ``scores`` is overwritten
      by ``P~ = 2 ** (s - m_new)``. With 3-D tensors ``(batch, rows, keys)``, ``P~ V`` is added
      straight into the accumulator by ``baddbmm_``.

    The running sum stays that of ``exp(s - m)`` (the base does not change it), so
    :func:`finish_fold` applies after converting ``row_max`` back: ``row_max / LOG2E``.
    """
    for name, x in (
        ("row_max", row_max),
        ("row_sum", row_sum),
        ("accumulator", accumulator),
        ("scores", scores),
        ("values", values),
    ):
        check_tensor(x, name, floating=True)
    # Shapes must agree exactly: in place, a broadcast would fail or write the wrong rows.
    rows = tuple(row_max.shape)
    check_shape(row_sum, "row_sum", rows, names="..., R")
    check_shape(accumulator, "accumulator", (*rows, None), names="..., R, D_v")
    check_shape(scores, "scores", (*rows, None), names="..., R, n")
    check_shape(values, "values", (*rows[:-1], scores.shape[-1], accumulator.shape[-1]), names="..., n, D_v")
    if scores.shape[-1] == 0:  # an empty block changes nothing (and has no max)
        return
    new_max = torch.maximum(row_max, scores.amax(dim=-1))
    shift = _finite_or_zero(new_max)  # the one guard: a row that has seen only -inf keeps 0
    scores.sub_(shift.unsqueeze(-1)).exp2_()  # P~, where the scores were
    # Everything accumulated so far was relative to the old max: rescale it by 2 ** (m_old - m_new).
    correction = row_max.sub_(shift).exp2_()
    row_sum.mul_(correction).add_(scores.sum(dim=-1))
    accumulator.mul_(correction.unsqueeze(-1))
    if scores.dim() == 3:
        accumulator.baddbmm_(scores, values)
    else:
        accumulator.add_(scores @ values)
    row_max.copy_(new_max)


# --- combining partial results ---------------------------------------------------------------


def _combine(outputs: torch.Tensor, lses: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of normalised partial outputs ``(..., n, T, D_v)`` with logsumexps ``(..., n, T)``."""
    total = torch.logsumexp(lses, dim=dim)
    weights = torch.exp(lses - _finite_or_zero(total).unsqueeze(dim))
    return (weights.unsqueeze(-1) * outputs).sum(dim=dim), total


def combine_partials(
    outputs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over disjoint key sets into attention over their union, exactly.

    Partial ``i`` attended to its own keys and returned a normalised output ``o_i`` and its
    logsumexp ``lse_i`` (the log of its softmax denominator). The union has
    ``lse = logsumexp_i(lse_i)`` and ``o = sum_i exp(lse_i - lse) o_i``.

    Args:
        outputs: ``n`` tensors ``(B, H, T, D_v)``.
        lses: ``n`` tensors ``(B, H, T)``; ``-inf`` marks a partial that saw no key.

    Returns:
        ``(o, lse)``: ``(B, H, T, D_v)`` in the outputs' dtype and ``(B, H, T)``.
    """
    for name, items in (("outputs", outputs), ("lses", lses)):
        if isinstance(items, torch.Tensor) or not isinstance(items, Sequence):
            raise TypeError(f"{name} must be a list or tuple of tensors, got {type(items).__name__}")
        if len(items) == 0:
            raise ValueError(f"{name} must hold at least one tensor")
    if len(outputs) != len(lses):
        raise ValueError(f"outputs and lses must have the same length, got {len(outputs)} and {len(lses)}")
    for index, (output, lse) in enumerate(zip(outputs, lses, strict=True)):
        check_tensor(output, f"outputs[{index}]", ndim=4, floating=True)
        check_tensor(lse, f"lses[{index}]", ndim=3, floating=True)
        check_shape(output, f"outputs[{index}]", outputs[0].shape, names="B, H, T, D_v")
        check_shape(lse, f"lses[{index}]", output.shape[:3], names="B, H, T")
    dtype = compute_dtype(outputs[0])
    stacked_outputs = torch.stack([o.to(dtype) for o in outputs], dim=2)
    stacked_lses = torch.stack([lse.to(dtype) for lse in lses], dim=2)
    out, total = _combine(stacked_outputs, stacked_lses, dim=2)
    return out.to(outputs[0].dtype), total
