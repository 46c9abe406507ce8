"""FlashAttention in PyTorch: exact attention computed tile by tile, forward and backward.

The loops are those of the papers, written with PyTorch ops on blocks so every step can be
read and checked; a real kernel runs one Q block per thread block and keeps the tiles in SRAM.
Every tile's scores go through the one online-softmax fold of :mod:`.online_softmax`.

- :func:`flash_forward_fa2` (Dao, 2023): the outer loop walks Q blocks, the inner loop K/V blocks.
  A Q block's accumulator stays on chip, is rescaled only by ``exp(m_old - m_new)`` and is
  divided by l once at the end; the logsumexp ``m + log(l)`` is kept for the backward pass.
- :func:`flash_forward_fa1` (Dao et al., 2022, Algorithm 1): the outer loop walks K/V blocks, the
  inner loop Q blocks. O, the running max m and sum l live in "HBM" (full tensors); each step
  reads them, folds the tile in, normalises O again and writes them back.
- :func:`flash_backward` saves nothing but q, k, v, O and the logsumexp, and recomputes each block
  of P from them: ``P = exp(s - lse)``, ``dS = P * (dP - D)`` with ``D = rowsum(dO * O)``.

:func:`flash_attention` puts these loops behind autograd. The last part of the module is the
instrumentation of chapter 03, kept out of the loops: :func:`tile_schedule` lists the tiles in
the order a loop visits them, :class:`FlashStats` counts what that schedule moves between HBM and
chip, and :func:`flash_attention_trace` replays it with the same fold, recording every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from ..checks import (
    check_attention_inputs,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_shape,
    check_tensor,
    compute_dtype,
    resolve_scale,
)
from ..standard import alibi_slopes
from .online_softmax import finish_fold, fold_block, merge_softmax_stats, rescale_factor, start_fold

__all__ = [
    "flash_forward_fa2",
    "flash_forward_fa1",
    "tile_gradients",
    "flash_backward",
    "flash_attention",
    "Tile",
    "tile_schedule",
    "FlashStats",
    "TileStep",
    "flash_attention_trace",
    "ScoreMod",
    "alibi_score_mod",
    "soft_cap_score_mod",
]


# --- tiles ---------------------------------------------------------------------------------------


def _blocks(length: int, size: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` rows of consecutive blocks of ``size`` rows; the last may be shorter."""
    return [(start, min(start + size, length)) for start in range(0, length, size)]


def _visibility(q_rows: tuple[int, int], k_rows: tuple[int, int], offset: int, causal: bool) -> str:
    """'full', 'partial' or 'none': how much of a tile query i may see (keys j <= i + offset)."""
    (q_start, q_end), (k_start, k_end) = q_rows, k_rows
    if not causal:
        return "full"
    if k_start > q_end - 1 + offset:
        return "none"
    if k_end - 1 <= q_start + offset:
        return "full"
    return "partial"


def _block_scores(q_block, k_block, visibility, q_rows, k_rows, offset, scale=None, score_mod=None):
    """Scores of one tile, -inf where causal forbids; ``scale=None`` if q_block is pre-scaled.

    ``score_mod`` is ``None`` or a :class:`_TileMod`: the score modification with its index tensors.
    """
    scores = q_block @ k_block.transpose(-2, -1)
    if scale is not None:
        scores = scores * scale
    if score_mod is not None:
        scores = score_mod(scores, q_rows, k_rows)
    if visibility == "partial":
        scores = _block_scores_mask(scores, q_rows, k_rows, offset)
    return scores


def _block_scores_mask(scores, q_rows, k_rows, offset):
    """``scores`` with ``-inf`` where causal forbids a key (``j > i + offset``)."""
    rows = torch.arange(*q_rows, device=scores.device).unsqueeze(1)
    cols = torch.arange(*k_rows, device=scores.device).unsqueeze(0)
    return scores.masked_fill(cols > rows + offset, float("-inf"))


# --- score modifications: a bias computed inside each tile --------------------------------------

ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def alibi_score_mod(num_heads: int, *, offset: int = 0) -> ScoreMod:
    """ALiBi as a score modification: ``score - slope_h * |i + offset - j|`` (Press et al., 2022).

    With ``offset = S - T`` (queries aligned to the end of the keys) it adds exactly
    :func:`course_lib.standard.alibi_bias`, one tile at a time.
    """
    slopes = alibi_slopes(num_heads)
    offset = check_int(offset, "offset")

    def score_mod(score, batch, head, query_index, key_index):
        distance = (query_index + offset - key_index).abs()
        return score - slopes.to(score.device, score.dtype)[head] * distance

    return score_mod


def soft_cap_score_mod(cap: float) -> ScoreMod:
    """A logit soft cap, ``cap * tanh(score / cap)``: every score stays in ``(-cap, cap)`` (Gemma 2)."""
    cap = check_float(cap, "cap", min=0, min_open=True)
    if cap == float("inf"):
        raise ValueError("cap must be finite (no cap: pass no score_mod)")

    def score_mod(score, batch, head, query_index, key_index):
        return cap * torch.tanh(score / cap)

    return score_mod


class _TileMod:
    """A score modification and its index tensors, called on one tile at a time.

    ``score_mod(score, batch, head, query_index, key_index)`` gets the tile's scaled scores
    ``(B, H, rows, keys)`` and integer indices that broadcast against them, ``(B, 1, 1, 1)``,
    ``(1, H, 1, 1)``, ``(1, 1, rows, 1)`` and ``(1, 1, 1, keys)`` (FlexAttention's signature; the
    indices count from 0 in q and in k, whatever ``T - S``). The index tensors are built once per
    call and sliced per tile, so the ``T x S`` bias never exists.
    """

    def __init__(self, score_mod: ScoreMod, B: int, H: int, T: int, S: int, device: torch.device):
        self.score_mod = score_mod
        self.batch = torch.arange(B, device=device).view(B, 1, 1, 1)
        self.head = torch.arange(H, device=device).view(1, H, 1, 1)
        self.query = torch.arange(T, device=device).view(1, 1, T, 1)
        self.key = torch.arange(S, device=device).view(1, 1, 1, S)

    def __call__(
        self, scores: torch.Tensor, q_rows: tuple[int, int], k_rows: tuple[int, int]
    ) -> torch.Tensor:
        query, key = self.query[:, :, slice(*q_rows)], self.key[..., slice(*k_rows)]
        modified = self.score_mod(scores, self.batch, self.head, query, key)
        if not isinstance(modified, torch.Tensor) or not modified.is_floating_point():
            raise TypeError(f"score_mod must return a floating tensor, got {type(modified).__name__}")
        if modified.shape != scores.shape:
            try:
                modified = modified.expand(scores.shape)
            except RuntimeError:
                raise ValueError(
                    f"score_mod must return a tensor broadcastable to the tile's scores "
                    f"{tuple(scores.shape)}, got {tuple(modified.shape)}"
                ) from None
        return modified.to(scores.dtype)


def _tile_mod(score_mod, q, k) -> _TileMod | None:
    if score_mod is None:
        return None
    if not callable(score_mod):
        raise TypeError(f"score_mod must be callable or None, got {type(score_mod).__name__}")
    B, H, T = q.shape[:3]
    return _TileMod(score_mod, B, H, T, k.shape[2], q.device)


def _score_mod_leaves(
    score_mod: ScoreMod, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """The tensors that require grad and that ``score_mod`` reads (a learned bias's table).

    Found by calling it once on a 1-element tile and walking the autograd graph of the result
    back to its leaves; :func:`flash_attention` passes them to autograd as inputs, so their
    gradients (summed over every tile by the backward pass) reach them.
    """
    if not torch.is_grad_enabled():
        return ()
    probe = torch.zeros(1, 1, 1, 1, dtype=dtype, device=device, requires_grad=True)
    index = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    result = score_mod(probe, index, index, index, index)
    leaves: dict[int, torch.Tensor] = {}
    stack, seen = [getattr(result, "grad_fn", None)], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf
        if variable is not None:
            if variable is not probe:
                leaves[id(variable)] = variable
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return tuple(leaves.values())


def _check_loop_arguments(q, k, v, scale, causal, block_q, block_k):
    """Checks shared by the loops; returns ``(q, k, v)`` in the compute dtype, scale, block_q, block_k."""
    D = check_attention_inputs(q, k, v)[4]
    check_bool(causal, "causal")
    scale = resolve_scale(scale, D)
    block_q = check_int(block_q, "block_q", min=1)
    block_k = check_int(block_k, "block_k", min=1)
    dtype = compute_dtype(q)
    return (q.to(dtype), k.to(dtype), v.to(dtype)), scale, block_q, block_k


def _check_saved(q, v, out, lse, grad_out, grad_lse):
    """Check what the backward pass gets besides q, k, v; returns them in q's (compute) dtype."""
    rows = q.shape[:3]
    if grad_lse is None:
        grad_lse = torch.zeros(rows, dtype=q.dtype, device=q.device)
    shapes = {"out": (*rows, v.shape[3]), "lse": rows, "grad_out": (*rows, v.shape[3]), "grad_lse": rows}
    for name, x in (("out", out), ("lse", lse), ("grad_out", grad_out), ("grad_lse", grad_lse)):
        check_tensor(x, name, floating=True)
        check_shape(x, name, shapes[name])
    return tuple(x.to(q.dtype) for x in (out, lse, grad_out, grad_lse))


# --- the forward loops ---------------------------------------------------------------------------


def flash_forward_fa2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    block_q: int = 64,
    block_k: int = 64,
    score_mod: ScoreMod | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2's forward pass: Q blocks outside, K/V blocks inside, normalise once.

    q ``(B, H, T, D)``, k ``(B, H, S, D)``, v ``(B, H, S, D_v)``; ``scale`` defaults to ``D ** -0.5``;
    ``causal`` aligns the diagonal to the end. Returns ``(out, lse)``: ``(B, H, T, D_v)`` and the
    ``(B, H, T)`` logsumexp, in float32 (float64 stays float64). A query that sees no key gets
    zeros and logsumexp ``-inf``. ``score_mod(score, batch, head, query_index, key_index)``, if
    given, modifies each tile's scaled scores before the causal mask (see :func:`flash_attention`).
    No autograd of its own: :func:`flash_attention` adds the backward.
    """
    (q, k, v), scale, block_q, block_k = _check_loop_arguments(q, k, v, scale, causal, block_q, block_k)
    tile_mod = _tile_mod(score_mod, q, k)
    T, S = q.shape[2], k.shape[2]
    out = q.new_empty(*q.shape[:3], v.shape[3])
    lse = q.new_empty(q.shape[:3])
    for q_rows in _blocks(T, block_q):
        rows = slice(*q_rows)
        q_block = q[:, :, rows] * scale  # scaled once: it stays on chip for the whole inner loop
        row_max, row_sum, accumulator = start_fold(
            q_block.shape[:3], v.shape[3], dtype=q.dtype, device=q.device
        )
        for k_rows in _blocks(S, block_k):
            visibility = _visibility(q_rows, k_rows, S - T, causal)
            if visibility == "none":
                continue  # wholly above the causal diagonal: never loaded
            cols = slice(*k_rows)
            scores = _block_scores(
                q_block, k[:, :, cols], visibility, q_rows, k_rows, S - T, score_mod=tile_mod
            )
            row_max, row_sum, accumulator = fold_block(row_max, row_sum, accumulator, scores, v[:, :, cols])
        out[:, :, rows], lse[:, :, rows] = finish_fold(row_max, row_sum, accumulator)
    return out, lse


def flash_forward_fa1(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    block_q: int = 64,
    block_k: int = 64,
    score_mod: ScoreMod | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention's (2022) forward pass: K/V blocks outside, Q blocks inside.

    O, the running max m and the running sum l are full tensors in HBM. Each K/V block comes on
    chip once; every Q block then reads its rows of O, m and l, merges the tile's own statistics
    into them and writes them back, with O normalised again at every step (Algorithm 1 of the
    paper). Same arguments and result as :func:`flash_forward_fa2`.
    """
    (q, k, v), scale, block_q, block_k = _check_loop_arguments(q, k, v, scale, causal, block_q, block_k)
    tile_mod = _tile_mod(score_mod, q, k)
    T, S = q.shape[2], k.shape[2]
    row_max, row_sum, out = start_fold(q.shape[:3], v.shape[3], dtype=q.dtype, device=q.device)
    for k_rows in _blocks(S, block_k):
        k_block, v_block = k[:, :, slice(*k_rows)], v[:, :, slice(*k_rows)]
        for q_rows in _blocks(T, block_q):
            visibility = _visibility(q_rows, k_rows, S - T, causal)
            if visibility == "none":
                continue
            rows = slice(*q_rows)
            scores = _block_scores(
                q[:, :, rows], k_block, visibility, q_rows, k_rows, S - T, scale, score_mod=tile_mod
            )
            # The tile on its own: its max m~, the sum l~ of P~ = exp(s - m~), and P~ V.
            empty = start_fold(scores.shape[:3], v.shape[3], dtype=q.dtype, device=q.device)
            block_max, block_sum, block_values = fold_block(*empty, scores, v_block)
            # Merge it with the rows' m, l and O read from HBM. O is stored normalised, so the old
            # O is weighted by its rescaled sum, the tile by its rescaled factor, and the whole
            # divided by the new sum: the extra non-matmul work that FA2 removes.
            old_max, old_sum = row_max[:, :, rows], row_sum[:, :, rows]
            new_max, new_sum = merge_softmax_stats(old_max, old_sum, block_max, block_sum)
            old_weight = rescale_factor(old_max, new_max) * old_sum
            new_weight = rescale_factor(block_max, new_max)
            numerator = old_weight.unsqueeze(-1) * out[:, :, rows] + new_weight.unsqueeze(-1) * block_values
            out[:, :, rows], _ = finish_fold(new_max, new_sum, numerator)
            row_max[:, :, rows], row_sum[:, :, rows] = new_max, new_sum
    return out, row_max + torch.log(row_sum)


# --- the backward pass ---------------------------------------------------------------------------


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


def _tile_gradients_through_mod(q, k, v, grad_out, raw_scores, tile_mod, tile, lse, row_terms, scale, inputs):
    """:func:`tile_gradients` for modified scores: the mod's derivative comes from autograd.

    ``raw_scores`` are the tile's scaled scores before the modification. The modified scores are
    recomputed with autograd on, ``dS`` is formed for them as usual, and one ``autograd.grad``
    carries it back through the modification to the raw scores and to ``inputs`` (the tensors
    the modification reads, e.g. T5's table). Returns the three tile gradients and those of
    ``inputs`` (zeros where the tile does not reach one).
    """
    q_rows, k_rows, visibility, offset = tile
    with torch.enable_grad():
        raw = raw_scores.requires_grad_()
        modified = tile_mod(raw, q_rows, k_rows)
    scores = modified.detach()
    if visibility == "partial":
        scores = _block_scores_mask(scores, q_rows, k_rows, offset)
    probabilities = torch.exp(scores - lse.unsqueeze(-1))
    grad_modified = probabilities * (grad_out @ v.transpose(-2, -1) + row_terms.unsqueeze(-1))
    # retain_graph: the modification may read a tensor computed outside (a table times a parameter)
    # whose graph every tile goes back through.
    grads = torch.autograd.grad(
        modified, (raw, *inputs), grad_modified, retain_graph=True, allow_unused=True, materialize_grads=True
    )
    grad_scores = grads[0]
    grad_q = scale * (grad_scores @ k)
    grad_k = scale * (grad_scores.transpose(-2, -1) @ q)
    return grad_q, grad_k, probabilities.transpose(-2, -1) @ grad_out, grads[1:]


def flash_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    grad_lse: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    block_q: int = 64,
    block_k: int = 64,
    score_mod: ScoreMod | None = None,
    score_mod_inputs: tuple[torch.Tensor, ...] = (),
) -> tuple[torch.Tensor, ...]:
    """FlashAttention-2's backward pass: K/V blocks outside, Q blocks inside, P recomputed per tile.

    q, k, v as in :func:`flash_forward_fa2`; ``out`` ``(B, H, T, D_v)`` and ``lse`` ``(B, H, T)`` are
    what the forward returned, ``grad_out`` the gradient on ``out`` and ``grad_lse`` (optional) the
    gradient on ``lse``. Returns ``(grad_q, grad_k, grad_v)`` in the compute dtype. dK_j and dV_j
    are accumulated on chip for one K/V block; each tile adds its share to dQ.

    With a ``score_mod``, each tile's modified scores are recomputed with autograd on and its
    ``dS`` is pulled back through the modification by ``torch.autograd.grad`` on the tile: any
    differentiable modification works (ALiBi, T5's buckets, a soft cap whose derivative depends on
    the score) without a hand-written derivative. ``score_mod_inputs`` are tensors the
    modification reads whose gradients are wanted (T5's table; they must require grad); they are then
    returned as a fourth item, a tuple of gradients summed over all tiles.
    """
    (q, k, v), scale, block_q, block_k = _check_loop_arguments(q, k, v, scale, causal, block_q, block_k)
    out, lse, grad_out, grad_lse = _check_saved(q, v, out, lse, grad_out, grad_lse)
    tile_mod = _tile_mod(score_mod, q, k)
    inputs = tuple(score_mod_inputs)
    for index, x in enumerate(inputs):
        check_tensor(x, f"score_mod_inputs[{index}]", floating=True)
        if not x.requires_grad:
            raise ValueError(
                f"score_mod_inputs[{index}] must require grad: its gradient is what is asked for"
            )
    T, S = q.shape[2], k.shape[2]

    # D_i = sum_d dO_id O_id equals sum_j P_ij dP_ij: the softmax Jacobian's correction term.
    delta = (grad_out * out).sum(dim=-1)
    # A row that saw no key has lse = -inf and P = 0: use +inf so exp(s - lse) is 0, not NaN.
    safe_lse = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse)
    grad_q, grad_k, grad_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    grad_inputs = [torch.zeros_like(x) for x in inputs]
    for k_rows in _blocks(S, block_k):
        cols = slice(*k_rows)
        k_block, v_block = k[:, :, cols], v[:, :, cols]
        grad_k_block, grad_v_block = torch.zeros_like(k_block), torch.zeros_like(v_block)
        for q_rows in _blocks(T, block_q):
            visibility = _visibility(q_rows, k_rows, S - T, causal)
            if visibility == "none":
                continue
            rows = slice(*q_rows)
            # d lse / d s = P, so a gradient on the logsumexp adds to (dP - D).
            row_terms = grad_lse[:, :, rows] - delta[:, :, rows]
            if tile_mod is None:
                scores = _block_scores(q[:, :, rows], k_block, visibility, q_rows, k_rows, S - T, scale)
                tile_q, tile_k, tile_v = tile_gradients(
                    q[:, :, rows],
                    k_block,
                    v_block,
                    grad_out[:, :, rows],
                    scores,
                    safe_lse[:, :, rows],
                    row_terms,
                    scale,
                )
            else:
                raw_scores = _block_scores(q[:, :, rows], k_block, "full", q_rows, k_rows, S - T, scale)
                tile_q, tile_k, tile_v, tile_inputs = _tile_gradients_through_mod(
                    q[:, :, rows],
                    k_block,
                    v_block,
                    grad_out[:, :, rows],
                    raw_scores,
                    tile_mod,
                    (q_rows, k_rows, visibility, S - T),
                    safe_lse[:, :, rows],
                    row_terms,
                    scale,
                    inputs,
                )
                for total, part in zip(grad_inputs, tile_inputs, strict=True):
                    total += part
            grad_q[:, :, rows] += tile_q
            grad_k_block += tile_k
            grad_v_block += tile_v
        grad_k[:, :, cols] = grad_k_block
        grad_v[:, :, cols] = grad_v_block
    if inputs:
        return grad_q, grad_k, grad_v, tuple(grad_inputs)
    return grad_q, grad_k, grad_v


# --- flash_attention: the loops behind autograd ---------------------------------------------------

_FORWARDS = {"fa1": flash_forward_fa1, "fa2": flash_forward_fa2}


class _FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, block_q, block_k, loop_order, score_mod, *mod_inputs):
        # Half-precision inputs are computed in float32; float64 stays float64 (gradient checks).
        settings = dict(scale=scale, causal=causal, block_q=block_q, block_k=block_k, score_mod=score_mod)
        out, lse = _FORWARDS[loop_order](q, k, v, **settings)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, *mod_inputs)
        ctx.settings = settings
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, *mod_inputs = ctx.saved_tensors
        grads = flash_backward(
            q, k, v, out, lse, grad_out, grad_lse=grad_lse, score_mod_inputs=tuple(mod_inputs), **ctx.settings
        )
        grad_qkv = tuple(g.to(x.dtype) for g, x in zip(grads[:3], (q, k, v), strict=True))
        grad_inputs = grads[3] if mod_inputs else ()
        return grad_qkv + (None,) * 6 + tuple(grad_inputs)


def _check_flash_arguments(q, k, v, causal, scale, block_q, block_k, loop_order):
    _, scale, block_q, block_k = _check_loop_arguments(q, k, v, scale, causal, block_q, block_k)
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
    score_mod: ScoreMod | None = None,
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
        stats: a :class:`FlashStats` to add the counts of tiles computed and skipped and of the
            elements read from and written to HBM to (per batch element and head).
        score_mod: ``score_mod(score, batch, head, query_index, key_index) -> score``, FlexAttention's
            signature, applied to each tile's scaled scores before the causal mask: a bias that is a
            function of the positions (:func:`alibi_score_mod`, T5's
            :func:`course_lib.relative_positions.t5_score_mod`, :func:`soft_cap_score_mod`) costs
            one small tensor per tile and never a ``T x S`` one. The indices are integer tensors
            that broadcast against the tile, counted from 0 in q and in k. Gradients reach the
            tensors it reads that require grad (a learned table): see :func:`flash_backward`.

    Returns:
        ``(B, H, T, D_v)`` in the input dtype (and the float32/float64 logsumexp). A query that
        sees no key gets zeros and logsumexp ``-inf``. Differentiable through a hand-written
        backward that saves only q, k, v, the output and the logsumexp.
    """
    scale, block_q, block_k = _check_flash_arguments(q, k, v, causal, scale, block_q, block_k, loop_order)
    check_bool(return_lse, "return_lse")
    if stats is not None and not isinstance(stats, FlashStats):
        raise TypeError(f"stats must be a FlashStats or None, got {type(stats).__name__}")
    mod_inputs = ()
    if score_mod is not None:
        _tile_mod(score_mod, q, k)  # checks it is callable
        mod_inputs = _score_mod_leaves(score_mod, compute_dtype(q), q.device)
    out, lse = _FlashAttentionFunction.apply(
        q, k, v, scale, causal, block_q, block_k, loop_order, score_mod, *mod_inputs
    )
    if stats is not None:
        schedule = tile_schedule(
            q.shape[2], k.shape[2], block_q=block_q, block_k=block_k, causal=causal, loop_order=loop_order
        )
        _count_io(stats, schedule, q.shape[2], q.shape[3], v.shape[3], loop_order)
    return (out, lse) if return_lse else out


# --- instrumentation: the schedule, what it moves, and a step-by-step trace ----------------------


class Tile(NamedTuple):
    """One (Q block, K block) pair of a loop's schedule.

    ``visibility`` is ``"full"``, ``"partial"`` (cut by the causal diagonal) or ``"none"`` (wholly
    above it: the loops skip the tile without loading it).
    """

    q_block: int
    k_block: int
    q_rows: tuple[int, int]
    k_rows: tuple[int, int]
    visibility: str


def tile_schedule(
    T: int,
    S: int,
    *,
    block_q: int = 64,
    block_k: int = 64,
    causal: bool = False,
    loop_order: str = "fa2",
) -> list[Tile]:
    """Every (Q block, K block) pair in the order the chosen loop visits it, skipped ones included.

    ``"fa2"`` walks the K blocks of Q block 0, then of Q block 1, ...; ``"fa1"`` walks the Q blocks
    of K block 0, then of K block 1, ... — the loop nests of :func:`flash_forward_fa2` and
    :func:`flash_forward_fa1`.
    """
    T, S = check_int(T, "T", min=0), check_int(S, "S", min=0)
    block_q, block_k = check_int(block_q, "block_q", min=1), check_int(block_k, "block_k", min=1)
    check_bool(causal, "causal")
    check_choice(loop_order, "loop_order", _FORWARDS)
    q_blocks, k_blocks = _blocks(T, block_q), _blocks(S, block_k)
    if loop_order == "fa2":
        pairs = [(i, j) for i in range(len(q_blocks)) for j in range(len(k_blocks))]
    else:
        pairs = [(i, j) for j in range(len(k_blocks)) for i in range(len(q_blocks))]
    return [
        Tile(i, j, q_blocks[i], k_blocks[j], _visibility(q_blocks[i], k_blocks[j], S - T, causal))
        for i, j in pairs
    ]


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


def _count_io(stats: FlashStats, schedule: list[Tile], T: int, D: int, Dv: int, loop_order: str) -> None:
    """Add to ``stats`` the tiles of ``schedule`` and the HBM traffic of the loop that walks it."""
    if loop_order == "fa2":
        stats.elements_read += T * D  # each Q block is read once and stays on chip
        stats.elements_written += T * (Dv + 1)  # its O and logsumexp are written once, at the end
    else:
        stats.elements_written += T * Dv + 2 * T  # O = 0, m = -inf, l = 0 initialised in HBM
    loaded = set()
    for tile in schedule:
        stats.block_pairs += 1
        if tile.visibility == "none":
            stats.blocks_skipped += 1
            continue
        stats.blocks_computed += 1
        rows, keys = tile.q_rows[1] - tile.q_rows[0], tile.k_rows[1] - tile.k_rows[0]
        if loop_order == "fa2":
            stats.elements_read += keys * (D + Dv)  # K_j, V_j for every tile computed
        else:
            if tile.k_block not in loaded:  # K_j, V_j come on chip once, when first needed
                stats.elements_read += keys * (D + Dv)
                loaded.add(tile.k_block)
            stats.elements_read += rows * (D + Dv + 2)  # Q_i and the O_i, m_i, l_i it updates
            stats.elements_written += rows * (Dv + 2)
    if loop_order == "fa1":
        stats.elements_read += 2 * T  # m and l, read once more for the logsumexp
        stats.elements_written += T


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


@torch.no_grad()
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
    score_mod: ScoreMod | None = None,
) -> list[TileStep]:
    """Walk the tiles in the chosen loop's order and record every step (for the tile-walk widget).

    Same arguments as :func:`flash_attention`; returns one :class:`TileStep` per (Q block, K block)
    pair in the order the chosen loop visits them, skipped tiles included. Each step folds its
    tile into the running state of its Q block with the loops' own fold, so after the last tile
    of a Q block its ``output`` is that block of the attention output.
    """
    scale, block_q, block_k = _check_flash_arguments(q, k, v, causal, scale, block_q, block_k, loop_order)
    dtype = compute_dtype(q)
    q, k, v = (x.detach().to(dtype) for x in (q, k, v))
    tile_mod = _tile_mod(score_mod, q, k)
    T, S = q.shape[2], k.shape[2]
    row_max, row_sum, accumulator = start_fold(q.shape[:3], v.shape[3], dtype=dtype, device=q.device)
    steps: list[TileStep] = []
    for tile in tile_schedule(T, S, block_q=block_q, block_k=block_k, causal=causal, loop_order=loop_order):
        rows, cols = slice(*tile.q_rows), slice(*tile.k_rows)
        if tile.visibility != "none":
            scores = _block_scores(
                q[:, :, rows],
                k[:, :, cols],
                tile.visibility,
                tile.q_rows,
                tile.k_rows,
                S - T,
                scale,
                score_mod=tile_mod,
            )
            row_max[:, :, rows], row_sum[:, :, rows], accumulator[:, :, rows] = fold_block(
                row_max[:, :, rows], row_sum[:, :, rows], accumulator[:, :, rows], scores, v[:, :, cols]
            )
        output, _ = finish_fold(row_max[:, :, rows], row_sum[:, :, rows], accumulator[:, :, rows])
        steps.append(
            TileStep(
                len(steps),
                tile.q_block,
                tile.k_block,
                tile.q_rows,
                tile.k_rows,
                tile.visibility == "none",
                row_max[:, :, rows].clone(),
                row_sum[:, :, rows].clone(),
                output,
            )
        )
    return steps
