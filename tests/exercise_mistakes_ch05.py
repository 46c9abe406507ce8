"""Wrong solutions of chapter 05's new exercises (5.5-5.8), one per misconception: each must fail its checker
with a message that names it (the fragment listed). Loaded into tests/exercise_mistakes.py's MISTAKES."""

import math

import torch
import torch.nn.functional as F

import course_lib

NEG_INF = float("-inf")


def _window(
    q,
    k,
    v,
    window,
    *,
    extra=0,
    align_start=False,
    scale=True,
    leak=False,
    from_block_start=False,
    drop_tail=False,
    block=None,
):
    """A blocked sliding-window kernel with one mistake switched on."""
    T, S, D = q.shape[-2], k.shape[-2], q.shape[-1]
    offset = 0 if align_start else S - T
    block = window if block is None else block
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])
    stops = range(0, T - T % block if drop_tail and T > block else T, block)
    for start in stops:
        stop = min(start + block, T)
        lo = max(0, offset + start - window + 1 - extra)
        if from_block_start:
            lo = offset + start
        hi = min(S, offset + stop + (block if leak else 0))
        scores = q[..., start:stop, :] @ k[..., lo:hi, :].transpose(-1, -2)
        if scale:
            scores = scores / math.sqrt(D)
        distance = (torch.arange(start, stop)[:, None] + offset) - torch.arange(lo, hi)[None, :]
        outside = distance >= window + extra
        if not leak:
            outside = outside | (distance < 0)
        else:
            outside = outside | (torch.arange(lo, hi)[None, :] > offset + stop - 1)
        scores = scores.masked_fill(outside, NEG_INF)
        out[..., start:stop, :] = torch.softmax(scores, dim=-1) @ v[..., lo:hi, :]
    return out


def _dense_masked(q, k, v, window):
    T, S = q.shape[-2], k.shape[-2]
    distance = (torch.arange(T)[:, None] + S - T) - torch.arange(S)[None, :]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill((distance < 0) | (distance >= window), NEG_INF)
    return torch.softmax(scores, dim=-1) @ v


def _row_by_row(q, k, v, window):
    """Every score of each query computed, one query at a time, then the window cut out."""
    T, S = q.shape[-2], k.shape[-2]
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])
    for i in range(T):
        position = S - T + i
        scores = (q[..., i : i + 1, :] * k).sum(-1) / math.sqrt(q.shape[-1])  # all S keys
        lo = max(0, position - window + 1)
        weights = torch.softmax(scores[..., lo : position + 1], dim=-1)
        out[..., i, :] = (weights[..., None] * v[..., lo : position + 1, :]).sum(-2)
    return out


def _one_block(q, k, v, window):
    """The blocked kernel with a single block of all T queries: the whole (T, S) tile, nothing skipped."""
    return _window(q, k, v, window, block=q.shape[-2])


def _h2o(
    weights,
    budget,
    recent=None,
    *,
    score="sum",
    from_all=False,
    round_up=False,
    unsorted=False,
    shared=False,
    as_float=False,
):
    S = weights.shape[-1]
    batch = weights.shape[:-2]
    if budget >= S:
        keep = torch.arange(S).expand(*batch, S)
        return keep.float() if as_float else keep
    if recent is None:
        recent = budget - budget // 2 if round_up else budget // 2
    received = weights.amax(-2) if score == "max" else weights.sum(-2)
    if shared:
        received = received.sum(-2, keepdim=True).expand_as(received)
    candidates = received if from_all else received[..., : S - recent]
    heavy = candidates.topk(budget - recent, dim=-1).indices
    keep = torch.cat([heavy, torch.arange(S - recent, S).expand(*batch, recent)], dim=-1)
    if not unsorted:
        keep = keep.sort(dim=-1).values
    return keep.float() if as_float else keep


def _h2o_whole_cache_topk(weights, budget, recent=None):
    """No special case for a budget that covers the cache: topk asks for more older keys than exist."""
    S = weights.shape[-1]
    recent = budget // 2 if recent is None else recent
    received = weights.sum(-2)
    heavy = received[..., : max(S - recent, 0)].topk(budget - recent, dim=-1).indices
    newest = torch.arange(S - recent, S).expand(*weights.shape[:-2], recent)
    return torch.cat([heavy, newest], dim=-1).sort(dim=-1).values


def _moba(q, k, block_size, top_k, *, force_own=True, exclude_future=True, causal_inside=True, extra=0):
    T = q.shape[-2]
    blocks = -(-T // block_size)
    means = torch.stack(
        [k[..., j * block_size : (j + 1) * block_size, :].mean(-2) for j in range(blocks)], -2
    )
    gate = q @ means.transpose(-1, -2)
    own = (torch.arange(T) // block_size)[:, None]
    index = torch.arange(blocks)[None, :]
    if exclude_future:
        gate = gate.masked_fill(index > own, NEG_INF)
    if force_own:
        gate = gate.masked_fill(index == own, float("inf"))
    best = gate.topk(min(top_k + extra, blocks), dim=-1).indices
    chosen = torch.zeros_like(gate, dtype=torch.bool).scatter(-1, best, True)
    if exclude_future:
        chosen = chosen & (index <= own)
    mask = chosen.repeat_interleave(block_size, dim=-1)[..., :T]
    return mask & torch.ones(T, T, dtype=torch.bool).tril() if causal_inside else mask


def _moba_partial_mean_over_block_size(q, k, block_size, top_k):
    """The last, shorter block's mean divided by block_size instead of its own count of keys. It changes
    nothing: the partial block is only ever the own (forced) block of the queries inside it."""
    T = q.shape[-2]
    blocks = -(-T // block_size)
    padded = F.pad(k, (0, 0, 0, blocks * block_size - T))
    means = padded.unflatten(-2, (blocks, block_size)).sum(-2) / block_size
    gate = q @ means.transpose(-1, -2)
    own = (torch.arange(T) // block_size)[:, None]
    index = torch.arange(blocks)[None, :]
    gate = gate.masked_fill(index > own, NEG_INF).masked_fill(index == own, float("inf"))
    best = gate.topk(min(top_k, blocks), dim=-1).indices
    chosen = torch.zeros_like(gate, dtype=torch.bool).scatter(-1, best, True) & (index <= own)
    return chosen.repeat_interleave(block_size, dim=-1)[..., :T] & torch.ones(T, T, dtype=torch.bool).tril()


def _time(q, k, v, *, transpose=True, scale=True, space=False):
    B, H, frames, N, D = q.shape
    if space:
        qt, kt, vt = q, k, v
    elif transpose:
        qt, kt, vt = (x.transpose(2, 3) for x in (q, k, v))
    else:
        qt, kt, vt = (x.reshape(B, H, N, frames, x.shape[-1]) for x in (q, k, v))
    scores = qt @ kt.transpose(-1, -2) / (math.sqrt(D) if scale else 1.0)
    out = torch.softmax(scores, dim=-1) @ vt
    if space:
        return out
    return out.transpose(2, 3) if transpose else out.reshape(B, H, frames, N, v.shape[-1])


def _time_dense(q, k, v):
    """Full attention over the F*N tokens with a same-patch mask: right, but (F*N)^2 scores."""
    B, H, frames, N, D = q.shape
    token = torch.arange(frames * N)
    same_patch = (token[:, None] % N) == (token[None, :] % N)
    flat = [x.reshape(B, H, frames * N, x.shape[-1]) for x in (q, k, v)]
    scores = (flat[0] @ flat[1].transpose(-1, -2) / math.sqrt(D)).masked_fill(~same_patch, NEG_INF)
    return (torch.softmax(scores, -1) @ flat[2]).view(B, H, frames, N, v.shape[-1])


MISTAKES = {
    "5.5": [
        ("dense attention given the window mask", "a mask on dense scores", _dense_masked),
        ("every score computed, one query at a time", "does not skip", _row_by_row),
        ("a single block of all the queries", "built a tensor", _one_block),
        ("a window of window + 1 keys", "window + 1 keys", lambda q, k, v, w: _window(q, k, v, w, extra=1)),
        (
            "aligned to the start of the keys",
            "aligned to the start",
            lambda q, k, v, w: _window(q, k, v, w, align_start=True),
        ),
        (
            "no 1/sqrt(D) scale",
            "without the 1/sqrt(D) scale",
            lambda q, k, v, w: _window(q, k, v, w, scale=False),
        ),
        (
            "no causal mask inside the block",
            "no causal mask inside the block",
            lambda q, k, v, w: _window(q, k, v, w, leak=True),
        ),
        (
            "keys from the block's first query",
            "are missing",
            lambda q, k, v, w: _window(q, k, v, w, from_block_start=True),
        ),
        (
            "the last, shorter block skipped",
            "last, shorter block",
            lambda q, k, v, w: _window(q, k, v, w, drop_tail=True),
        ),
        (
            "the library's sliding_window_attention",
            "course's own code",
            lambda q, k, v, w: course_lib.sparse.sliding_window_attention(q, k, v, w),
        ),
        (
            "SDPA with the window mask",
            "PyTorch shortcut",
            lambda q, k, v, w: F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=(lambda d: (d >= 0) & (d < w))(
                    (torch.arange(q.shape[-2])[:, None] + k.shape[-2] - q.shape[-2])
                    - torch.arange(k.shape[-2])
                ),
            ),
        ),
    ],
    "5.6": [
        (
            "max instead of sum",
            "largest weight they received",
            lambda w, b, recent=None: _h2o(w, b, recent, score="max"),
        ),
        (
            "heavy hitters among all keys",
            "recent ones included",
            lambda w, b, recent=None: _h2o(w, b, recent, from_all=True),
        ),
        ("recent rounded up", "rounded up", lambda w, b, recent=None: _h2o(w, b, recent, round_up=True)),
        (
            "one choice for all heads",
            "one choice for every head",
            lambda w, b, recent=None: _h2o(w, b, recent, shared=True),
        ),
        ("not sorted", "sorted and distinct", lambda w, b, recent=None: _h2o(w, b, recent, unsorted=True)),
        ("float indices", "integers", lambda w, b, recent=None: _h2o(w, b, recent, as_float=True)),
        ("no case for a budget that covers the cache", "RuntimeError", _h2o_whole_cache_topk),
        (
            "the library's h2o_keep",
            "course's own code",
            lambda w, b, recent=None: course_lib.sparse.h2o_keep(w, b, recent=recent),
        ),
    ],
    "5.7": [
        (
            "own block not forced",
            "own block not forced",
            lambda q, k, block_size, top_k: _moba(q, k, block_size, top_k, force_own=False),
        ),
        (
            "future blocks compete",
            "later blocks allowed to compete",
            lambda q, k, block_size, top_k: _moba(q, k, block_size, top_k, exclude_future=False),
        ),
        (
            "future blocks attended",
            "no causal rule at all",
            lambda q, k, block_size, top_k: _moba(
                q, k, block_size, top_k, exclude_future=False, causal_inside=False
            ),
        ),
        (
            "no causal mask in the own block",
            "no causal mask inside the own block",
            lambda q, k, block_size, top_k: _moba(q, k, block_size, top_k, causal_inside=False),
        ),
        (
            "own block on top of top_k",
            "top_k + 1 blocks",
            lambda q, k, block_size, top_k: _moba(q, k, block_size, top_k, extra=1),
        ),
        (
            "the library's moba_mask",
            "course's own code",
            lambda q, k, block_size, top_k: course_lib.sparse.moba_mask(
                q, k, block_size=block_size, top_k=top_k
            ),
        ),
    ],
    "5.8": [
        (
            "reshaped without the transpose",
            "without the transpose",
            lambda q, k, v: _time(q, k, v, transpose=False),
        ),
        ("attention over space", "space, not time", lambda q, k, v: _time(q, k, v, space=True)),
        ("no scale", "without the 1/sqrt(D) scale", lambda q, k, v: _time(q, k, v, scale=False)),
        ("full attention with a same-patch mask", "F x F scores per patch", _time_dense),
        (
            "the library's time_attention",
            "course's own code",
            lambda q, k, v: course_lib.sparse.time_attention(q, k, v),
        ),
    ],
}

# Not a misconception the checker can catch, kept to document it (see TEACHING.md, chapter 05): a wrong mean
# for the last, shorter key block never changes MoBA's mask.
HARMLESS = {"5.7": [_moba_partial_mean_over_block_size]}
