"""Wrong solutions of chapter 04's exercises 4.7 and 4.8, one per misconception (see exercise_mistakes.py).

Each entry: exercise id -> list of (description, expected fragment of the message, function(s)).
"""

import torch
import torch.nn.functional as F

import course_lib


def _paged(q, key_blocks, value_blocks, block_tables, lengths, *, kind=None):
    """Exercise 4.7's decode attention with one thing done wrong at a time."""
    R, H, D = q.shape
    block_size = key_blocks.shape[2]
    out = []
    for r in range(R):
        n = int(lengths[r])
        count = -(-n // block_size) if kind != "full blocks only" else n // block_size
        blocks = torch.arange(count) if kind == "physical order" else block_tables[r, :count]
        keys = key_blocks[blocks].transpose(0, 1).reshape(H, -1, D)
        values = value_blocks[blocks].transpose(0, 1).reshape(H, -1, value_blocks.shape[-1])
        if kind not in ("stale slots", "full blocks only"):
            keys, values = keys[:, :n], values[:, :n]
        scale = 1.0 if kind == "no scale" else D**-0.5
        scores = (keys @ q[r, :, :, None])[..., 0] * scale
        out.append((torch.softmax(scores, -1)[:, None, :] @ values)[:, 0])
    return torch.stack(out)


def _gqa(q, k, v, *, kind=None):
    """Exercise 4.8's GQA decode with one thing done wrong at a time."""
    B, H_q, D = q.shape
    H_kv = k.shape[1]
    group = H_q // H_kv
    if kind == "repeated":
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        weights = torch.softmax((k @ q[..., None])[..., 0] * D**-0.5, -1)  # (B, H_q, S)
        return (weights[..., None, :] @ v)[..., 0, :]
    if kind == "broadcast":  # (B, H_kv, group, 1, D) @ (B, H_kv, 1, D, S): matmul expands K per head
        scores = (q.view(B, H_kv, group, 1, D) @ k.unsqueeze(2).transpose(-1, -2))[..., 0, :] * D**-0.5
        return (torch.softmax(scores, -1).unsqueeze(-2) @ v.unsqueeze(2))[..., 0, :].reshape(B, H_q, -1)
    if kind == "cycled":
        queries = q.reshape(B, group, H_kv, D).transpose(1, 2)
    else:
        queries = q.reshape(B, H_kv, group, D)
    scale = 1.0 if kind == "no scale" else D**-0.5
    out = torch.softmax(queries @ k.transpose(-1, -2) * scale, -1) @ v  # (B, H_kv, group, D_v)
    if kind == "cycled":
        out = out.transpose(1, 2)
    return out.reshape(B, H_q, v.shape[-1])


MISTAKES = {
    "4.7": [
        ("blocks read in physical order", "physical order", lambda *a: _paged(*a, kind="physical order")),
        ("stale slots read", "stale data", lambda *a: _paged(*a, kind="stale slots")),
        (
            "the partial last block left out",
            "partly filled block",
            lambda *a: _paged(*a, kind="full blocks only"),
        ),
        ("no scale", "without the 1/sqrt(D) scale", lambda *a: _paged(*a, kind="no scale")),
        (
            "SDPA on the gathered cache",
            "PyTorch shortcut",
            lambda q, kb, vb, tables, lengths: torch.stack(
                [
                    F.scaled_dot_product_attention(
                        q[r, :, None],
                        kb[tables[r]].transpose(0, 1).flatten(1, 2)[:, : int(n)],
                        vb[tables[r]].transpose(0, 1).flatten(1, 2)[:, : int(n)],
                    )[:, 0]
                    for r, n in enumerate(lengths)
                ]
            ),
        ),
        (
            "the library's PagedKVCache",
            "course's own code",
            lambda q, kb, vb, tables, lengths: course_lib.kv_cache.PagedKVCache(
                kb.shape[0], kb.shape[2], kb.shape[1], kb.shape[3]
            ).attention(0, q[0, :, None]),
        ),
    ],
    "4.8": [
        (
            "K and V repeated per query head",
            "copied for every query head",
            lambda *a: _gqa(*a, kind="repeated"),
        ),
        ("a broadcasting matmul", "copied for every query head", lambda *a: _gqa(*a, kind="broadcast")),
        ("the heads cycled", "heads cycled", lambda *a: _gqa(*a, kind="cycled")),
        ("no scale", "without the 1/sqrt(D) scale", lambda *a: _gqa(*a, kind="no scale")),
        (
            "SDPA with enable_gqa",
            "PyTorch shortcut",
            lambda q, k, v: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0],
        ),
        (
            "the library's gqa_attention",
            "course's own code",
            lambda q, k, v: course_lib.kv_cache.gqa_attention(q[:, :, None], k, v)[:, :, 0],
        ),
    ],
}
