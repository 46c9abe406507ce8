"""FlashAttention in PyTorch: exact attention computed tile by tile, forward and backward.

The loops are those of the papers, written with PyTorch ops on blocks so every step can be
read and checked; a real kernel runs one Q block per thread block and keeps the tiles in SRAM.

- ``loop_order="fa1"`` (Dao et al., 2022, Algorithm 1): the outer loop walks K/V blocks, the
  inner loop Q blocks. O, the running max m and sum l live in "HBM" (full tensors); each step
  reads them, rescales, normalises and writes them back.
- ``loop_order="fa2"`` (Dao, 2023): the outer loop walks Q blocks, the inner loop K/V blocks.
  A Q block's accumulator stays on chip, is rescaled only by ``exp(m_old - m_new)`` and is
  divided by l once at the end; the logsumexp ``m + log(l)`` is kept for the backward pass.

The backward pass saves only q, k, v, O and the logsumexp, and recomputes each block of P from
them: ``P = exp(s - lse)``, ``dS = P * (dP - D)`` with ``D = rowsum(dO * O)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.autograd.function import once_differentiable

from ..checks import check_attention_inputs, check_bool, check_choice, check_float, check_int
from .online_softmax import _finite_or_zero

__all__ = ["FlashStats", "TileStep", "flash_attention", "flash_attention_trace", "tile_gradients"]


# --- bookkeeping: what the loops did ---------------------------------------------------------


@dataclass
class FlashStats:
    """Counts filled in by one :func:`flash_attention` call (pass an instance as ``stats=``).

    Element counts are per (batch element, head), so they compare with :func:`io_cost`:
    a block of ``r`` rows of q (head dim ``D``) read from HBM adds ``r * D`` to ``elements_read``.
    """

    block_pairs: int = 0
    blocks_computed: int = 0
    blocks_skipped: int = 0
    elements_read: int = 0
    elements_written: int = 0

    def bytes_moved(self, bytes_per_element: float) -> float:
        """HBM bytes read plus written, at ``bytes_per_element`` bytes per element."""
        return (self.elements_read + self.elements_written) * check_float(
            bytes_per_element, "bytes_per_element", min=0, min_open=True
        )


@dataclass
class TileStep:
    """One (Q block, K block) step of the schedule, as :func:`flash_attention_trace` records it.

    ``row_max``, ``row_sum`` (``(B, H, rows)``) and ``output`` (``(B, H, rows, D_v)``, the current
    normalised estimate of O for the block's queries) are copies taken after the step.
    """

    step: int
    q_block: int
    k_block: int
    q_rows: tuple[int, int]
    k_rows: tuple[int, int]
    skipped: bool
    row_max: torch.Tensor = field(repr=False)
    row_sum: torch.Tensor = field(repr=False)
    output: torch.Tensor = field(repr=False)


def _visibility(q_start: int, q_end: int, k_start: int, k_end: int, offset: int, causal: bool) -> str:
    """'full', 'partial' or 'none': how much of a block query i may see (keys j <= i + offset)."""
    if not causal:
        return "full"
    if k_start > q_end - 1 + offset:
        return "none"
    if k_end - 1 <= q_start + offset:
        return "full"
    return "partial"


def _causal_block_mask(
    q_start: int, q_end: int, k_start: int, k_end: int, offset: int, device
) -> torch.Tensor:
    rows = torch.arange(q_start, q_end, device=device).unsqueeze(1)
    cols = torch.arange(k_start, k_end, device=device).unsqueeze(0)
    return cols <= rows + offset


def _block_scores(q_block, k_block, scale, visibility, q_range, k_range, offset):
    """Scores of one tile, -inf where causal forbids; ``scale=None`` if q_block is pre-scaled."""
    scores = q_block @ k_block.transpose(-2, -1)
    if scale is not None:
        scores = scores * scale
    if visibility == "partial":
        allowed = _causal_block_mask(*q_range, *k_range, offset, scores.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores


# --- the forward loops ------------------------------------------------------------------------


def _forward_fa2(q, k, v, scale, causal, block_q, block_k, stats, trace):
    """Outer loop over Q blocks, inner over K/V blocks; normalise once at the end."""
    B, H, T, D = q.shape
    S, Dv = k.shape[2], v.shape[3]
    offset = S - T
    out = q.new_empty(B, H, T, Dv)
    lse = q.new_empty(B, H, T)
    for q_index, q_start in enumerate(range(0, T, block_q)):
        q_end = min(q_start + block_q, T)
        rows = q_end - q_start
        q_block = q[:, :, q_start:q_end] * scale  # scaled once: it stays on chip for the inner loop
        stats.elements_read += rows * D
        row_max = q.new_full((B, H, rows), float("-inf"))
        row_sum = q.new_zeros(B, H, rows)
        accumulator = q.new_zeros(B, H, rows, Dv)
        for k_index, k_start in enumerate(range(0, S, block_k)):
            k_end = min(k_start + block_k, S)
            visibility = _visibility(q_start, q_end, k_start, k_end, offset, causal)
            stats.block_pairs += 1
            if visibility == "none":
                stats.blocks_skipped += 1
            else:
                stats.blocks_computed += 1
                k_block, v_block = k[:, :, k_start:k_end], v[:, :, k_start:k_end]
                stats.elements_read += (k_end - k_start) * (D + Dv)
                scores = _block_scores(
                    q_block, k_block, None, visibility, (q_start, q_end), (k_start, k_end), offset
                )
                new_max = torch.maximum(row_max, scores.amax(dim=-1))
                safe_max = _finite_or_zero(new_max)
                probabilities = torch.exp(scores - safe_max.unsqueeze(-1))
                # Everything accumulated so far was relative to the old max: rescale it.
                correction = torch.exp(row_max - safe_max)
                row_sum = row_sum * correction + probabilities.sum(dim=-1)
                accumulator = accumulator * correction.unsqueeze(-1) + probabilities @ v_block
                row_max = new_max
            if trace is not None:
                partial = accumulator / torch.where(row_sum > 0, row_sum, 1.0).unsqueeze(-1)
                trace.append(
                    TileStep(
                        len(trace),
                        q_index,
                        k_index,
                        (q_start, q_end),
                        (k_start, k_end),
                        visibility == "none",
                        row_max.clone(),
                        row_sum.clone(),
                        partial.clone(),
                    )
                )
        out[:, :, q_start:q_end] = accumulator / torch.where(row_sum > 0, row_sum, 1.0).unsqueeze(-1)
        lse[:, :, q_start:q_end] = row_max + torch.log(row_sum)
        stats.elements_written += rows * Dv + rows
    return out, lse


def _forward_fa1(q, k, v, scale, causal, block_q, block_k, stats, trace):
    """Outer loop over K/V blocks, inner over Q blocks; O, m and l re-read and rewritten each step."""
    B, H, T, D = q.shape
    S, Dv = k.shape[2], v.shape[3]
    offset = S - T
    out = q.new_zeros(B, H, T, Dv)
    row_max = q.new_full((B, H, T), float("-inf"))
    row_sum = q.new_zeros(B, H, T)
    stats.elements_written += T * Dv + 2 * T  # O = 0, m = -inf, l = 0 initialised in HBM
    for k_index, k_start in enumerate(range(0, S, block_k)):
        k_end = min(k_start + block_k, S)
        k_block, v_block = k[:, :, k_start:k_end], v[:, :, k_start:k_end]
        loaded = False
        for q_index, q_start in enumerate(range(0, T, block_q)):
            q_end = min(q_start + block_q, T)
            rows = q_end - q_start
            visibility = _visibility(q_start, q_end, k_start, k_end, offset, causal)
            stats.block_pairs += 1
            if visibility == "none":
                stats.blocks_skipped += 1
            else:
                stats.blocks_computed += 1
                if not loaded:  # K_j, V_j come on chip once, when first needed
                    stats.elements_read += (k_end - k_start) * (D + Dv)
                    loaded = True
                q_block = q[:, :, q_start:q_end]
                old_out = out[:, :, q_start:q_end]
                old_max, old_sum = row_max[:, :, q_start:q_end], row_sum[:, :, q_start:q_end]
                stats.elements_read += rows * (D + Dv + 2)
                scores = _block_scores(
                    q_block, k_block, scale, visibility, (q_start, q_end), (k_start, k_end), offset
                )
                block_max = scores.amax(dim=-1)
                probabilities = torch.exp(scores - _finite_or_zero(block_max).unsqueeze(-1))
                block_sum = probabilities.sum(dim=-1)
                new_max = torch.maximum(old_max, block_max)
                safe_max = _finite_or_zero(new_max)
                old_weight = torch.exp(old_max - safe_max) * old_sum
                new_weight = torch.exp(block_max - safe_max)
                new_sum = old_weight + new_weight * block_sum
                # O is kept normalised: undo the old 1/l, add the new block, divide by the new l.
                numerator = old_weight.unsqueeze(-1) * old_out + new_weight.unsqueeze(-1) * (
                    probabilities @ v_block
                )
                out[:, :, q_start:q_end] = numerator / torch.where(new_sum > 0, new_sum, 1.0).unsqueeze(-1)
                row_max[:, :, q_start:q_end] = new_max
                row_sum[:, :, q_start:q_end] = new_sum
                stats.elements_written += rows * (Dv + 2)
            if trace is not None:
                trace.append(
                    TileStep(
                        len(trace),
                        q_index,
                        k_index,
                        (q_start, q_end),
                        (k_start, k_end),
                        visibility == "none",
                        row_max[:, :, q_start:q_end].clone(),
                        row_sum[:, :, q_start:q_end].clone(),
                        out[:, :, q_start:q_end].clone(),
                    )
                )
    lse = row_max + torch.log(row_sum)
    stats.elements_read += 2 * T
    stats.elements_written += T
    return out, lse


_FORWARDS = {"fa1": _forward_fa1, "fa2": _forward_fa2}


# --- the backward pass ------------------------------------------------------------------------


def tile_gradients(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    scores: torch.Tensor,
    lse: torch.Tensor,
    row_terms: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One tile's share of the attention gradients, with the weights recomputed from the logsumexp.

    q ``(B, H, T_b, D)``, k ``(B, H, S_b, D)``, v ``(B, H, S_b, D_v)``, grad_out ``(B, H, T_b, D_v)``;
    ``scores = scale * q k^T`` with ``-inf`` where masked, ``(B, H, T_b, S_b)``; ``lse`` the rows'
    final logsumexp ``(B, H, T_b)`` (``+inf`` or ``0`` for a row that saw no key, so P is 0);
    ``row_terms`` is ``-rowsum(grad_out * out)`` plus any gradient on the logsumexp, ``(B, H, T_b)``.
    ``P = exp(scores - lse)``, ``dS = P * (dO V^T + row_terms)``; returns ``(scale dS K,
    scale dS^T Q, P^T dO)``: this tile's additions to dQ, dK and dV.
    """
    probabilities = torch.exp(scores - lse.unsqueeze(-1))
    grad_scores = probabilities * (grad_out @ v.transpose(-2, -1) + row_terms.unsqueeze(-1))
    grad_q = scale * (grad_scores @ k)
    grad_k = scale * (grad_scores.transpose(-2, -1) @ q)
    return grad_q, grad_k, probabilities.transpose(-2, -1) @ grad_out


def _backward(q, k, v, out, lse, grad_out, grad_lse, scale, causal, block_q, block_k):
    """FlashAttention-2's backward: outer loop over K/V blocks, P recomputed block by block."""
    T, S = q.shape[2], k.shape[2]
    offset = S - T
    # D_i = sum_d dO_id O_id equals sum_j P_ij dP_ij: the softmax Jacobian's correction term.
    delta = (grad_out * out).sum(dim=-1)
    # A row that saw no key has lse = -inf and P = 0: use +inf so exp(s - lse) is 0, not NaN.
    safe_lse = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse)
    grad_q, grad_k, grad_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for k_start in range(0, S, block_k):
        k_end = min(k_start + block_k, S)
        k_block, v_block = k[:, :, k_start:k_end], v[:, :, k_start:k_end]
        grad_k_block, grad_v_block = torch.zeros_like(k_block), torch.zeros_like(v_block)
        for q_start in range(0, T, block_q):
            q_end = min(q_start + block_q, T)
            visibility = _visibility(q_start, q_end, k_start, k_end, offset, causal)
            if visibility == "none":
                continue
            rows = slice(q_start, q_end)
            q_block, grad_out_block = q[:, :, rows], grad_out[:, :, rows]
            scores = _block_scores(
                q_block, k_block, scale, visibility, (q_start, q_end), (k_start, k_end), offset
            )
            # d lse / d s = P, so a gradient on the logsumexp adds to (dP - D).
            row_terms = grad_lse[:, :, rows] - delta[:, :, rows]
            tile_q, tile_k, tile_v = tile_gradients(
                q_block, k_block, v_block, grad_out_block, scores, safe_lse[:, :, rows], row_terms, scale
            )
            grad_q[:, :, rows] += tile_q
            grad_k_block += tile_k
            grad_v_block += tile_v
        grad_k[:, :, k_start:k_end] = grad_k_block
        grad_v[:, :, k_start:k_end] = grad_v_block
    return grad_q, grad_k, grad_v


class _FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, block_q, block_k, loop_order, stats):
        # Half-precision inputs are computed in float32; float64 stays float64 (gradient checks).
        compute_dtype = torch.promote_types(q.dtype, torch.float32)
        out, lse = _FORWARDS[loop_order](
            q.to(compute_dtype),
            k.to(compute_dtype),
            v.to(compute_dtype),
            scale,
            causal,
            block_q,
            block_k,
            stats,
            None,
        )
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.settings = (scale, causal, block_q, block_k)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        compute_dtype = lse.dtype
        grads = _backward(
            q.to(compute_dtype),
            k.to(compute_dtype),
            v.to(compute_dtype),
            out.to(compute_dtype),
            lse,
            grad_out.to(compute_dtype),
            grad_lse.to(compute_dtype),
            *ctx.settings,
        )
        return tuple(g.to(x.dtype) for g, x in zip(grads, (q, k, v), strict=True)) + (None,) * 6


# --- the public functions ---------------------------------------------------------------------


def _check_flash_arguments(q, k, v, causal, scale, block_q, block_k, loop_order):
    D = check_attention_inputs(q, k, v)[4]
    check_bool(causal, "causal")
    scale = D**-0.5 if scale is None else check_float(scale, "scale")
    block_q = check_int(block_q, "block_q", min=1)
    block_k = check_int(block_k, "block_k", min=1)
    check_choice(loop_order, "loop_order", _FORWARDS)
    return scale, block_q, block_k


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
    loop_order: str = "fa2",
    return_lse: bool = False,
    stats: FlashStats | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention, computed one (Q block, K block) tile at a time.

    Args:
        q: ``(B, H, T, D)`` queries.
        k: ``(B, H, S, D)`` keys.
        v: ``(B, H, S, D_v)`` values.
        causal: query ``i`` sees keys ``0 .. S - T + i`` (aligned to the end when ``T != S``);
            tiles wholly above the diagonal are skipped without being loaded.
        scale: multiplies the scores; defaults to ``D ** -0.5``.
        block_q, block_k: rows of q and of k/v per tile; any size, including 1 or more than T.
        loop_order: ``"fa2"`` (outer loop over Q blocks) or ``"fa1"`` (outer loop over K/V blocks).
        return_lse: also return the logsumexp of each row of scores, ``(B, H, T)``.
        stats: a :class:`FlashStats` to fill with the counts of tiles computed and skipped and
            of the elements read from and written to HBM.

    Returns:
        ``(B, H, T, D_v)`` in the input dtype (and the float32/float64 logsumexp). A query that
        sees no key gets zeros and logsumexp ``-inf``. Differentiable through a hand-written
        backward that saves only q, k, v, the output and the logsumexp.
    """
    scale, block_q, block_k = _check_flash_arguments(q, k, v, causal, scale, block_q, block_k, loop_order)
    check_bool(return_lse, "return_lse")
    if stats is not None and not isinstance(stats, FlashStats):
        raise TypeError(f"stats must be a FlashStats or None, got {type(stats).__name__}")
    out, lse = _FlashAttentionFunction.apply(
        q, k, v, scale, causal, block_q, block_k, loop_order, FlashStats() if stats is None else stats
    )
    return (out, lse) if return_lse else out


def flash_attention_trace(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
    loop_order: str = "fa2",
) -> list[TileStep]:
    """Run the forward loops and record every step of the schedule (for the tile-walk widget).

    Same arguments as :func:`flash_attention`; returns one :class:`TileStep` per (Q block, K block)
    pair in the order the chosen loop visits them, skipped tiles included.
    """
    scale, block_q, block_k = _check_flash_arguments(q, k, v, causal, scale, block_q, block_k, loop_order)
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    steps: list[TileStep] = []
    with torch.no_grad():
        _FORWARDS[loop_order](
            q.to(compute_dtype),
            k.to(compute_dtype),
            v.to(compute_dtype),
            scale,
            causal,
            block_q,
            block_k,
            FlashStats(),
            steps,
        )
    return steps
