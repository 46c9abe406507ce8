"""SageAttention2, simulated: INT4 ``Q K^T`` with per-thread scales, FP8 ``P V`` in two levels.

SageAttention (:mod:`.quantized`) made ``Q K^T`` INT8 and kept ``P V`` in 16 bits. SageAttention2
(Zhang et al., 2025, "SageAttention2: Efficient Attention with Thorough Outlier Smoothing and
Per-thread INT4 Quantization") goes further on both products, and each step fixes the error the
previous one would bring:

1. **Smooth Q as well as K.** INT4 has only the codes -7 .. 7, so a channel whose values sit far
   from zero wastes them. K loses its mean over all tokens (softmax ignores the constant it
   removes, as in SageAttention). Q loses its mean over each block of queries, ``q_bar``; that
   term does not cancel, so its scores ``q_bar . gamma(K_j)`` (one row per query block, a cheap
   GEMV) are added back in full precision:
   ``Q K^T = gamma(Q) gamma(K)^T + q_bar gamma(K)^T + (terms constant along each row)``.
2. **Per-thread INT4 scales.** One scale per token would be accurate but each thread would
   then juggle many scales; one per block is cheap but coarse. In the tensor-core layout of
   ``mma.m16n8k64``, a thread's accumulators touch the query rows ``r`` and ``r + 8`` of its
   warp's 16 rows and the keys ``2t, 2t + 1`` of every 8 keys. Giving exactly those rows one
   scale (8 groups per 16 queries, 4 groups per block of keys) costs nothing at dequantisation
   and is nearly as accurate as per token (:func:`thread_groups`).
3. **FP8 (e4m3) P V with a static scale.** The unnormalised ``P~ = exp(S - m)`` lies in
   ``[0, 1]``; times 448 it fills e4m3's range. V gets one scale per channel (its outliers are
   channels).
4. **Two-level accumulation.** The FP8 tensor-core instruction accumulates in what behaves like
   an FP22 number (8 exponent bits, 13 mantissa bits), truncating low bits at each step.
   Summing a whole row of ``P~ V`` there loses precision step after step; SageAttention2
   accumulates one key block at a time in FP22 and adds the block's result into an FP32 buffer.

The arithmetic is simulated in float32 (float64 stays float64): integer or e4m3 codes times
their scales, FP22 as a float with its mantissa cut to 13 bits (:func:`truncate_mantissa`).
This is a numerical model of the kernel, for measuring errors; it is not differentiable and it
does not save memory here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import (
    check_attention_inputs,
    check_bool,
    check_choice,
    check_int,
    check_like,
    check_tensor,
    compute_dtype,
    resolve_scale,
)
from .online_softmax import _finite_or_zero
from .quantized import FP8_E4M3_MAX, quantize_blocks

__all__ = [
    "thread_groups",
    "quantize_groups",
    "truncate_mantissa",
    "sage2_attention",
    "outlier_qkv",
    "AttentionError",
    "attention_error",
]

WARP_ROWS = 16  # query rows one warp handles in mma.m16n8k64
THREAD_ROW_STRIDE = 8  # a thread holds rows r and r + 8 of its warp's 16
KEY_GROUPS_PER_BLOCK = 4  # a thread holds keys 2t, 2t + 1 of every 8: 4 distinct thread columns
FP22_MANTISSA_BITS = 13


# --- quantisation groups --------------------------------------------------------------------------


def thread_groups(length: int, *, operand: str, block_size: int, granularity: str = "thread") -> torch.Tensor:
    """The quantisation group of each of ``length`` rows of Q (``operand="q"``) or K (``"k"``).

    ``granularity``:
    - ``"thread"`` (SageAttention2): Q rows share a scale when they sit in the same 16-row warp
      slice of a block and have the same index mod 8 (the rows ``r``, ``r + 8`` of one thread);
      K rows share one when they are in the same block and have the same ``(index mod 8) // 2``
      (the key pair ``2t, 2t + 1`` of every 8 keys of one thread).
    - ``"block"``: one scale per block of ``block_size`` rows (SageAttention).
    - ``"token"``: one scale per row.

    Returns a long tensor ``(length,)`` of group ids, numbered from 0 in order of first row.
    """
    length = check_int(length, "length", min=0)
    check_choice(operand, "operand", ("q", "k"))
    block_size = check_int(block_size, "block_size", min=1)
    check_choice(granularity, "granularity", ("thread", "block", "token"))
    rows = torch.arange(length)
    if granularity == "token":
        return rows
    block, inside = rows // block_size, rows % block_size
    if granularity == "block":
        return block
    if operand == "q":
        warps_per_block = -(-block_size // WARP_ROWS)
        groups = (
            block * warps_per_block + inside // WARP_ROWS
        ) * THREAD_ROW_STRIDE + inside % THREAD_ROW_STRIDE
    else:
        groups = block * KEY_GROUPS_PER_BLOCK + (inside % 8) // 2
    return torch.unique(groups, return_inverse=True)[1]  # renumber densely


def quantize_groups(
    x: torch.Tensor, groups: torch.Tensor, *, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric integer quantisation of ``(B, H, N, D)`` with one scale per group of rows.

    ``groups`` ``(N,)`` gives each row's group (:func:`thread_groups`). Codes lie in
    ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]`` (-7 .. 7 for INT4). Returns ``(codes, scales)``:
    codes ``(B, H, N, D)`` stored as floats and per-row scales ``(B, H, N)``, so that
    ``codes * scales[..., None]`` approximates x. An all-zero group keeps scale 1.
    """
    check_tensor(x, "x", ndim=4, floating=True)
    check_tensor(groups, "groups", ndim=1)
    bits = check_int(bits, "bits", min=2, max=8)
    if groups.shape[0] != x.shape[2] or groups.is_floating_point():
        raise ValueError(f"groups must be {x.shape[2]} integer group ids, one per row of x, got {groups}")
    values = x.to(compute_dtype(x))
    B, H, N, _ = values.shape
    groups = groups.to(values.device)
    count = int(groups.max()) + 1 if N else 0
    row_max = values.abs().amax(dim=-1) if N else values.new_zeros(B, H, 0)
    group_max = values.new_zeros(B, H, count).scatter_reduce(
        -1, groups.expand(B, H, N), row_max, reduce="amax", include_self=True
    )
    largest_code = float(2 ** (bits - 1) - 1)
    group_scale = torch.where(group_max > 0, group_max / largest_code, torch.ones_like(group_max))
    scales = group_scale.gather(-1, groups.expand(B, H, N))
    codes = torch.round(values / scales.unsqueeze(-1)).clamp(-largest_code, largest_code)
    return codes, scales


def truncate_mantissa(x: torch.Tensor, mantissa_bits: int = FP22_MANTISSA_BITS) -> torch.Tensor:
    """Round ``x`` toward zero to ``mantissa_bits`` stored mantissa bits (FP22 keeps 13 of FP32's 23).

    The exponent is kept, so only precision is lost, never range.
    """
    check_tensor(x, "x", floating=True)
    mantissa_bits = check_int(mantissa_bits, "mantissa_bits", min=0, max=52)
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2^exponent, |mantissa| in [0.5, 1)
    steps = 2.0 ** (mantissa_bits + 1)  # the leading bit is implicit, so mantissa_bits + 1 in all
    return torch.ldexp(torch.trunc(mantissa * steps) / steps, exponent)


# --- the attention --------------------------------------------------------------------------------


def _block_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of each block of rows ``(B, H, N, D) -> (B, H, ceil(N / block), D)``; the last block
    may be shorter and is averaged over the rows it has."""
    B, H, N, D = x.shape
    blocks = -(-N // block_size)
    padded = F.pad(x, (0, 0, 0, blocks * block_size - N)).view(B, H, blocks, block_size, D)
    counts = torch.full((blocks,), block_size, dtype=x.dtype, device=x.device)
    counts[-1] = N - (blocks - 1) * block_size
    return padded.sum(dim=3) / counts.view(1, 1, blocks, 1)


def sage2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bits: int = 4,
    granularity: str = "thread",
    smooth_q: bool = True,
    smooth_k: bool = True,
    smooth_v: bool = False,
    pv_format: str = "fp8",
    accumulation: str = "two_level",
    block_q: int = 128,
    block_k: int = 64,
    mma_k: int = 32,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """SageAttention2's numerics: INT4 (or INT8) ``Q K^T``, FP8 ``P V``, two-level accumulation.

    Args:
        q: ``(B, H, T, D)``; k: ``(B, H, S, D)``; v: ``(B, H, S, D_v)``.
        bits: integer bits of the Q and K codes: 4 (SageAttn2-4b) or 8 (SageAttn2-8b).
        granularity: scales of Q and K per ``"thread"`` (the paper), ``"block"`` or ``"token"``.
        smooth_q: subtract each query block's mean and add its scores back in full precision.
        smooth_k: subtract K's mean over all tokens.
        smooth_v: subtract V's per-channel mean before FP8 and add it back at the end (exact,
            since each row of weights sums to 1).
        pv_format: ``"fp8"`` (P~ times 448 and V per channel in e4m3) or ``"full"`` (no
            quantisation of ``P V``, as SageAttention).
        accumulation: how the FP8 ``P V`` products are summed: ``"two_level"`` (FP22 inside a
            key block, FP32 across blocks), ``"fp22"`` (one FP22 accumulator for the whole row,
            the pitfall) or ``"fp32"`` (an ideal accumulator). Ignored with ``pv_format="full"``.
        block_q, block_k: rows per query and key block (Q smoothing, block scales, the tile loop).
        mma_k: keys summed per tensor-core instruction before each FP22 truncation.
        causal: query ``i`` sees keys up to ``S - T + i``.
        scale: multiplies the scores; defaults to ``D ** -0.5``.

    Returns ``(B, H, T, D_v)`` in the dtype of ``q``; a query with no key gets zeros.
    """
    B, H, T, S, D, D_v = check_attention_inputs(q, k, v)
    bits = check_choice(bits, "bits", (4, 8))
    check_choice(granularity, "granularity", ("thread", "block", "token"))
    for name, flag in (
        ("smooth_q", smooth_q),
        ("smooth_k", smooth_k),
        ("smooth_v", smooth_v),
        ("causal", causal),
    ):
        check_bool(flag, name)
    check_choice(pv_format, "pv_format", ("fp8", "full"))
    check_choice(accumulation, "accumulation", ("two_level", "fp22", "fp32"))
    block_q = check_int(block_q, "block_q", min=1)
    block_k = check_int(block_k, "block_k", min=1)
    mma_k = check_int(mma_k, "mma_k", min=1)
    scale = resolve_scale(scale, D)
    dtype = compute_dtype(q)
    if T == 0 or S == 0:
        return q.new_zeros(B, H, T, D_v)

    # 1. Smoothing: K by its mean over all tokens, Q by the mean of each query block.
    queries, keys, values = q.to(dtype), k.to(dtype), v.to(dtype)
    if smooth_k:
        keys = keys - keys.mean(dim=-2, keepdim=True)
    query_means = torch.zeros(B, H, -(-T // block_q), D, dtype=dtype, device=q.device)
    if smooth_q:
        query_means = _block_means(queries, block_q)
        queries = queries - query_means.repeat_interleave(block_q, dim=2)[:, :, :T]

    # 2. INT4 codes with per-thread (or block, token) scales; Q K^T on the integer codes.
    q_codes, q_scales = quantize_groups(
        queries, thread_groups(T, operand="q", block_size=block_q, granularity=granularity), bits=bits
    )
    k_codes, k_scales = quantize_groups(
        keys, thread_groups(S, operand="k", block_size=block_k, granularity=granularity), bits=bits
    )
    scores = (q_codes @ k_codes.transpose(-2, -1)) * q_scales.unsqueeze(-1) * k_scales.unsqueeze(-2)
    # The query means' scores, one row per query block, in full precision (the GEMV).
    scores = scores + (query_means @ keys.transpose(-2, -1)).repeat_interleave(block_q, dim=2)[:, :, :T]
    scores = scores * scale
    if causal:
        rows = torch.arange(T, device=q.device).unsqueeze(1)
        cols = torch.arange(S, device=q.device).unsqueeze(0)
        scores = scores.masked_fill(cols > rows + (S - T), float("-inf"))

    # 3. V in FP8 with one scale per channel (a block of one row of V^T), optionally smoothed.
    value_means = values.mean(dim=-2, keepdim=True) if smooth_v else torch.zeros_like(values[:, :, :1])
    values = values - value_means
    if pv_format == "fp8":
        v_codes, v_scales = quantize_blocks(values.transpose(-2, -1), block_size=1, number_format="fp8")
        values = v_codes.transpose(-2, -1).to(dtype)  # (B, H, S, D_v) e4m3 codes; scales (B, H, D_v)

    # 4. The tile loop of FlashAttention: online softmax, P~ per tile, P~ V accumulated.
    row_max = torch.full((B, H, T), float("-inf"), dtype=dtype, device=q.device)
    row_sum = torch.zeros(B, H, T, dtype=dtype, device=q.device)
    outer = torch.zeros(B, H, T, D_v, dtype=dtype, device=q.device)
    for start in range(0, S, block_k):
        tile = scores[..., start : start + block_k]
        new_max = torch.maximum(row_max, tile.amax(dim=-1))
        safe_max = _finite_or_zero(new_max)
        rescale = torch.exp(row_max - safe_max)  # 0 while the row has seen nothing yet
        weights = torch.exp(tile - safe_max.unsqueeze(-1))  # P~ in [0, 1]
        row_sum = row_sum * rescale + weights.sum(dim=-1)  # from P~ before quantising, in FP32
        row_max = new_max
        tile_values = values[:, :, start : start + block_k]
        if pv_format == "full":
            outer = outer * rescale.unsqueeze(-1) + weights @ tile_values
            continue
        weights = (weights * FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(dtype)
        if accumulation == "fp22":
            # One FP22 register for the whole row: every step truncates the running output.
            outer = outer * rescale.unsqueeze(-1)
            for step in range(0, weights.shape[-1], mma_k):
                product = weights[..., step : step + mma_k] @ tile_values[:, :, step : step + mma_k]
                outer = truncate_mantissa(outer + product)
            continue
        block_result = torch.zeros_like(outer)
        for step in range(0, weights.shape[-1], mma_k):
            product = weights[..., step : step + mma_k] @ tile_values[:, :, step : step + mma_k]
            block_result = block_result + product
            if accumulation == "two_level":
                block_result = truncate_mantissa(block_result)  # FP22 inside the block only
        outer = outer * rescale.unsqueeze(-1) + block_result  # FP32 across blocks

    out = outer / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum)).unsqueeze(-1)
    if pv_format == "fp8":
        out = out * v_scales.unsqueeze(-2) / FP8_E4M3_MAX
    out = out + value_means * (row_sum > 0).unsqueeze(-1)  # a row with no key stays zero
    return out.to(q.dtype)


# --- inputs and errors for the comparison ---------------------------------------------------------


def outlier_qkv(
    batch_size: int,
    num_heads: int,
    T: int,
    S: int,
    head_dim: int,
    *,
    channel_bias: float = 3.0,
    outlier_channels: int = 4,
    outlier_scale: float = 8.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V shaped like real activations: a per-channel offset shared by every token, much
    larger in a few outlier channels, plus token-to-token noise.

    The offset (standard deviation ``channel_bias``, times ``outlier_scale`` in
    ``outlier_channels`` channels) is what SageAttention observed in K and SageAttention2 in Q:
    it sets the quantisation scale of every group and leaves the varying part few codes. K gets
    twice Q's offset; V a smaller one. Deterministic in ``seed``.
    """
    for name, value in (("batch_size", batch_size), ("num_heads", num_heads), ("head_dim", head_dim)):
        check_int(value, name, min=1)
    T = check_int(T, "T", min=0)
    S = check_int(S, "S", min=0)
    outlier_channels = check_int(outlier_channels, "outlier_channels", min=0, max=head_dim)
    seed = check_int(seed, "seed", min=0)
    generator = torch.Generator().manual_seed(seed)
    channels = torch.randperm(head_dim, generator=generator)[:outlier_channels]

    def offset(size: float) -> torch.Tensor:
        bias = torch.randn(num_heads, 1, head_dim, generator=generator) * size
        bias[..., channels] *= outlier_scale
        return bias

    q = torch.randn(batch_size, num_heads, T, head_dim, generator=generator) + offset(channel_bias)
    k = torch.randn(batch_size, num_heads, S, head_dim, generator=generator) + offset(2 * channel_bias)
    v = torch.randn(batch_size, num_heads, S, head_dim, generator=generator) + offset(channel_bias / 2)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@dataclass(frozen=True)
class AttentionError:
    """How far an approximate attention output is from the exact one (SageAttention's metrics):
    cosine similarity (1 is perfect), relative L1 ``sum|a - e| / sum|e|`` and RMSE."""

    cosine: float
    relative_l1: float
    rmse: float


def attention_error(approximate: torch.Tensor, exact: torch.Tensor) -> AttentionError:
    """Cosine similarity, relative L1 and RMSE of ``approximate`` against ``exact`` (same shape),
    computed in float64 over all entries."""
    check_tensor(approximate, "approximate", floating=True)
    check_tensor(exact, "exact", floating=True)
    if approximate.shape != exact.shape:
        raise ValueError(
            f"approximate must have the shape of exact {tuple(exact.shape)}, got {tuple(approximate.shape)}"
        )
    check_like(approximate, "approximate", exact, "exact", dtype=False)
    a, e = approximate.double().flatten(), exact.double().flatten()
    # Identical outputs are a perfect match even when both are zero (cosine_similarity says 0 there).
    cosine = 1.0 if torch.equal(a, e) else float(torch.nn.functional.cosine_similarity(a, e, dim=0))
    relative_l1 = float((a - e).abs().sum() / e.abs().sum().clamp(min=1e-300))
    rmse = float(((a - e) ** 2).mean().sqrt()) if a.numel() else 0.0
    return AttentionError(cosine, relative_l1, rmse)
