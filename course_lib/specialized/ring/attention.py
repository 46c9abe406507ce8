"""Ring and all-gather attention across the ranks of a process group: forward and backward.

Each of ``W`` ranks holds one block of the queries and one block of the keys/values. In ``W``
steps the key/value blocks travel around a ring — rank ``r`` sends its current block to
``r + 1`` and receives the next from ``r - 1`` — while every rank attends its queries to the
block it holds and folds the partial result into a running output with the online-softmax
merge of chapter 03 (:func:`course_lib.tiling.combine_partials`). Sending the next block while
computing on the current one hides the communication, and no rank ever holds more than two
key/value blocks. The all-gather variant (:func:`all_gather_attention`) collects every block
first: the same bytes leave each rank, but each rank then holds the whole K/V.

The ring is differentiable. Point-to-point messages carry no autograd history between processes,
so :func:`ring_attention` has a hand-written backward that is a second ring, FlashAttention's
backward (chapter 03) spread over ranks: each rank keeps its Q, dO, O and the forward's per-row
logsumexp, recomputes the softmax weights ``P = exp(scale * Q K^T - lse)`` of each block pair,
adds its share to its own dQ, and to dK/dV accumulators that travel around the ring behind their
K/V block. After ``W`` hops every accumulator is back at the rank that owns the block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ...checks import check_attention_inputs, check_bool, check_choice, compute_dtype, resolve_scale
from ...standard import attention
from ...tiling import combine_partials, tile_gradients
from .partition import LAYOUTS, _pair_plan, _rank_pieces, shard_positions

__all__ = ["RingStats", "ring_attention", "all_gather_attention"]


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
    scale = resolve_scale(scale, D)
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
    queries = q.to(compute_dtype(q))
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
    dtype = out.dtype  # the forward's compute dtype
    queries, grad_out = q.to(dtype), grad_out.to(dtype)
    delta = (grad_out * out).sum(-1)
    grad_q = torch.zeros_like(queries)
    block_length = max(plan.kv_lengths)
    current = _packed_kv(k, v, block_length)
    arriving = None  # the accumulator sent by the previous rank, for the block we hold now
    for step in range(plan.world_size):
        source = plan.source(step)
        if step < plan.world_size - 1:
            incoming, requests = plan.exchange(current)
        block = current[:, :, : plan.kv_lengths[source]].to(dtype)
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
