"""Ring attention: exact attention over a sequence split across processes (sequence parallelism).

Each of ``W`` ranks holds one block of the queries and one block of the keys/values. In ``W``
steps the key/value blocks travel around a ring — rank ``r`` sends its current block to
``r + 1`` and receives the next from ``r - 1`` — while every rank attends its queries to the
block it holds and folds the partial result into a running output with the online-softmax
merge of chapter 03 (:func:`course_lib.tiling.combine_partials`). Sending the next block while
computing on the current one hides the communication, and no rank ever holds more than two
key/value blocks. The all-gather variant (:func:`all_gather_attention`) collects every block
first: the same bytes leave each rank, but each rank then holds the whole K/V.

Causal attention skips pairs of blocks that lie entirely in the future. With contiguous blocks
that makes the work lopsided: rank 0 computes one block pair, rank ``W - 1`` computes ``W``, and
everyone waits for the last. The **zig-zag** layout cuts the sequence into ``2W`` chunks and
gives rank ``r`` chunks ``r`` and ``2W - 1 - r`` — one early, one late — so every rank gets the
same amount of unmasked work (:func:`ring_work`). Positions, not block order, decide the mask,
so the same ring loop serves both layouts: shard with :func:`shard_sequence`, put back together
with :func:`unshard_sequence`.

The ring is differentiable. Point-to-point messages carry no autograd history between processes,
so :func:`ring_attention` has a hand-written backward that is a second ring, FlashAttention's
backward (chapter 03) spread over ranks: each rank keeps its Q, dO, O and the forward's per-row
logsumexp, recomputes the softmax weights ``P = exp(scale * Q K^T - lse)`` of each block pair,
adds its share to its own dQ, and to dK/dV accumulators that travel around the ring behind their
K/V block. After ``W`` hops every accumulator is back at the rank that owns the block.

:func:`run_ring_attention` launches ``W`` CPU processes (gloo backend, loopback only), runs the
ring (forward, and backward when given ``grad_output``) and gathers the result; with as many
GPUs as ranks it can use NCCL.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..checks import (
    check_attention_inputs,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_shape,
    check_tensor,
)
from ..standard import attention
from ..tiling import combine_partials, tile_gradients

__all__ = [
    "shard_positions",
    "shard_sequence",
    "unshard_sequence",
    "ring_attention",
    "all_gather_attention",
    "RingStats",
    "CommunicationCost",
    "communication_cost",
    "ring_work",
    "run_distributed",
    "run_ring_attention",
]

LAYOUTS = ("contiguous", "zigzag")
METHODS = ("ring", "all_gather")


# --- sharding: which positions each rank holds -------------------------------------------------


def shard_positions(seq_len: int, world_size: int, rank: int, *, layout: str = "contiguous") -> torch.Tensor:
    """Global positions held by ``rank`` (a sorted ``LongTensor``).

    ``"contiguous"``: the sequence cut into ``world_size`` consecutive blocks (sizes differ by at
    most one). ``"zigzag"``: cut into ``2 * world_size`` chunks; rank ``r`` holds chunks ``r`` and
    ``2 * world_size - 1 - r``.
    """
    seq_len = check_int(seq_len, "seq_len", min=1)
    world_size = check_int(world_size, "world_size", min=1)
    rank = check_int(rank, "rank", min=0, max=world_size - 1)
    check_choice(layout, "layout", LAYOUTS)
    return torch.cat(_shard_chunks(seq_len, world_size, rank, layout))


def _shard_chunks(seq_len: int, world_size: int, rank: int, layout: str) -> list[torch.Tensor]:
    """The chunks of positions ``rank`` holds: one block, or the zig-zag's early and late chunk."""
    positions = torch.arange(seq_len)
    if layout == "contiguous":
        return [positions.tensor_split(world_size)[rank]]
    chunks = positions.tensor_split(2 * world_size)
    return [chunks[rank], chunks[2 * world_size - 1 - rank]]


def shard_sequence(
    x: torch.Tensor, world_size: int, *, layout: str = "contiguous", dim: int = 2
) -> list[torch.Tensor]:
    """Split ``x`` along ``dim`` (the sequence dim of ``(B, H, T, D)``) into one shard per rank."""
    check_tensor(x, "x")
    world_size = check_int(world_size, "world_size", min=1)
    dim = check_int(dim, "dim", min=-x.dim(), max=x.dim() - 1)
    length = check_int(x.shape[dim], "x.shape[dim]", min=1)
    return [
        x.index_select(dim, shard_positions(length, world_size, rank, layout=layout).to(x.device))
        for rank in range(world_size)
    ]


def unshard_sequence(shards: list[torch.Tensor], *, layout: str = "contiguous", dim: int = 2) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: put the per-rank shards back in sequence order."""
    if isinstance(shards, torch.Tensor) or not isinstance(shards, (list, tuple)) or len(shards) == 0:
        raise TypeError("shards must be a non-empty list of tensors")
    for index, shard in enumerate(shards):
        check_tensor(shard, f"shards[{index}]")
    world_size = len(shards)
    dim = check_int(dim, "dim", min=-shards[0].dim(), max=shards[0].dim() - 1)
    length = sum(shard.shape[dim] for shard in shards)
    order = torch.cat([shard_positions(length, world_size, r, layout=layout) for r in range(world_size)])
    for rank, shard in enumerate(shards):
        expected = len(shard_positions(length, world_size, rank, layout=layout))
        if shard.shape[dim] != expected:
            raise ValueError(
                f"shards[{rank}] must hold {expected} positions for layout={layout!r}, got {shard.shape[dim]}"
            )
    return torch.cat(list(shards), dim=dim).index_select(dim, torch.argsort(order).to(shards[0].device))


def _pieces(chunks: list[torch.Tensor]) -> list[tuple[int, int, int, int]]:
    """Non-empty chunks as ``(local start, local stop, first position, last position)``."""
    pieces, start = [], 0
    for chunk in chunks:
        if len(chunk):
            pieces.append((start, start + len(chunk), int(chunk[0]), int(chunk[-1])))
        start += len(chunk)
    return pieces


def _rank_pieces(causal, length, world_size, rank, local_length, layout):
    """A rank's pieces: the layout's chunks when positions matter (causal), else one piece."""
    if causal:
        return _pieces(_shard_chunks(length, world_size, rank, layout))
    return _pieces([torch.arange(local_length)])


def _pair_plan(q_pieces, k_pieces, causal: bool):
    """The (query piece, key piece) pairs a rank computes; causal skips pairs entirely in the future."""
    return [
        (q_piece, k_piece)
        for q_piece in q_pieces
        for k_piece in k_pieces
        # Skip when every key of the piece comes after every query: nothing to see.
        if not (causal and k_piece[2] > q_piece[3])
    ]


def ring_work(seq_len: int, world_size: int, *, causal: bool = True, layout: str = "contiguous") -> list[int]:
    """Score entries (query x key pairs) each rank computes in :func:`ring_attention` (self-attention).

    Skipped pairs of runs are not counted; a diagonal pair counts in full (it is computed, then
    masked). The maximum over ranks sets the wall time, since every step waits for the slowest.
    """
    check_bool(causal, "causal")
    check_int(world_size, "world_size", min=1, max=check_int(seq_len, "seq_len", min=1))
    check_choice(layout, "layout", LAYOUTS)
    work = []
    for rank in range(world_size):
        q_length = len(shard_positions(seq_len, world_size, rank, layout=layout))
        q_pieces = _rank_pieces(causal, seq_len, world_size, rank, q_length, layout)
        total = 0
        for source in range(world_size):
            k_length = len(shard_positions(seq_len, world_size, source, layout=layout))
            k_pieces = _rank_pieces(causal, seq_len, world_size, source, k_length, layout)
            for q_piece, k_piece in _pair_plan(q_pieces, k_pieces, causal):
                total += (q_piece[1] - q_piece[0]) * (k_piece[1] - k_piece[0])
        work.append(total)
    return work


# --- one block: normalised partial output and its logsumexp -----------------------------------


def _partial_attention(q, k, v, q_positions, k_positions, causal, scale):
    """Attention of ``q`` to one key block: ``(out, lse)``; a row with no visible key has lse -inf."""
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        visible = k_positions.unsqueeze(0) <= q_positions.unsqueeze(1)
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = torch.exp(scores - safe_lse.unsqueeze(-1)) @ v
    return out, lse


@dataclass
class RingStats:
    """What one rank did: bytes it sent and received, score entries it computed, and the most
    key/value blocks it held at once (``kv_blocks_held``)."""

    bytes_sent: int
    bytes_received: int
    score_entries: int
    kv_blocks_held: int


def _setup(q, k, v, causal, scale, group, layout):
    """Shared checks and the global layout: every rank learns every rank's block lengths."""
    B, H, T_local, S_local, D, D_v = check_attention_inputs(q, k, v)
    check_bool(causal, "causal")
    check_choice(layout, "layout", LAYOUTS)
    scale = D**-0.5 if scale is None else check_float(scale, "scale")
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "group: torch.distributed is not initialised (use run_ring_attention or init_process_group)"
        )
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    # Blocks may differ by a token when W does not divide T, so exchange the lengths first.
    lengths = torch.tensor([T_local, S_local], dtype=torch.long, device=q.device)
    gathered = [torch.empty_like(lengths) for _ in range(world_size)]
    dist.all_gather(gathered, lengths, group=group)
    q_lengths = [int(x[0]) for x in gathered]
    kv_lengths = [int(x[1]) for x in gathered]
    T, S = sum(q_lengths), sum(kv_lengths)
    if causal:
        if q_lengths != kv_lengths:
            raise ValueError(
                f"k: causal ring attention needs each rank's keys to match its queries, "
                f"got {kv_lengths} vs {q_lengths}"
            )
        expected = [len(shard_positions(T, world_size, r, layout=layout)) for r in range(world_size)]
        if q_lengths != expected:
            raise ValueError(
                f"q: ranks hold {q_lengths} queries but layout={layout!r} gives {expected}; "
                "shard with shard_sequence"
            )
    return scale, world_size, rank, T, S, q_lengths, kv_lengths


def _packed_kv(k, v, length):
    """K and V in one contiguous message, padded to ``length`` tokens so every rank's block matches."""
    kv = torch.cat([k, v], dim=-1)
    pad = length - kv.shape[2]
    if pad:
        kv = torch.cat([kv, kv.new_zeros(kv.shape[0], kv.shape[1], pad, kv.shape[3])], dim=2)
    return kv.contiguous()


def _key_positions(causal, S, world_size, source, kv_lengths, layout, device):
    if causal:
        return shard_positions(S, world_size, source, layout=layout).to(device)
    return torch.arange(kv_lengths[source], device=device)  # without a mask only the count matters


def _block_gradients(q, k, v, grad_out, lse, delta, q_positions, k_positions, causal, scale):
    """One block pair's share of the gradients, FlashAttention's tile backward: ``(dq, dk, dv)``.

    ``q``/``grad_out``/``lse``/``delta`` are the query rows' ``(B, H, T_b, D)``, ``(B, H, T_b, D_v)``,
    ``(B, H, T_b)`` final logsumexp and ``delta = rowsum(grad_out * out)``; ``k``, ``v`` one key block.
    Global positions decide the causal mask, as in the forward.
    """
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        visible = k_positions.unsqueeze(0) <= q_positions.unsqueeze(1)
        scores = scores.masked_fill(~visible, float("-inf"))
    # A row with lse -inf has only -inf scores; subtracting 0 instead keeps exp at 0, not NaN.
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return tile_gradients(q, k, v, grad_out, scores, safe_lse, -delta, scale)


@dataclass
class _RingPlan:
    """What both rings need, worked out once per call: the layout, this rank's pieces, neighbours."""

    causal: bool
    scale: float
    layout: str
    group: dist.ProcessGroup | None
    world_size: int
    rank: int
    seq_len: int  # T: total queries
    kv_len: int  # S: total keys
    kv_lengths: list[int]
    q_positions: torch.Tensor
    q_pieces: list[tuple[int, int, int, int]]
    send_to: int
    receive_from: int

    def source(self, step: int) -> int:
        """Whose key/value block this rank holds at ``step`` (blocks move from r to r + 1)."""
        return (self.rank - step) % self.world_size

    def block_pairs(self, source: int, device: torch.device):
        """The key positions of ``source``'s block and the (query piece, key piece) pairs to compute."""
        k_positions = _key_positions(
            self.causal, self.kv_len, self.world_size, source, self.kv_lengths, self.layout, device
        )
        k_pieces = _rank_pieces(
            self.causal, self.kv_len, self.world_size, source, self.kv_lengths[source], self.layout
        )
        return k_positions, _pair_plan(self.q_pieces, k_pieces, self.causal)

    def exchange(self, outgoing: torch.Tensor, tag: int = 0) -> tuple[torch.Tensor, list]:
        """Post "send ``outgoing`` to the next rank, receive a same-shaped tensor from the previous".

        Messages in flight together between the same ranks get different ``tag``s, so a block can
        never be matched with an accumulator.
        """
        incoming = torch.empty_like(outgoing)
        requests = dist.batch_isend_irecv(
            [
                dist.P2POp(dist.isend, outgoing, self.send_to, self.group, tag),
                dist.P2POp(dist.irecv, incoming, self.receive_from, self.group, tag),
            ]
        )
        return incoming, requests


def _ring_plan(q, k, v, causal, scale, group, layout) -> _RingPlan:
    scale, world_size, rank, T, S, q_lengths, kv_lengths = _setup(q, k, v, causal, scale, group, layout)
    q_positions = (
        shard_positions(T, world_size, rank, layout=layout).to(q.device)
        if causal
        else torch.arange(q.shape[2], device=q.device)
    )

    def global_rank(group_rank: int) -> int:
        return group_rank if group is None else dist.get_global_rank(group, group_rank)

    return _RingPlan(
        causal=causal,
        scale=scale,
        layout=layout,
        group=group,
        world_size=world_size,
        rank=rank,
        seq_len=T,
        kv_len=S,
        kv_lengths=kv_lengths,
        q_positions=q_positions,
        q_pieces=_rank_pieces(causal, T, world_size, rank, q.shape[2], layout),
        send_to=global_rank((rank + 1) % world_size),
        receive_from=global_rank((rank - 1) % world_size),
    )


def _wait(requests) -> None:
    for request in requests:
        request.wait()


def _ring_forward(q, k, v, plan: _RingPlan):
    """The forward ring: ``(out, lse, stats)`` with out ``(B, H, T_r, D_v)`` and lse ``(B, H, T_r)``
    in the compute dtype (at least float32)."""
    D = q.shape[-1]
    queries = q.to(torch.promote_types(q.dtype, torch.float32))
    out = queries.new_zeros(*q.shape[:3], v.shape[-1])
    lse = queries.new_full(q.shape[:3], float("-inf"))
    current = _packed_kv(
        k, v, max(plan.kv_lengths)
    )  # sent in the input dtype: half inputs send half the bytes
    message_bytes = current.numel() * current.element_size()
    bytes_sent = score_entries = 0
    for step in range(plan.world_size):
        source = plan.source(step)
        if step < plan.world_size - 1:
            # Post the transfer of the next block first, then compute while it is in flight.
            incoming, requests = plan.exchange(current)
            bytes_sent += message_bytes
        block = current[:, :, : plan.kv_lengths[source]].to(queries.dtype)
        keys, values = block[..., :D], block[..., D:]
        k_positions, pairs = plan.block_pairs(source, q.device)
        for (q_start, q_stop, _, _), (k_start, k_stop, _, _) in pairs:
            part_out, part_lse = _partial_attention(
                queries[:, :, q_start:q_stop],
                keys[:, :, k_start:k_stop],
                values[:, :, k_start:k_stop],
                plan.q_positions[q_start:q_stop],
                k_positions[k_start:k_stop],
                plan.causal,
                plan.scale,
            )
            # The online-softmax merge of chapter 03: rescale both by exp(lse_i - lse_total).
            merged_out, merged_lse = combine_partials(
                [out[:, :, q_start:q_stop], part_out], [lse[:, :, q_start:q_stop], part_lse]
            )
            out[:, :, q_start:q_stop] = merged_out
            lse[:, :, q_start:q_stop] = merged_lse
            score_entries += (q_stop - q_start) * (k_stop - k_start)
        if step < plan.world_size - 1:
            _wait(requests)
            current = incoming
    blocks_held = 2 if plan.world_size > 1 else 1
    return out, lse, RingStats(bytes_sent, bytes_sent, score_entries, blocks_held)


def _ring_backward(q, k, v, out, lse, grad_out, plan: _RingPlan):
    """The backward ring: ``(dq, dk, dv)`` for this rank's shards, in the inputs' dtypes.

    Q, dO, lse and ``delta = rowsum(dO * O)`` stay on their rank; each K/V block travels the ring
    as in the forward, and a dK/dV accumulator for it travels one step behind, collecting every
    rank's share. The accumulators make ``W`` hops (the blocks ``W - 1``), so each ends at its owner.
    """
    D = q.shape[-1]
    compute_dtype = out.dtype
    queries, grad_out = q.to(compute_dtype), grad_out.to(compute_dtype)
    delta = (grad_out * out).sum(-1)
    grad_q = torch.zeros_like(queries)
    block_length = max(plan.kv_lengths)
    current = _packed_kv(k, v, block_length)
    arriving = None  # the accumulator sent by the previous rank, for the block we hold now
    for step in range(plan.world_size):
        source = plan.source(step)
        if step < plan.world_size - 1:
            incoming, requests = plan.exchange(current)
        block = current[:, :, : plan.kv_lengths[source]].to(compute_dtype)
        keys, values = block[..., :D], block[..., D:]
        # This rank's share of the block's dK | dV, padded like the block so every message matches.
        grad_kv = queries.new_zeros(*block.shape[:2], block_length, block.shape[-1])
        k_positions, pairs = plan.block_pairs(source, q.device)
        for (q_start, q_stop, _, _), (k_start, k_stop, _, _) in pairs:
            part_q, part_k, part_v = _block_gradients(
                queries[:, :, q_start:q_stop],
                keys[:, :, k_start:k_stop],
                values[:, :, k_start:k_stop],
                grad_out[:, :, q_start:q_stop],
                lse[:, :, q_start:q_stop],
                delta[:, :, q_start:q_stop],
                plan.q_positions[q_start:q_stop],
                k_positions[k_start:k_stop],
                plan.causal,
                plan.scale,
            )
            grad_q[:, :, q_start:q_stop] += part_q
            grad_kv[:, :, k_start:k_stop, :D] += part_k
            grad_kv[:, :, k_start:k_stop, D:] += part_v
        if arriving is not None:
            # Wait for the previous rank's sum only now: its transfer overlapped our compute.
            _wait(arriving[1])
            grad_kv += arriving[0]
        if plan.world_size > 1:
            arriving = plan.exchange(grad_kv, tag=1)
        if step < plan.world_size - 1:
            _wait(requests)
            current = incoming
    if arriving is not None:
        _wait(arriving[1])  # after W hops the accumulator of our own block is back
        grad_kv = arriving[0]
    S_local = k.shape[2]
    grad_k = grad_kv[:, :, :S_local, :D].to(k.dtype)
    grad_v = grad_kv[:, :, :S_local, D:].to(v.dtype)
    return grad_q.to(q.dtype), grad_k, grad_v


class _RingAttentionFunction(torch.autograd.Function):
    """Ring attention with a hand-written backward that is itself a ring (autograd cannot follow
    point-to-point messages between processes)."""

    @staticmethod
    def forward(ctx, q, k, v, plan, stats_sink):
        out, lse, stats = _ring_forward(q, k, v, plan)
        stats_sink.append(stats)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse)
        return out.to(q.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grad_q, grad_k, grad_v = _ring_backward(q, k, v, out, lse, grad_out, ctx.plan)
        return grad_q, grad_k, grad_v, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    layout: str = "contiguous",
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, RingStats]:
    """Exact attention of this rank's queries to the keys/values of all ranks, passed around a ring.

    Call it on every rank of ``group`` (an initialised process group) with this rank's shard:
    q ``(B, H, T_r, D)``, k ``(B, H, S_r, D)``, v ``(B, H, S_r, D_v)``. With ``causal=True`` the
    shards must come from :func:`shard_sequence` of one sequence (``S == T``) with ``layout``;
    global positions, derived from the rank and the layout, decide what each query sees.

    Differentiable: when the inputs require grad, ``backward`` runs a second ring that returns
    this rank's ``dq``, ``dk``, ``dv``. It exchanges messages, so every rank of the group must run
    its backward (as in any data- or sequence-parallel training step).

    Returns this rank's ``(B, H, T_r, D_v)`` output in q's dtype (and :class:`RingStats` of the
    forward ring).
    """
    check_bool(return_stats, "return_stats")
    plan = _ring_plan(q, k, v, causal, scale, group, layout)
    stats_sink: list[RingStats] = []
    result = _RingAttentionFunction.apply(q, k, v, plan, stats_sink)
    return (result, stats_sink[0]) if return_stats else result


def all_gather_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    layout: str = "contiguous",
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, RingStats]:
    """The simple alternative to the ring: gather every rank's K/V block, then attend once.

    Same arguments and result as :func:`ring_attention`. Each rank sends its block to the
    ``W - 1`` others (the same bytes as the ring) but then holds all ``W`` blocks, the whole
    K/V, and cannot start computing before the gather ends. Forward only: the gather carries no
    autograd history, so k and v get no gradient (use :func:`ring_attention` to train).
    """
    check_bool(return_stats, "return_stats")
    scale, world_size, rank, T, S, q_lengths, kv_lengths = _setup(q, k, v, causal, scale, group, layout)
    D = q.shape[-1]
    packed = _packed_kv(k, v, max(kv_lengths))
    blocks = [torch.empty_like(packed) for _ in range(world_size)]
    dist.all_gather(blocks, packed, group=group)
    gathered = torch.cat([block[:, :, :length] for block, length in zip(blocks, kv_lengths)], dim=2)
    mask = None
    if causal:
        q_positions = shard_positions(T, world_size, rank, layout=layout).to(q.device)
        k_positions = torch.cat(
            [shard_positions(S, world_size, r, layout=layout) for r in range(world_size)]
        ).to(q.device)
        mask = k_positions.unsqueeze(0) <= q_positions.unsqueeze(1)
    out = attention(q, gathered[..., :D], gathered[..., D:], mask, scale=scale)
    if not return_stats:
        return out
    message_bytes = packed.numel() * packed.element_size()
    sent = (world_size - 1) * message_bytes
    return out, RingStats(sent, sent, q.shape[2] * S, world_size)


# --- what it costs, before running it ----------------------------------------------------------


@dataclass
class CommunicationCost:
    """Bytes per rank for ring vs all-gather attention over ``world_size`` ranks."""

    world_size: int
    block_bytes: int
    ring_bytes_sent: int
    all_gather_bytes_sent: int
    ring_kv_bytes_held: int
    all_gather_kv_bytes_held: int


def communication_cost(
    batch: int,
    heads: int,
    seq_len: int,
    head_dim: int,
    world_size: int,
    *,
    value_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> CommunicationCost:
    """Bytes each rank sends, and the most K/V bytes it holds, for the two methods.

    A block is ``ceil(seq_len / world_size)`` tokens of K and V (padded to the longest block, as
    the implementation sends it). Both methods send ``world_size - 1`` blocks per rank; the ring
    holds 2 blocks (the current one and the one arriving), the all-gather holds all of them.
    """
    batch, heads = check_int(batch, "batch", min=1), check_int(heads, "heads", min=1)
    seq_len, head_dim = check_int(seq_len, "seq_len", min=1), check_int(head_dim, "head_dim", min=1)
    world_size = check_int(world_size, "world_size", min=1, max=seq_len)
    value_dim = head_dim if value_dim is None else check_int(value_dim, "value_dim", min=1)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    element = torch.empty((), dtype=dtype).element_size()
    block = batch * heads * math.ceil(seq_len / world_size) * (head_dim + value_dim) * element
    sent = (world_size - 1) * block
    return CommunicationCost(world_size, block, sent, sent, block * min(2, world_size), block * world_size)


# --- launching processes -----------------------------------------------------------------------


def _use_loopback() -> None:
    """Make gloo talk over the loopback interface only (127.0.0.1), unless the user chose one."""
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    for _, name in socket.if_nameindex():
        if name.startswith("lo"):
            os.environ["GLOO_SOCKET_IFNAME"] = name
            return


def _worker(rank, world_size, folder, backend, timeout, function, args):
    _use_loopback()
    if backend == "gloo":
        torch.set_num_threads(1)  # W processes share the cores; one thread each avoids oversubscription
    dist.init_process_group(
        backend,
        init_method=f"file://{os.path.join(folder, 'store')}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout),
    )
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        result = function(rank, world_size, *args)
        torch.save(result, os.path.join(folder, f"result_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(
    function: Callable,
    world_size: int,
    *args: object,
    backend: str = "gloo",
    start_method: str | None = None,
    timeout: float = 120.0,
) -> list:
    """Run ``function(rank, world_size, *args)`` in ``world_size`` new processes joined in one
    process group (a FileStore in a temporary folder; gloo talks over loopback), and return each
    rank's return value, in rank order. An exception in any rank is raised here.

    ``start_method`` defaults to ``"fork"`` on Linux when CUDA is not initialised (a fraction of
    a second per launch) and ``"spawn"`` elsewhere (each process imports torch afresh: seconds).
    With ``"spawn"``, ``function`` must be importable (defined at module level), and a script
    that calls this must guard its entry point with ``if __name__ == "__main__":``.
    """
    if not callable(function):
        raise TypeError(f"function must be callable, got {type(function).__name__}")
    world_size = check_int(world_size, "world_size", min=1)
    check_choice(backend, "backend", ("gloo", "nccl"))
    if start_method is None:
        start_method = "fork" if sys.platform == "linux" and not torch.cuda.is_initialized() else "spawn"
    check_choice(start_method, "start_method", ("spawn", "fork", "forkserver"))
    timeout = check_float(timeout, "timeout", min=0.0, min_open=True)
    with tempfile.TemporaryDirectory() as folder:
        torch.multiprocessing.start_processes(
            _worker,
            args=(world_size, folder, backend, timeout, function, args),
            nprocs=world_size,
            join=True,
            start_method=start_method,
        )
        return [
            torch.load(os.path.join(folder, f"result_{rank}.pt"), weights_only=False)
            for rank in range(world_size)
        ]


def _attention_worker(rank, world_size, q_shards, k_shards, v_shards, grad_shards, method, options):
    device = torch.device("cuda", rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    function = ring_attention if method == "ring" else all_gather_attention
    wants_grad = grad_shards is not None
    q, k, v = (
        shards[rank].to(device).requires_grad_(wants_grad) for shards in (q_shards, k_shards, v_shards)
    )
    out, stats = function(q, k, v, return_stats=True, **options)
    if not wants_grad:
        return out.cpu(), stats, None
    # Every rank runs its backward: the backward ring needs all of them.
    out.backward(grad_shards[rank].to(device))
    return out.detach().cpu(), stats, tuple(x.grad.cpu() for x in (q, k, v))


def run_ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    world_size: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "contiguous",
    method: str = "ring",
    grad_output: torch.Tensor | None = None,
    backend: str | None = None,
    start_method: str | None = None,
    timeout: float = 120.0,
    return_stats: bool = False,
) -> (
    torch.Tensor
    | tuple[torch.Tensor, list[RingStats]]
    | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor], list[RingStats]]
):
    """Shard full ``(B, H, T, D)`` inputs over ``world_size`` processes, run the ring, gather.

    ``backend`` defaults to NCCL when q is on CUDA with at least ``world_size`` GPUs, else gloo
    on CPU processes; ``start_method`` as in :func:`run_distributed`. ``method="all_gather"``
    runs :func:`all_gather_attention` instead. Returns the ``(B, H, T, D_v)`` output on q's
    device (and each rank's :class:`RingStats`).

    With ``grad_output`` ``(B, H, T, D_v)`` (the gradient of a loss with respect to the output),
    every rank also runs the backward ring, and the result gains ``(dq, dk, dv)``, gathered to
    the full sequence like q, k, v: ``out, (dq, dk, dv)`` (then the stats). Ring method only.
    """
    B, H, T, S, D, D_v = check_attention_inputs(q, k, v)
    world_size = check_int(world_size, "world_size", min=1, max=min(T, S))
    check_bool(causal, "causal")
    check_bool(return_stats, "return_stats")
    check_choice(layout, "layout", LAYOUTS)
    check_choice(method, "method", METHODS)
    if causal and S != T:
        raise ValueError(f"k: causal ring attention is self-attention and needs S == T, got S={S}, T={T}")
    if scale is not None:
        scale = check_float(scale, "scale")
    if grad_output is not None:
        check_tensor(grad_output, "grad_output", floating=True)
        check_shape(grad_output, "grad_output", (B, H, T, D_v), names="B, H, T, D_v")
        if method != "ring":
            raise ValueError(
                f"grad_output: gradients need method='ring' (the all-gather is forward only), got {method!r}"
            )
    if backend is None:
        enough_gpus = q.is_cuda and dist.is_nccl_available() and torch.cuda.device_count() >= world_size
        backend = "nccl" if enough_gpus else "gloo"
    check_choice(backend, "backend", ("gloo", "nccl"))
    source = (lambda x: x.detach()) if backend == "nccl" else (lambda x: x.detach().cpu())
    shards = [shard_sequence(source(x), world_size, layout=layout) for x in (q, k, v)]
    grad_shards = (
        None if grad_output is None else shard_sequence(source(grad_output), world_size, layout=layout)
    )
    options = {"causal": causal, "scale": scale, "layout": layout}
    results = run_distributed(
        _attention_worker,
        world_size,
        *shards,
        grad_shards,
        method,
        options,
        backend=backend,
        start_method=start_method,
        timeout=timeout,
    )
    out = unshard_sequence([r[0] for r in results], layout=layout).to(q.device)
    outputs: tuple = (out,)
    if grad_output is not None:
        grads = tuple(
            unshard_sequence([r[2][index] for r in results], layout=layout).to(x.device)
            for index, x in enumerate((q, k, v))
        )
        outputs += (grads,)
    if return_stats:
        outputs += ([r[1] for r in results],)
    return outputs[0] if len(outputs) == 1 else outputs
