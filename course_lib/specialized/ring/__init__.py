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

Read the modules by job:
- :mod:`.partition`: which positions each rank holds (contiguous or zig-zag) and its work;
- :mod:`.attention`: the ring and the all-gather, forward and the backward ring;
- :mod:`.launcher`: the processes and the process group, and the one-call :func:`run_ring_attention`;
- :mod:`.cost`: bytes sent and K/V bytes held by each method, before running them.
"""

from .attention import RingStats, all_gather_attention, ring_attention
from .cost import CommunicationCost, communication_cost
from .launcher import METHODS, run_distributed, run_ring_attention
from .partition import LAYOUTS, ring_work, shard_positions, shard_sequence, unshard_sequence

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
    # the choices of layout= and method=, public since before the split into modules
    "LAYOUTS",
    "METHODS",
]
