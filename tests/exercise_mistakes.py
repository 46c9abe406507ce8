"""Wrong solutions, one per misconception, for every exercise: each must fail its checker, and the message
must name what is wrong (the fragment listed). TEACHING.md lists the same misconceptions per chapter.

Each entry: exercise id -> list of (description, expected fragment of the message, function(s)).
The "library" entries call the course's own implementation (or a PyTorch shortcut): they must be refused.
"""

import importlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import course_lib
from course_lib.recall import IGNORE

NEG_INF = float("-inf")


def _attention(q, k, v, mask=None, causal=False, *, scale=None, start=False, invert=False, dim=-1, nan=False):
    T, S = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    allowed = torch.ones(T, S, dtype=torch.bool)
    if causal:
        allowed = torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (0 if start else S - T)
    if mask is not None:
        allowed = allowed & (~mask if invert else mask)
    scores = scores.masked_fill(~allowed, NEG_INF)
    weights = torch.softmax(scores, dim)
    return (weights if nan else weights.nan_to_num(0.0)) @ v


def _gla_loop(q, k, v, g, scale, state, *, order="decay-write-read", gate="exp"):
    B, H, T, D_k = k.shape
    S = q.new_zeros(B, H, D_k, v.shape[-1]) if state is None else state
    out = []
    for t in range(T):
        factor = g[:, :, t].exp() if gate == "exp" else g[:, :, t]
        write = k[:, :, t, :, None] * v[:, :, t, None, :]
        if order == "read-first":
            out.append(torch.einsum("bhd,bhde->bhe", scale * q[:, :, t], S))
        if order == "write-decay":
            S = factor[..., None] * (S + write)
        else:
            S = factor[..., None] * S + write
        if order != "read-first":
            out.append(torch.einsum("bhd,bhde->bhe", scale * q[:, :, t], S))
    return torch.stack(out, 2), S


def _delta_loop(q, k, v, beta, scale, state, *, correct=True, read_first=False):
    B, H, T, D_k = k.shape
    S = q.new_zeros(B, H, D_k, v.shape[-1]) if state is None else state
    out = []
    for t in range(T):
        if read_first:
            out.append(torch.einsum("bhd,bhde->bhe", scale * q[:, :, t], S))
        target = v[:, :, t] - (torch.einsum("bhde,bhd->bhe", S, k[:, :, t]) if correct else 0)
        S = S + beta[:, :, t, None, None] * k[:, :, t, :, None] * target[..., None, :]
        if not read_first:
            out.append(torch.einsum("bhd,bhde->bhe", scale * q[:, :, t], S))
    return torch.stack(out, 2), S


def _unstable_merge(m_a, l_a, m_b, l_b):
    m = torch.maximum(m_a, m_b)
    return m, l_a * torch.exp(m_a - m) + l_b * torch.exp(m_b - m)  # NaN when both pieces are empty


def _fa2(q, k, v, m, l, acc, allowed=None, *, mask=True, guard=True, rescale=True):
    s = q @ k.T
    if mask and allowed is not None:
        s = s.masked_fill(~allowed, NEG_INF)
    new = torch.maximum(m, s.amax(-1))
    safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new)) if guard else new
    p = torch.exp(s - safe[:, None])
    c = torch.exp(m - safe) if rescale else torch.ones_like(m)
    return new, l * c + p.sum(-1), acc * c[:, None] + p @ v


def _paged_logical(table, length, block_size, free):
    if length % block_size == 0:
        table.append(free.pop())
    return length // block_size, length % block_size  # the logical block, not the physical one


def _paged_first_free(table, length, block_size, free):
    if length % block_size == 0:
        table.append(free.pop(0))
    return table[length // block_size], length % block_size


def _top_p_including(logits, p):
    probabilities = torch.softmax(logits, -1)
    sorted_p, order = probabilities.sort(-1, descending=True)
    keep_sorted = sorted_p.cumsum(-1) < p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, NEG_INF)


def _per_row_accuracy(logits, targets):
    answers = targets != IGNORE
    right = (logits.argmax(-1) == targets) & answers
    return (right.sum(-1).float() / answers.sum(-1).float()).mean().item()  # NaN for a row without answers


def _per_row_accuracy_skip_empty(logits, targets):
    answers = targets != IGNORE
    right = (logits.argmax(-1) == targets) & answers
    keep = answers.any(-1)
    return (right.sum(-1)[keep].float() / answers.sum(-1)[keep].float()).mean().item()


def _hybrid(pattern, T, H, D, w, *, window_min=True, offset=0.0, linear_norm=True):
    per_kind = {
        "full": 2 * H * T * D,
        "window": 2 * H * (min(w, T) if window_min else w) * D,
        "linear": H * D * (D + 1 if linear_norm else D),
    }
    return 4 * sum(per_kind[kind] for kind in pattern) + offset


def _kv(config, *, heads="num_kv_heads", rope=True, offset=0.0):
    if config["attention"] == "mla":
        per_layer = config["kv_lora_rank"] + (config["qk_rope_head_dim"] if rope else 0)
    else:
        per_layer = 2 * config[heads] * config["head_dim"]
    return per_layer * config["num_layers"] * 2 + offset


def _skips(T, S, bq, bk, *, offset=None, count="skipped"):
    offset = S - T if offset is None else offset
    skipped = sum(k0 > min(q0 + bq, T) - 1 + offset for q0 in range(0, T, bq) for k0 in range(0, S, bk))
    if count == "computed":
        return -(-T // bq) * -(-S // bk) - skipped
    return skipped


def _ring_unstable(o1, lse1, o2, lse2):
    w1, w2 = torch.exp(lse1), torch.exp(lse2)
    lse = torch.log(w1 + w2)
    return (w1[..., None] * o1 + w2[..., None] * o2) / (w1 + w2)[..., None], lse


def _ring_no_empty_guard(o1, lse1, o2, lse2):
    lse = torch.logaddexp(lse1, lse2)
    return torch.exp(lse1 - lse)[..., None] * o1 + torch.exp(lse2 - lse)[..., None] * o2, lse


def _combine_no_guard(outputs, lses):
    stacked = torch.stack(lses)
    total = torch.logsumexp(stacked, 0)
    return (torch.exp(stacked - total)[..., None] * torch.stack(outputs)).sum(0), total


def _combine_unstable(outputs, lses):
    weights = torch.exp(torch.stack(lses))
    total = weights.sum(0)
    return (weights[..., None] * torch.stack(outputs)).sum(0) / total[..., None], torch.log(total)


MISTAKES = {
    "0.1": [
        (
            "the library's masked_softmax",
            "course's own code",
            lambda x: course_lib.standard.masked_softmax(x),
        ),
        (
            "the textbook formula without the shift",
            "exp() overflows",
            lambda x: torch.exp(x) / torch.exp(x).sum(-1, keepdim=True),
        ),
        (
            "shifted by the global max instead of each row's",
            "not by one maximum for the whole tensor",
            lambda x: torch.exp(x - x.max()) / torch.exp(x - x.max()).sum(-1, keepdim=True),
        ),
        (
            "normalised over the first axis",
            "over the first axis",
            lambda x: (
                torch.exp(x - x.amax(0, keepdim=True))
                / torch.exp(x - x.amax(0, keepdim=True)).sum(0, keepdim=True)
            ),
        ),
        ("torch.softmax", "PyTorch shortcut", lambda x: torch.softmax(x, -1)),
        ("F.softmax", "PyTorch shortcut", lambda x: F.softmax(x, dim=-1)),
        ("Tensor.softmax", "PyTorch shortcut", lambda x: x.softmax(-1)),
    ],
    "1.1": [
        (
            "aligned to the start, as SDPA's is_causal",
            "aligned to the start",
            lambda T, S: torch.ones(T, S, dtype=torch.bool).tril(),
        ),
        (
            "the diagonal left out",
            "diagonal left out",
            lambda T, S: torch.ones(T, S, dtype=torch.bool).tril(S - T - 1),
        ),
        ("a float mask", "bool tensor", lambda T, S: torch.ones(T, S).tril(S - T)),
        ("the library's causal_mask", "course's own code", lambda T, S: course_lib.causal_mask(T, S)),
    ],
    "1.2": [
        (
            "no 1/sqrt(D) scale",
            "without the 1/sqrt(D) scale",
            lambda q, k, v, mask=None, causal=False: _attention(q, k, v, mask, causal, scale=1.0),
        ),
        (
            "causal aligned to the start",
            "aligned to the start",
            lambda q, k, v, mask=None, causal=False: _attention(q, k, v, mask, causal, start=True),
        ),
        (
            "the mask inverted",
            "inverted",
            lambda q, k, v, mask=None, causal=False: _attention(q, k, v, mask, causal, invert=True),
        ),
        (
            "NaN for rows that see nothing",
            "no key at all",
            lambda q, k, v, mask=None, causal=False: _attention(q, k, v, mask, causal, nan=True),
        ),
        (
            "SDPA",
            "PyTorch shortcut",
            lambda q, k, v, mask=None, causal=False: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        ),
        (
            "the library's attention",
            "course's own code",
            lambda q, k, v, mask=None, causal=False: course_lib.attention(q, k, v, mask, causal=causal),
        ),
    ],
    "1.3": [
        (
            "the layer's split and merge",
            "course's own code",
            (
                lambda x, H: course_lib.MultiHeadAttention(x.shape[-1], H).split_heads(x),
                lambda y: course_lib.MultiHeadAttention.merge_heads(y),
            ),
        ),
        (
            "columns dealt out round-robin",
            "round-robin",
            (
                lambda x, H: x.view(x.shape[0], x.shape[1], -1, H).permute(0, 3, 1, 2),
                lambda y: y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1),
            ),
        ),
        (
            "a missing transpose",
            "not moved",
            (
                lambda x, H: x.reshape(x.shape[0], x.shape[1], H, -1),
                lambda y: y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1),
            ),
        ),
        (
            "merge with view on a non-contiguous tensor",
            "view",
            (
                lambda x, H: x.reshape(x.shape[0], x.shape[1], H, -1).transpose(1, 2),
                lambda y: y.transpose(1, 2).view(y.shape[0], y.shape[2], -1),
            ),
        ),
    ],
    "2.1": [
        (
            "M N K FLOPs",
            "a multiply-add is 2 FLOPs",
            lambda M, N, K, b: M * N * K / ((M * K + K * N + M * N) * b),
        ),
        (
            "the output not counted",
            "the output C is written too",
            lambda M, N, K, b: 2 * M * N * K / ((M * K + K * N) * b),
        ),
        (
            "the library's gemm_intensity",
            "course's own code",
            lambda M, N, K, b: course_lib.hardware.gemm_intensity(M, N, K, bytes_per_element=b),
        ),
    ],
    "2.2": [
        ("max instead of min", "max instead of min", lambda I, P, W: max(P, I * W)),
        ("no compute roof", "without the compute roof", lambda I, P, W: I * W),
        (
            "the library's roofline",
            "course's own code",
            lambda I, P, W: course_lib.hardware.roofline(I, P, W),
        ),
    ],
    "3.1": [
        ("no care for two empty pieces", "both pieces are empty", _unstable_merge),
        ("sums not rescaled", "not rescaled", lambda ma, la, mb, lb: (torch.maximum(ma, mb), la + lb)),
        (
            "the library's merge_softmax_stats",
            "course's own code",
            lambda ma, la, mb, lb: course_lib.tiling.merge_softmax_stats(ma, la, mb, lb),
        ),
    ],
    "3.2": [
        (
            "the library's flash_attention on the tile",
            "course's own code",
            lambda q, k, v, m, l, acc, allowed=None: course_lib.flash_attention(
                q[None, None], k[None, None], v[None, None], scale=1.0
            ),
        ),
        ("the mask ignored", "masked", lambda *a, allowed=None: _fa2(*a, allowed, mask=False)),
        (
            "no guard for rows that saw nothing",
            "seen no allowed key",
            lambda *a, allowed=None: _fa2(*a, allowed, guard=False),
        ),
        (
            "the old sum not rescaled",
            "not rescaled",
            lambda *a, allowed=None: _fa2(*a, allowed, rescale=False),
        ),
    ],
    "3.3": [
        ("exp of the logsumexps", "exp(lse_c) alone overflows", _combine_unstable),
        ("no guard for queries that see nothing", "see no key at all", _combine_no_guard),
        (
            "the plain mean",
            "plain mean",
            lambda outputs, lses: (torch.stack(outputs).mean(0), torch.logsumexp(torch.stack(lses), 0)),
        ),
        (
            "the library's combine_partials",
            "course's own code",
            lambda outputs, lses: course_lib.tiling.combine_partials(outputs, lses),
        ),
    ],
    "3.4": [
        (
            "the library's instrumented flash_attention",
            "course's own code",
            lambda T, S, bq, bk: (
                lambda stats: (
                    course_lib.flash_attention(
                        torch.zeros(1, 1, T, 2),
                        torch.zeros(1, 1, S, 2),
                        torch.zeros(1, 1, S, 2),
                        causal=True,
                        block_q=bq,
                        block_k=bk,
                        stats=stats,
                    ),
                    stats.blocks_skipped,
                )[1]
            )(course_lib.tiling.FlashStats()),
        ),
        (
            "tiles computed, not skipped",
            "computed",
            lambda T, S, bq, bk: _skips(T, S, bq, bk, count="computed"),
        ),
        (
            "the diagonal aligned to the start",
            "aligned to the start",
            lambda T, S, bq, bk: _skips(T, S, bq, bk, offset=0),
        ),
        ("a float count", "int", lambda T, S, bq, bk: float(_skips(T, S, bq, bk))),
    ],
    "4.1": [
        ("every query head cached", "num_heads, not num_kv_heads", lambda c: _kv(c, heads="num_heads")),
        ("MLA without the RoPE key", "RoPE key forgotten", lambda c: _kv(c, rope=False)),
        ("a fractional offset", "whole number", lambda c: _kv(c, offset=0.4)),
        (
            "the library's kv_cache_bytes",
            "course's own code",
            lambda c: course_lib.kv_cache_bytes(c, 1, 1, torch.float16),
        ),
    ],
    "4.2": [
        ("the kv heads cycled", "cycled", lambda x, group: x.repeat(1, group, 1, 1)),
        (
            "the library's repeat_kv",
            "course's own code",
            lambda x, group: course_lib.kv_cache.repeat_kv(x, group),
        ),
    ],
    "4.3": [
        (
            "the library's PagedKVCache",
            "course's own code",
            lambda table, length, bs, free: course_lib.PagedKVCache(len(free) + 4, bs, 1, 1) and (0, 0),
        ),
        ("the logical block returned", "logical block", _paged_logical),
        ("the first free block taken", "free_blocks.pop()", _paged_first_free),
    ],
    "4.4": [
        ("the token that crosses p dropped", "crosses p", _top_p_including),
        (
            "the library's top_p_filter",
            "course's own code",
            lambda logits, p: course_lib.decoding.top_p_filter(logits, p),
        ),
    ],
    "5.1": [
        (
            "not causal",
            "not causal",
            lambda T, w, r: (lambda d: (d % r == 0) & (d <= (w - 1) * r))(
                (torch.arange(T)[:, None] - torch.arange(T)[None, :]).abs()
            ),
        ),
        (
            "window counted in positions",
            "not window - 1 *kept* keys",
            lambda T, w, r: (lambda d: (d >= 0) & (d % r == 0) & (d <= w - 1))(
                torch.arange(T)[:, None] - torch.arange(T)[None, :]
            ),
        ),
        ("the library's dilated_mask", "course's own code", lambda T, w, r: course_lib.dilated_mask(T, w, r)),
    ],
    "5.2": [
        (
            "the library's block_sparse_mask",
            "course's own code",
            lambda layout, b, T: course_lib.block_sparse_mask(layout, b, T, T),
        ),
        ("repeat instead of repeat_interleave", "tiled", lambda layout, b, T: layout.repeat(b, b)[:T, :T]),
        ("not cropped", "shape", lambda layout, b, T: layout.repeat_interleave(b, 0).repeat_interleave(b, 1)),
    ],
    "5.3": [
        (
            "the library's streaming_keep",
            "course's own code",
            lambda n, b, s: course_lib.streaming_keep(n, b, num_sinks=s),
        ),
        ("no sinks", "sinks forgotten", lambda n, b, s: torch.arange(max(0, n - b), n)),
        ("float indices", "integers", lambda n, b, s: torch.arange(n).float()[:b]),
    ],
    "5.4": [
        (
            "the library's layers_to_connect",
            "course's own code",
            lambda T, w: course_lib.sparse.layers_to_connect(course_lib.sliding_window_mask(T, w)),
        ),
        ("ceil(T / window)", "ceil(T / window)", lambda T, w: math.ceil(T / w)),
        ("rounded down", "rounded down", lambda T, w: (T - 1) // (w - 1)),
    ],
    "6.1": [
        ("F.elu + 1", "PyTorch shortcut", lambda x: F.elu(x) + 1),
        ("nn.ELU + 1", "PyTorch shortcut", lambda x: torch.nn.ELU()(x) + 1),
        ("F.celu + 1", "PyTorch shortcut", lambda x: F.celu(x) + 1),
        ("exp everywhere", "exp(x) everywhere", lambda x: torch.exp(x)),
        (
            "elu without the + 1",
            "without the + 1",
            lambda x: torch.where(x > 0, x, torch.exp(x.clamp(max=0)) - 1),
        ),
        ("the library's elu_plus_one", "course's own code", lambda x: course_lib.elu_plus_one(x)),
    ],
    "6.2": [
        (
            "the library's linear_attention",
            "course's own code",
            lambda S, z, pq, pk, v: course_lib.linear_attention(
                pq[:, :, None],
                pk[:, :, None],
                v[:, :, None],
                form="recurrent",
                initial_state=(S, z),
                output_final_state=True,
            ),
        ),
        (
            "read before write",
            "write the token into S and z first",
            lambda S, z, pq, pk, v: (
                S + pk[..., None] * v[..., None, :],
                z + pk,
                torch.einsum("bhd,bhde->bhe", pq, S) / (pq * z).sum(-1, keepdim=True),
            ),
        ),
        (
            "not normalised",
            "not divided",
            lambda S, z, pq, pk, v: (
                S + pk[..., None] * v[..., None, :],
                z + pk,
                torch.einsum("bhd,bhde->bhe", pq, S + pk[..., None] * v[..., None, :]),
            ),
        ),
    ],
    "6.3": [
        (
            "no causal mask inside the chunk",
            "later keys leak",
            lambda S, pq, pk, v: (pq @ S + (pq @ pk.transpose(-1, -2)) @ v, S + pk.transpose(-1, -2) @ v),
        ),
        (
            "the diagonal left out",
            "diagonal left out",
            lambda S, pq, pk, v: (
                pq @ S + torch.tril(pq @ pk.transpose(-1, -2), -1) @ v,
                S + pk.transpose(-1, -2) @ v,
            ),
        ),
        (
            "the library's linear_attention",
            "course's own code",
            lambda S, pq, pk, v: course_lib.linear_attention(
                pq,
                pk,
                v,
                feature_map=course_lib.linear.identity_map,
                normalize=False,
                scale=1.0,
                initial_state=S,
                output_final_state=True,
            ),
        ),
    ],
    "7.1": [
        (
            "write before decay",
            "write before the decay",
            lambda q, k, v, g, s, st=None: _gla_loop(q, k, v, g, s, st, order="write-decay"),
        ),
        (
            "read before write",
            "read before the write",
            lambda q, k, v, g, s, st=None: _gla_loop(q, k, v, g, s, st, order="read-first"),
        ),
        (
            "the log gate used as a factor",
            "without exp",
            lambda q, k, v, g, s, st=None: _gla_loop(q, k, v, g, s, st, gate="log"),
        ),
        (
            "the library's gla",
            "course's own code",
            lambda q, k, v, g, s, st=None: course_lib.gla(
                q, k, v, g, scale=s, initial_state=st, output_final_state=True, form="recurrent"
            ),
        ),
    ],
    "7.2": [
        (
            "no correction term",
            "without the - S^T k correction",
            lambda q, k, v, b, s, st=None: _delta_loop(q, k, v, b, s, st, correct=False),
        ),
        (
            "read before write",
            "read before the write",
            lambda q, k, v, b, s, st=None: _delta_loop(q, k, v, b, s, st, read_first=True),
        ),
        (
            "the library's delta_rule",
            "course's own code",
            lambda q, k, v, b, s, st=None: course_lib.delta_rule(
                q, k, v, b, scale=s, initial_state=st, output_final_state=True
            ),
        ),
    ],
    "7.3": [
        (
            "transposed",
            "transposed",
            lambda g, T: (
                lambda e: torch.where(e >= 0, g ** e.clamp(min=0), torch.zeros((), dtype=torch.float64))
            )(torch.arange(T, dtype=torch.float64)[None, :] - torch.arange(T, dtype=torch.float64)[:, None]),
        ),
        (
            "nothing zeroed",
            "nothing zeroed",
            lambda g, T: (
                torch.tensor(g, dtype=torch.float64)
                ** (
                    torch.arange(T, dtype=torch.float64)[:, None]
                    - torch.arange(T, dtype=torch.float64)[None, :]
                )
            ),
        ),
        (
            "the library's retention_decay_matrix",
            "course's own code",
            lambda g, T: course_lib.recurrent.retention_decay_matrix(
                torch.tensor([math.log(g)], dtype=torch.float64), T
            )[0],
        ),
    ],
    "7.4": [
        (
            "the library's ssd in the mapping",
            "course's own code",
            lambda x, dt, A, B, C: (
                C,
                B,
                course_lib.ssd(x, dt, A, B, C),
                (A[None, :, None] * dt)[..., None].expand(B.shape),
            ),
        ),
        (
            "B and C swapped",
            "swapped",
            lambda x, dt, A, B, C: (
                B,
                C,
                dt[..., None] * x,
                (A[None, :, None] * dt)[..., None].expand(B.shape),
            ),
        ),
        (
            "dt left out of v",
            "leaves out dt",
            lambda x, dt, A, B, C: (C, B, x, (A[None, :, None] * dt)[..., None].expand(B.shape)),
        ),
        (
            "a per-step gate",
            "expanded",
            lambda x, dt, A, B, C: (C, B, dt[..., None] * x, A[None, :, None] * dt),
        ),
    ],
    "8.1": [
        (
            "the library's combine_partials",
            "course's own code",
            lambda o1, l1, o2, l2: course_lib.tiling.combine_partials([o1, o2], [l1, l2]),
        ),
        ("exp of the logsumexps", "exp(lse) overflows", _ring_unstable),
        ("no guard for queries that see nothing", "either block", _ring_no_empty_guard),
        (
            "the plain average",
            "plain average",
            lambda o1, l1, o2, l2: ((o1 + o2) / 2, torch.logaddexp(l1, l2)),
        ),
    ],
    "8.2": [
        ("per-row accuracies averaged", "per-row accuracies", _per_row_accuracy),
        (
            "per-row accuracies averaged, empty rows skipped",
            "per-row accuracies",
            _per_row_accuracy_skip_empty,
        ),
        (
            "IGNORE positions counted",
            "IGNORE ones included",
            lambda logits, targets: (logits.argmax(-1) == targets).float().mean().item(),
        ),
        (
            "the library's answer_accuracy",
            "course's own code",
            lambda logits, targets: course_lib.recall.answer_accuracy(logits, targets),
        ),
    ],
    "8.3": [
        ("a fractional offset", "whole number", lambda *a: _hybrid(*a, offset=0.7)),
        (
            "the window not capped by the sequence",
            "even when the sequence is shorter",
            lambda *a: _hybrid(*a, window_min=False),
        ),
        (
            "linear states without the normaliser",
            "without the normaliser",
            lambda *a: _hybrid(*a, linear_norm=False),
        ),
        (
            "the library's mixer_cost",
            "course's own code",
            lambda pattern, T, H, D, w: sum(
                course_lib.specialized.mixer_cost(kind, T, num_heads=H, head_dim=D, window=w).cache_bytes
                for kind in pattern
            ),
        ),
    ],
}

# Chapters may keep their wrong solutions in a file of their own, tests/exercise_mistakes_chNN.py, with a
# MISTAKES dict of the same form; they are added here.
for _path in sorted(Path(__file__).parent.glob("exercise_mistakes_ch*.py")):
    MISTAKES.update(importlib.import_module(_path.stem).MISTAKES)
