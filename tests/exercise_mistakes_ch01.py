"""Wrong solutions of chapter 01's new build exercises (1.7, 1.8), one per misconception: each must fail its
checker with a message that names it (the fragment listed). Loaded by tests/exercise_mistakes.py."""

import math

import torch
import torch.nn.functional as F

import course_lib
from course_lib.relative_positions import t5_buckets


def _mha(
    x,
    context,
    W_q,
    W_k,
    W_v,
    W_o,
    num_heads,
    lengths=None,
    causal=False,
    *,
    scale_by="D",
    out=True,
    split="blocks",
    pad="keys",
    start=False,
    nan=False,
    kv_from_x=False,
):
    """A student's layer with one switch per misconception."""
    B, T, d_model = x.shape
    if kv_from_x:
        context = x
    S = context.shape[1]
    D = d_model // num_heads

    def heads(t):
        if split == "round-robin":  # view as (B, L, D, H): column c goes to head c % H
            return t.reshape(B, t.shape[1], D, num_heads).permute(0, 3, 1, 2)
        return t.reshape(B, t.shape[1], num_heads, D).transpose(1, 2)

    def merge(t):
        if split == "round-robin":
            return t.permute(0, 2, 3, 1).reshape(B, T, d_model)
        return t.transpose(1, 2).reshape(B, T, d_model)

    q, k, v = heads(x @ W_q), heads(context @ W_k), heads(context @ W_v)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D if scale_by == "D" else d_model)
    allowed = torch.ones(B, 1, T, S, dtype=torch.bool)
    if lengths is not None:
        if pad == "keys":
            allowed = allowed & (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]
        else:
            allowed = allowed & (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None])[:, None, :, None]
    if causal:
        allowed = allowed & (torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (0 if start else S - T))
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    if not nan:
        weights = weights.nan_to_num(0.0)
    merged = merge(weights @ v)
    return merged @ W_o if out else merged


def _buckets(relative, *, bidirectional, num_buckets, max_distance, mistake=None):
    """A student's T5 buckets with one misconception."""
    distance = relative.long() if mistake == "sign" else -relative.long()
    bucket = torch.zeros_like(distance)
    half = num_buckets
    if bidirectional:
        half = num_buckets if mistake == "no halving" else num_buckets // 2
        side = distance > 0 if mistake == "offset before" else distance < 0
        bucket = bucket + side.long() * half
        distance = distance.abs()
    elif mistake != "no clamp":
        distance = distance.clamp(min=0)
    max_exact = half // 2
    ratio = torch.log(distance.double().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    far = max_exact + (ratio * (half - max_exact)).long()
    if mistake != "no cap":
        far = far.clamp(max=half - 1)
    result = bucket + torch.where(distance < max_exact, distance, far)
    return result.float() if mistake == "float" else result


def _mha_with(**options):
    return lambda *args, **kwargs: _mha(*args, **kwargs, **options)


def _buckets_with(mistake):
    return lambda relative, **kwargs: _buckets(relative, **kwargs, mistake=mistake)


MISTAKES = {
    "1.7": [
        ("no output projection", "without the output projection W_o", _mha_with(out=False)),
        ("scaled by sqrt(d_model)", "1/sqrt(d_model) instead of 1/sqrt(D)", _mha_with(scale_by="d_model")),
        ("heads dealt out round-robin", "round-robin", _mha_with(split="round-robin")),
        ("padding applied to the queries", "applied to the queries", _mha_with(pad="queries")),
        ("causal aligned to the start", "aligned to the start", _mha_with(start=True)),
        ("NaN for queries that see no key", "see no key at all", _mha_with(nan=True)),
        ("keys and values from x", "projected from x instead of context", _mha_with(kv_from_x=True)),
        (
            "the library's MultiHeadAttention",
            "course's own code",
            lambda x, context, W_q, W_k, W_v, W_o, num_heads, lengths=None, causal=False: (
                course_lib.MultiHeadAttention(x.shape[-1], num_heads).double()(x, causal=causal)
            ),
        ),
        (
            "SDPA head by head",
            "PyTorch shortcut",
            lambda x, context, W_q, W_k, W_v, W_o, num_heads, lengths=None, causal=False: (
                F.scaled_dot_product_attention(x @ W_q, context @ W_k, context @ W_v) @ W_o
            ),
        ),
        (
            "torch.nn.MultiheadAttention",
            "PyTorch shortcut",
            lambda x, context, W_q, W_k, W_v, W_o, num_heads, lengths=None, causal=False: (
                torch.nn.MultiheadAttention(x.shape[-1], num_heads, batch_first=True).double()(
                    x, context, context
                )[0]
            ),
        ),
        (
            "F.multi_head_attention_forward",
            "PyTorch shortcut",
            lambda x, context, W_q, W_k, W_v, W_o, num_heads, lengths=None, causal=False: (
                F.multi_head_attention_forward(
                    x.transpose(0, 1), context.transpose(0, 1), context.transpose(0, 1), x.shape[-1],
                    num_heads, torch.cat([W_q.T, W_k.T, W_v.T]), None, None, None, False, 0.0, W_o.T, None,
                )[0].transpose(0, 1)
            ),
        ),  # fmt: skip
    ],
    "1.8": [
        ("the sign flipped", "sign of relative_position flipped", _buckets_with("sign")),
        ("no cap at the last bucket", "without the cap", _buckets_with("no cap")),
        (
            "the offset on keys before the query",
            "put on keys before the query instead of after",
            _buckets_with("offset before"),
        ),
        ("num_buckets not halved", "not halved when bidirectional", _buckets_with("no halving")),
        ("causal without clamping later keys", "does not clamp", _buckets_with("no clamp")),
        ("float buckets", "expected integers", _buckets_with("float")),
        ("the library's t5_buckets", "course's own code", lambda relative, **kw: t5_buckets(relative, **kw)),
        (
            "the library's T5 bias module",
            "course's own code",
            lambda relative, **kw: course_lib.relative_positions.T5RelativeBias(4)(3),
        ),
    ],
}  # fmt: skip
