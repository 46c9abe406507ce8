"""The online softmax: the running max and sum that make tiling possible.

Softmax needs the max and the sum of a whole row, yet a tile only sees part of it. Keeping a
running max ``m`` and a running sum ``l`` of ``exp(x - m)``, rescaled by ``exp(m_old - m_new)``
whenever the max grows, gives the same numbers as the softmax of the whole row. The same merge
combines partial attention outputs that carry their logsumexp (FlashDecoding, chunked work).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..checks import check_bool, check_shape, check_tensor

__all__ = ["online_softmax", "merge_softmax_stats", "combine_partials"]


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """Replace -inf (a row that has seen nothing yet) by 0 so ``exp(x - max)`` gives 0, not NaN."""
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


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
    safe_max = _finite_or_zero(new_max)
    new_sum = sum_a * torch.exp(max_a - safe_max) + sum_b * torch.exp(max_b - safe_max)
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
    dtype = blocks[0].dtype
    compute_dtype = torch.promote_types(dtype, torch.float32)
    leading = blocks[0].shape[:-1]
    row_max = torch.full(leading, float("-inf"), dtype=compute_dtype, device=blocks[0].device)
    row_sum = torch.zeros(leading, dtype=compute_dtype, device=blocks[0].device)

    # Pass 1: one block at a time, fold its own (max, sum) into the running pair.
    for block in blocks:
        if block.shape[-1] == 0:
            continue
        values = block.to(compute_dtype)
        block_max = values.amax(dim=-1)
        block_sum = torch.exp(values - _finite_or_zero(block_max).unsqueeze(-1)).sum(dim=-1)
        row_max, row_sum = merge_softmax_stats(row_max, row_sum, block_max, block_sum)

    # Pass 2: every block normalised with the final statistics.
    safe_max = _finite_or_zero(row_max).unsqueeze(-1)
    safe_sum = torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum)).unsqueeze(-1)
    pieces = [torch.exp(block.to(compute_dtype) - safe_max) / safe_sum for block in blocks]
    probabilities = torch.cat(pieces, dim=-1).to(dtype)
    if return_stats:
        return probabilities, row_max, row_sum
    return probabilities


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
    compute_dtype = torch.promote_types(outputs[0].dtype, torch.float32)
    stacked_outputs = torch.stack([o.to(compute_dtype) for o in outputs], dim=2)
    stacked_lses = torch.stack([lse.to(compute_dtype) for lse in lses], dim=2)
    out, total = _combine(stacked_outputs, stacked_lses, dim=2)
    return out.to(outputs[0].dtype), total
