"""FlashAttention in PyTorch: exact attention computed tile by tile, forward and backward.

The loops are those of the papers, written with PyTorch ops on blocks so every step can be read
and checked; a real kernel runs one Q block per thread block and keeps the tiles in SRAM. They are
also as fast as plain PyTorch allows (within about 1.5x of SDPA's fused kernel on a CPU): every
product is a batched matmul over (batch, head) into a reused buffer, the online softmax of
:mod:`.online_softmax` runs in place and in base 2 (:func:`.online_softmax.fold_block_`), the scale
is folded into Q once, the masks of the diagonal tiles are built once, and a decoding query takes
its whole cache in one step (:func:`_keys_per_step`).

- :func:`flash_forward_fa2` (Dao, 2023): the outer loop walks Q blocks, the inner loop K/V blocks.
  A Q block's accumulator stays on chip, is rescaled only by ``exp(m_old - m_new)`` and is
  divided by l once at the end; the logsumexp ``m + log(l)`` is kept for the backward pass.
- :func:`flash_forward_fa1` (Dao et al., 2022, Algorithm 1): the outer loop walks K/V blocks, the
  inner loop Q blocks. O, the running max m and sum l live in "HBM" (full tensors); each step
  reads them, folds the tile in, normalises O again and writes them back.
- :func:`flash_backward` saves nothing but q, k, v, O and the logsumexp, and recomputes each block
  of P from them: ``P = exp(s - lse)``, ``dS = P * (dP - D)`` with ``D = rowsum(dO * O)``
  (:func:`tile_gradients` is one step, written plainly).

All three take a score modification ``score_mod(score, batch, head, query_index, key_index)``
(FlexAttention's signature), computed on each tile: ALiBi (:func:`alibi_score_mod`), T5's buckets,
a soft cap (:func:`soft_cap_score_mod`) without ever building a ``T x S`` bias, with gradients
through the modification and into a learned table.

:func:`flash_attention` puts these loops behind autograd. The last part of the module is the
instrumentation of chapter 03, kept out of the loops: :func:`tile_schedule` lists the tiles in
the order a loop visits them, :class:`FlashStats` counts what that schedule moves between HBM and
chip, and :func:`flash_attention_trace` replays it with the readable fold
(:func:`.online_softmax.fold_block`), recording every step.
"""

from __future__ import annotations

import math
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
from .online_softmax import LOG2E, _finite_or_zero, finish_fold, fold_block, fold_block_, start_fold

__all__ = [
    "BLOCK_Q",
    "BLOCK_K",
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

# The default tile: 256 query rows by 256 keys, fixed, so that results, stored outputs and IO counts
# are the same on every machine (tuning for one machine is an opt-in of the benchmark). A GPU kernel
# keeps 64-128 x 64-128 tiles in SRAM; this loop of PyTorch ops pays a few microseconds of Python
# and op launches per step on a CPU, and a kernel launch per op on a GPU, so it takes tiles large
# enough for the matmuls to dominate. Of the sizes tried on a 2-core CPU (64 to 512 each way),
# 256 x 256 was among the fastest, forward and backward.
BLOCK_Q, BLOCK_K = 256, 256
LN2 = 0.6931471805599453  # ln(2): the logsumexp back from base 2, (m + log2 l) ln 2 = m / log2(e) + ln l


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


def _keys_per_step(rows: int, block_q: int, block_k: int) -> int:
    """How many keys a step of the loops takes for a Q block of ``rows`` rows.

    ``block_k``, or more when the block has fewer rows than ``block_q``, so that a step always
    holds up to ``block_q x block_k`` scores. With the default 256 x 256 tiles a decoding query
    (T = 1) thus walks a cache of 64K keys in one step instead of 256 small ones, each paying the
    same Python and op-launch overhead: FlashDecoding's one large key block. (Splitting those keys
    into parallel chunks pays on a GPU with idle units, not on a CPU's few cores.)
    The IO counts of :class:`FlashStats` are those of the ``block_q x block_k`` tiles.
    """
    return block_k * max(1, block_q // max(rows, 1))


def _block_scores(q_block, k_block, visibility, q_rows, k_rows, offset, scale=None, score_mod=None):
    """Scores of one tile, -inf where causal forbids; ``scale=None`` if q_block is pre-scaled.

    The readable form, used by the instrumented trace; ``score_mod`` is ``None`` or a
    :class:`_TileMod`: the score modification with its index tensors.
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


class _Workspace:
    """What every step of a loop reuses: its tiles of scores and accumulators, and the causal masks
    of the tiles cut by the diagonal, each built once.

    ``get(name, *shape)`` is a contiguous tensor of that shape in a flat buffer kept for ``name``
    (grown if a later step needs more), written by ``torch.bmm(..., out=)`` or accumulated in
    place. Contiguous matters: ``baddbmm_`` into a strided view runs one small matmul per batch
    element. A diagonal tile's mask depends only on its shape and on where the diagonal crosses
    it (``q_start + offset - k_start``): with equal blocks there is one such mask.
    """

    def __init__(self, like: torch.Tensor):
        self.like = like
        self.buffers: dict[str, torch.Tensor] = {}
        self.masks: dict[tuple[int, int, int], torch.Tensor] = {}

    def get(self, name: str, *shape: int) -> torch.Tensor:
        size = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < size:
            buffer = self.buffers[name] = self.like.new_empty(size)
        return buffer[:size].view(shape)

    def mask_(
        self, scores: torch.Tensor, q_rows: tuple[int, int], k_rows: tuple[int, int], offset: int
    ) -> None:
        """Set the keys that causal masking forbids (``j > i + offset``) to ``-inf``, in place."""
        rows, keys = scores.shape[-2:]
        diagonal = q_rows[0] + offset - k_rows[0]
        mask = self.masks.get((rows, keys, diagonal))
        if mask is None:
            i = torch.arange(rows, device=scores.device).unsqueeze(1)
            j = torch.arange(keys, device=scores.device).unsqueeze(0)
            mask = self.masks[(rows, keys, diagonal)] = j - i > diagonal
        scores.masked_fill_(mask, float("-inf"))


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


def _as_batched_matrices(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, n, d)`` as ``(B * H, n, d)``: batch and heads become the batch of ``torch.bmm``."""
    return x.reshape(x.shape[0] * x.shape[1], x.shape[2], x.shape[3])


def flash_forward_fa2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    score_mod: ScoreMod | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2's forward pass: Q blocks outside, K/V blocks inside, normalise once.

    q ``(B, H, T, D)``, k ``(B, H, S, D)``, v ``(B, H, S, D_v)``; ``scale`` defaults to ``D ** -0.5``;
    ``causal`` aligns the diagonal to the end. Returns ``(out, lse)``: ``(B, H, T, D_v)`` and the
    ``(B, H, T)`` logsumexp, in float32 (float64 stays float64). A query that sees no key gets
    zeros and logsumexp ``-inf``. ``score_mod(score, batch, head, query_index, key_index)``, if
    given, modifies each tile's scaled scores before the causal mask (see :func:`flash_attention`).
    No autograd of its own: :func:`flash_attention` adds the backward.

    Written to be as fast as PyTorch ops allow: every product is a batched matmul into a reused
    buffer, the online softmax works in place (:func:`.online_softmax.fold_block_`) and in base 2,
    the scale is folded into Q once, the diagonal tiles' masks are built once, and each Q block's
    output is accumulated in a contiguous buffer and written out once, normalised.
    """
    (q, k, v), scale, block_q, block_k = _check_loop_arguments(q, k, v, scale, causal, block_q, block_k)
    tile_mod = _tile_mod(score_mod, q, k)
    B, H, T, _ = q.shape
    S, Dv, offset = k.shape[2], v.shape[3], k.shape[2] - q.shape[2]
    q, k, v = (_as_batched_matrices(x) for x in (q, k, v))
    # The scale folded into Q once, with log2(e): every exponential of the fold is an exp2. A score
    # modification needs the natural scores, so it gets Q times the scale, and log2(e) after it.
    q = q * (scale if tile_mod is not None else scale * LOG2E)
    out, lse = q.new_empty(B * H, T, Dv), q.new_empty(B * H, T)
    work = _Workspace(q)
    for q_rows in _blocks(T, block_q):
        rows, count = slice(*q_rows), q_rows[1] - q_rows[0]
        # The Q block's running state, on chip: O~ (unnormalised) and l; m is kept where it is stored.
        accumulator = work.get("accumulator", B * H, count, Dv).zero_()
        row_sum = work.get("row_sum", B * H, count).zero_()
        row_max = lse[:, rows].fill_(float("-inf"))
        for k_rows in _blocks(S, _keys_per_step(count, block_q, block_k)):
            visibility = _visibility(q_rows, k_rows, offset, causal)
            if visibility == "none":
                break  # this K block and all later ones lie above the diagonal: never loaded
            cols, keys = slice(*k_rows), k_rows[1] - k_rows[0]
            scores = work.get("scores", B * H, count, keys)
            torch.bmm(q[:, rows], k[:, cols].transpose(1, 2), out=scores)
            if tile_mod is not None:
                modified = tile_mod(scores.view(B, H, count, keys), q_rows, k_rows)
                scores = modified.reshape(B * H, count, keys) * LOG2E
            if visibility == "partial":
                work.mask_(scores, q_rows, k_rows, offset)
            fold_block_(row_max, row_sum, accumulator, scores, v[:, cols])
        # Normalise once: O = O~ / l, written to HBM, and the logsumexp m + ln(l) back from base 2.
        torch.div(accumulator, torch.where(row_sum > 0, row_sum, 1).unsqueeze(-1), out=out[:, rows])
        row_max.add_(row_sum.log2()).mul_(LN2)
    return out.view(B, H, T, Dv), lse.view(B, H, T)


def flash_forward_fa1(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    score_mod: ScoreMod | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention's (2022) forward pass: K/V blocks outside, Q blocks inside.

    O, the running max m and the running sum l are full tensors in HBM. Each K/V block comes on
    chip once; every Q block then reads its rows of O, m and l, merges the tile's own statistics
    into them and writes them back, with O normalised again at every step (Algorithm 1 of the
    paper). Same arguments and result as :func:`flash_forward_fa2`, and the same fast PyTorch.
    """
    (q, k, v), scale, block_q, block_k = _check_loop_arguments(q, k, v, scale, causal, block_q, block_k)
    tile_mod = _tile_mod(score_mod, q, k)
    B, H, T, _ = q.shape
    S, Dv, offset = k.shape[2], v.shape[3], k.shape[2] - q.shape[2]
    q, k, v = (_as_batched_matrices(x) for x in (q, k, v))
    q = q * (scale if tile_mod is not None else scale * LOG2E)
    # O, m (in log2 units) and l in "HBM", read and written back by every step.
    out = q.new_zeros(B * H, T, Dv)
    row_max, row_sum = q.new_full((B * H, T), float("-inf")), q.new_zeros(B * H, T)
    work = _Workspace(q)
    for k_rows in _blocks(S, block_k):
        cols, keys = slice(*k_rows), k_rows[1] - k_rows[0]
        for q_rows in _blocks(T, block_q):
            visibility = _visibility(q_rows, k_rows, offset, causal)
            if visibility == "none":
                continue
            rows, count = slice(*q_rows), q_rows[1] - q_rows[0]
            scores = work.get("scores", B * H, count, keys)
            torch.bmm(q[:, rows], k[:, cols].transpose(1, 2), out=scores)
            if tile_mod is not None:
                modified = tile_mod(scores.view(B, H, count, keys), q_rows, k_rows)
                scores = modified.reshape(B * H, count, keys) * LOG2E
            if visibility == "partial":
                work.mask_(scores, q_rows, k_rows, offset)
            # The tile on its own, on chip: its max m~, the sum l~ of P~ = 2 ** (s - m~), and P~ V.
            block_max = work.get("block_max", B * H, count).fill_(float("-inf"))
            block_sum = work.get("block_sum", B * H, count).zero_()
            block_values = work.get("block_values", B * H, count, Dv).zero_()
            fold_block_(block_max, block_sum, block_values, scores, v[:, cols])
            # Merge it with the rows' m, l and O read from HBM. O is stored normalised, so the old
            # O is weighted by its rescaled sum, the tile by its rescale factor, and the whole
            # divided by the new sum: the extra non-matmul work that FA2 removes.
            old_max, old_sum, old_out = row_max[:, rows], row_sum[:, rows], out[:, rows]
            new_max = torch.maximum(old_max, block_max)
            shift = _finite_or_zero(new_max)
            old_weight = (old_max - shift).exp2_().mul_(old_sum)
            new_weight = (block_max - shift).exp2_()
            new_sum = block_sum.mul_(new_weight).add_(old_weight)
            old_out.mul_(old_weight.unsqueeze(-1)).addcmul_(block_values, new_weight.unsqueeze(-1))
            old_out.div_(torch.where(new_sum > 0, new_sum, 1).unsqueeze(-1))
            old_max.copy_(new_max)
            old_sum.copy_(new_sum)
    lse = row_max.add_(row_sum.log2()).mul_(LN2)
    return out.view(B, H, T, Dv), lse.view(B, H, T)


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
    scale dS^T Q, P^T dO)``: this tile's additions to dQ, dK and dV. The readable form of one
    step of :func:`flash_backward` (ring attention uses it).
    """
    probabilities = torch.exp(scores - lse.unsqueeze(-1))
    grad_scores = probabilities * (grad_out @ v.transpose(-2, -1) + row_terms.unsqueeze(-1))
    grad_q = scale * (grad_scores @ k)
    grad_k = scale * (grad_scores.transpose(-2, -1) @ q)
    return grad_q, grad_k, probabilities.transpose(-2, -1) @ grad_out


def _tile_gradients_through_mod(
    tile_mod, shape, q_block, k_block, v_block, grad_out, tile, lse, delta, inputs
):
    """P and dS of one tile whose scores go through a score modification, and the gradients of
    ``inputs`` (the tensors it reads, e.g. T5's table); ``q_block`` is Q times the scale.

    The modified scores are recomputed with autograd on, ``dS~ = P (dP - D)`` is formed for them
    as usual, and one ``autograd.grad`` carries it back through the modification to the raw
    scores and to ``inputs`` (zeros where the tile does not reach one).
    """
    (B, H, count, keys), (q_rows, k_rows, visibility, offset) = shape, tile
    with torch.enable_grad():
        raw = torch.bmm(q_block, k_block.transpose(1, 2)).requires_grad_()
        modified = tile_mod(raw.view(B, H, count, keys), q_rows, k_rows)
    scores = modified.detach().reshape(B * H, count, keys)
    if visibility == "partial":
        scores = _block_scores_mask(scores, q_rows, k_rows, offset)
    probabilities = torch.exp(scores - lse.unsqueeze(-1))
    grad_modified = (grad_out @ v_block.transpose(1, 2)).sub_(delta.unsqueeze(-1)).mul_(probabilities)
    # retain_graph: the modification may read a tensor computed outside (a table times a parameter)
    # whose graph every tile goes back through.
    grads = torch.autograd.grad(
        modified,
        (raw, *inputs),
        grad_modified.view(B, H, count, keys),
        retain_graph=True,
        allow_unused=True,
        materialize_grads=True,
    )
    return probabilities, grads[0], grads[1:]


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
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    score_mod: ScoreMod | None = None,
    score_mod_inputs: tuple[torch.Tensor, ...] = (),
) -> tuple[torch.Tensor, ...]:
    """FlashAttention-2's backward pass: K/V blocks outside, Q blocks inside, P recomputed per tile.

    q, k, v as in :func:`flash_forward_fa2`; ``out`` ``(B, H, T, D_v)`` and ``lse`` ``(B, H, T)`` are
    what the forward returned, ``grad_out`` the gradient on ``out`` and ``grad_lse`` (optional) the
    gradient on ``lse``. Returns ``(grad_q, grad_k, grad_v)`` in the compute dtype. dK_j and dV_j
    are accumulated on chip for one K/V block; each tile adds its share to dQ. Every step is the
    five matmuls of :func:`tile_gradients` into reused buffers, with P recomputed in base 2.

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
    B, H, T, _ = q.shape
    S, offset = k.shape[2], k.shape[2] - q.shape[2]
    q, k, v, out, grad_out = (_as_batched_matrices(x) for x in (q, k, v, out, grad_out))
    lse, grad_lse = lse.reshape(B * H, T), grad_lse.reshape(B * H, T)

    # D_i = sum_d dO_id O_id equals sum_j P_ij dP_ij, the softmax Jacobian's correction term; a
    # gradient g on the logsumexp adds g P (d lse / d s = P): dS = P (dP - D + g).
    delta = (grad_out * out).sum(dim=-1).sub_(grad_lse)
    # A row that saw no key has lse = -inf and P = 0: use +inf so 2 ** (s - lse) is 0, not NaN.
    safe_lse = torch.where(torch.isinf(lse), float("inf"), lse)
    if tile_mod is None:  # P = 2 ** (s log2(e) - lse log2(e)): the scale and log2(e) folded once
        q_scaled, safe_lse = q * (scale * LOG2E), safe_lse * LOG2E
    else:
        q_scaled = q * scale
    grad_q, grad_k, grad_v = torch.zeros_like(q), torch.empty_like(k), torch.empty_like(v)
    grad_inputs = [torch.zeros_like(x) for x in inputs]
    work = _Workspace(q)
    for k_rows in _blocks(S, _keys_per_step(min(T, block_q), block_q, block_k)):
        cols, keys = slice(*k_rows), k_rows[1] - k_rows[0]
        k_block, v_block = k[:, cols], v[:, cols]
        # dK_j and dV_j stay on chip for the whole inner loop and are written to HBM once, after it.
        grad_k_block = work.get("grad_k", B * H, keys, k.shape[2]).zero_()
        grad_v_block = work.get("grad_v", B * H, keys, v.shape[2]).zero_()
        for q_rows in _blocks(T, block_q):
            visibility = _visibility(q_rows, k_rows, offset, causal)
            if visibility == "none":
                continue
            rows, count = slice(*q_rows), q_rows[1] - q_rows[0]
            if tile_mod is None:
                # P = 2 ** (s - lse), recomputed in the scores buffer.
                probabilities = work.get("probabilities", B * H, count, keys)
                torch.bmm(q_scaled[:, rows], k_block.transpose(1, 2), out=probabilities)
                if visibility == "partial":
                    work.mask_(probabilities, q_rows, k_rows, offset)
                probabilities.sub_(safe_lse[:, rows].unsqueeze(-1)).exp2_()
                # dS = P (dP - D), with dP = dO V^T, in the second buffer.
                grad_scores = work.get("grad_scores", B * H, count, keys)
                torch.bmm(grad_out[:, rows], v_block.transpose(1, 2), out=grad_scores)
                grad_scores.sub_(delta[:, rows].unsqueeze(-1)).mul_(probabilities)
            else:
                probabilities, grad_scores, tile_inputs = _tile_gradients_through_mod(
                    tile_mod,
                    (B, H, count, keys),
                    q_scaled[:, rows],
                    k_block,
                    v_block,
                    grad_out[:, rows],
                    (q_rows, k_rows, visibility, offset),
                    safe_lse[:, rows],
                    delta[:, rows],
                    inputs,
                )
                grad_scores = grad_scores.reshape(B * H, count, keys)
                for total, part in zip(grad_inputs, tile_inputs, strict=True):
                    total += part
            grad_v_block.baddbmm_(probabilities.transpose(1, 2), grad_out[:, rows])  # dV_j += P^T dO_i
            grad_k_block.baddbmm_(grad_scores.transpose(1, 2), q[:, rows], alpha=scale)  # dK_j += s dS^T Q_i
            # dQ_i += scale dS K_j, added in HBM (a GPU kernel adds it atomically).
            grad_q_tile = work.get("grad_q", B * H, count, k.shape[2])
            grad_q[:, rows].add_(torch.bmm(grad_scores, k_block, out=grad_q_tile), alpha=scale)
        grad_k[:, cols], grad_v[:, cols] = grad_k_block, grad_v_block
    grads = tuple(g.view(B, H, *g.shape[1:]) for g in (grad_q, grad_k, grad_v))
    if inputs:
        return *grads, tuple(grad_inputs)
    return grads


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
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
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
        block_q, block_k: rows of q and of k/v per tile, :data:`BLOCK_Q` x :data:`BLOCK_K` =
            256 x 256 by default; any size, including 1 or more than T. A Q block of fewer rows
            (decoding: T = 1) takes proportionally more keys per step (:func:`_keys_per_step`).
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
        backward that saves only q, k, v, the output and the logsumexp (and the tensors a score
        modification reads).
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
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    causal: bool = False,
    loop_order: str = "fa2",
) -> list[Tile]:
    """Every (Q block, K block) pair in the order the chosen loop visits it, skipped ones included.

    ``"fa2"`` walks the K blocks of Q block 0, then of Q block 1, ...; ``"fa1"`` walks the Q blocks
    of K block 0, then of K block 1, ... — the loop nests of :func:`flash_forward_fa2` and
    :func:`flash_forward_fa1` (whose FA2 loop takes several of a short Q block's K blocks in one
    step: :func:`_keys_per_step`).
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
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
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
