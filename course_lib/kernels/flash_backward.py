"""FlashAttention-2's backward pass as two Triton kernels, and the autograd function around them.

The forward pass saved only q, k, v, the output O and the logsumexp L. Every tile of the
attention weights is recomputed from them, ``P = exp(s - L)``, exactly as
``course_lib.tiling.flash_backward`` does; with ``D = rowsum(dO * O)``:

    dV = P^T dO,    dP = dO V^T,    dS = P * (dP - D),    dQ = scale dS K,    dK = scale dS^T Q.

dK and dV of a K/V block sum over *queries*, dQ of a Q block over *keys*. FA2 gives each its own
kernel so that every program owns the rows it writes and no two programs add into the same
memory: :func:`fa2_backward_dkdv_kernel` (one program per K/V block, inner loop over Q blocks)
and :func:`fa2_backward_dq_kernel` (one program per Q block, inner loop over K/V blocks). The
price is computing the scores twice; the alternative, one kernel with atomic adds into dQ, is
what the FA2 paper does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ..checks import check_bool
from .common import compute_dtype_for_dot, dot_precision, launch, padded_dim
from .flash_forward import _fa2_forward, causal_key_end, check_flash_inputs

__all__ = ["fa2_backward_dkdv_kernel", "fa2_backward_dq_kernel", "flash_attention"]


@triton.jit
def fa2_backward_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV_OUT,  # DELTA is rowsum(dO * O) minus any gradient on the logsumexp
    T, S, D, DV, scale,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One K/V block's dK and dV: the outer loop of ``tiling.flash_backward``, as one program."""
    start_n = tl.program_id(0) * BLOCK_N
    head = tl.program_id(1)
    Q += head * T * D
    DO += head * T * DV
    LSE += head * T
    DELTA += head * T
    K += head * S * D
    V += head * S * DV
    DK += head * S * D
    DV_OUT += head * S * DV

    cols = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    value_dims = tl.arange(0, BLOCK_DV)
    key_mask = (cols[:, None] < S) & (dims[None, :] < D)
    value_mask = (cols[:, None] < S) & (value_dims[None, :] < DV)
    k = tl.load(K + cols[:, None] * D + dims[None, :], mask=key_mask, other=0.0)
    v = tl.load(V + cols[:, None] * DV + value_dims[None, :], mask=value_mask, other=0.0)
    grad_k = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    grad_v = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    query_start = 0
    if CAUSAL:  # queries before start_n - (S - T) see none of these keys: start at their block
        query_start = (tl.maximum(start_n - (S - T), 0) // BLOCK_M) * BLOCK_M
    for start_m in range(query_start, T, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = tl.load(
            Q + rows[:, None] * D + dims[None, :], mask=(rows[:, None] < T) & (dims[None, :] < D), other=0.0
        )
        grad_out = tl.load(
            DO + rows[:, None] * DV + value_dims[None, :],
            mask=(rows[:, None] < T) & (value_dims[None, :] < DV),
            other=0.0,
        )
        lse = tl.load(LSE + rows, mask=rows < T, other=0.0)
        delta = tl.load(DELTA + rows, mask=rows < T, other=0.0)
        visible = (rows[:, None] < T) & (cols[None, :] < S)
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + S - T)
        # P recomputed from the logsumexp: no (T, S) matrix was ever stored.
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        probabilities = tl.where(visible, tl.exp(scores - lse[:, None]), 0.0)
        grad_v += tl.dot(tl.trans(probabilities.to(grad_out.dtype)), grad_out, input_precision=PRECISION)
        grad_probabilities = tl.dot(grad_out, tl.trans(v), input_precision=PRECISION)
        grad_scores = probabilities * (grad_probabilities - delta[:, None])
        grad_k += tl.dot(tl.trans(grad_scores.to(q.dtype)), q, input_precision=PRECISION)

    tl.store(DK + cols[:, None] * D + dims[None, :], (grad_k * scale).to(DK.dtype.element_ty), mask=key_mask)
    tl.store(
        DV_OUT + cols[:, None] * DV + value_dims[None, :], grad_v.to(DV_OUT.dtype.element_ty), mask=value_mask
    )


@triton.jit
def fa2_backward_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    T, S, D, DV, scale,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One Q block's dQ: the forward pass's loop order, with the same causal block skipping."""
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    Q += head * T * D
    DO += head * T * DV
    LSE += head * T
    DELTA += head * T
    DQ += head * T * D
    K += head * S * D
    V += head * S * DV

    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    value_dims = tl.arange(0, BLOCK_DV)
    query_mask = (rows[:, None] < T) & (dims[None, :] < D)
    q = tl.load(Q + rows[:, None] * D + dims[None, :], mask=query_mask, other=0.0)
    grad_out = tl.load(
        DO + rows[:, None] * DV + value_dims[None, :],
        mask=(rows[:, None] < T) & (value_dims[None, :] < DV),
        other=0.0,
    )
    lse = tl.load(LSE + rows, mask=rows < T, other=0.0)
    delta = tl.load(DELTA + rows, mask=rows < T, other=0.0)
    grad_q = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    key_end = S
    if CAUSAL:
        key_end = causal_key_end(start_m, T, S, BLOCK_M)
    for start_n in range(0, key_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(
            K + cols[:, None] * D + dims[None, :], mask=(cols[:, None] < S) & (dims[None, :] < D), other=0.0
        )
        v = tl.load(
            V + cols[:, None] * DV + value_dims[None, :],
            mask=(cols[:, None] < S) & (value_dims[None, :] < DV),
            other=0.0,
        )
        visible = (rows[:, None] < T) & (cols[None, :] < S)
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + S - T)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        probabilities = tl.where(visible, tl.exp(scores - lse[:, None]), 0.0)
        grad_probabilities = tl.dot(grad_out, tl.trans(v), input_precision=PRECISION)
        grad_scores = probabilities * (grad_probabilities - delta[:, None])
        grad_q += tl.dot(grad_scores.to(k.dtype), k, input_precision=PRECISION)

    tl.store(
        DQ + rows[:, None] * D + dims[None, :], (grad_q * scale).to(DQ.dtype.element_ty), mask=query_mask
    )


def _fa2_backward(q, k, v, out, lse, grad_out, grad_lse, causal, scale, block_m, block_n, input_precision):
    """Launch both backward kernels; returns ``(dq, dk, dv)`` in the dtype of q."""
    B, H, T, D = q.shape
    S, DV = k.shape[2], v.shape[3]
    q, k, v, grad_out = (x.contiguous() for x in (q, k, v, grad_out))
    # D_i = rowsum(dO * O): one small reduction (FA2 runs it as its own tiny kernel). A gradient
    # on the logsumexp adds to dP - D, since d lse / d s = P.
    delta = (grad_out.float() * out.float()).sum(dim=-1) - grad_lse.float()
    # A query that saw no key has lse = -inf; +inf makes its recomputed P exactly 0, not NaN.
    safe_lse = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse).contiguous()
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if T == 0 or S == 0:
        return grad_q.zero_(), grad_k.zero_(), grad_v.zero_()
    constants = dict(
        CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=padded_dim(D), BLOCK_DV=padded_dim(DV),
        PRECISION=dot_precision(q.dtype, input_precision), num_warps=4, num_stages=1,
        blocks=f"block_m={block_m}, block_n={block_n} with head dims {D}/{DV} in {q.dtype}",
    )  # fmt: skip
    launch(
        fa2_backward_dkdv_kernel,
        (triton.cdiv(S, block_n), B * H),
        q, k, v, grad_out, safe_lse, delta, grad_k, grad_v, T, S, D, DV, scale,
        **constants,
    )  # fmt: skip
    launch(
        fa2_backward_dq_kernel,
        (triton.cdiv(T, block_m), B * H),
        q, k, v, grad_out, safe_lse, delta, grad_q, T, S, D, DV, scale,
        **constants,
    )  # fmt: skip
    return grad_q, grad_k, grad_v


class _FlashAttentionKernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, block_m, block_n, input_precision):
        input_dtype = q.dtype
        work = compute_dtype_for_dot(input_dtype)  # bfloat16 -> float32 under the interpreter only
        q, k, v = (x.to(work) for x in (q, k, v))
        out, lse = _fa2_forward(q, k, v, causal, scale, block_m, block_n, input_precision)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.settings = (causal, scale, block_m, block_n, input_precision)
        ctx.input_dtype = input_dtype
        return out.to(input_dtype), lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
        grads = _fa2_backward(q, k, v, out, lse, grad_out.to(q.dtype), grad_lse, *ctx.settings)
        return tuple(g.to(ctx.input_dtype) for g in grads) + (None,) * 5


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    return_lse: bool = False,
    input_precision: str = "ieee",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2 in Triton, differentiable: the kernel twin of ``course_lib.tiling.flash_attention``.

    Args:
        q: ``(B, H, T, D)``; k: ``(B, H, S, D)``; v: ``(B, H, S, D_v)``; float16, bfloat16 or
            float32, on a CUDA GPU (or on the CPU under Triton's interpreter); D, D_v in 1 .. 128.
        causal: query i sees keys 0 .. S - T + i (aligned to the end when T != S); K blocks wholly
            above the diagonal are skipped.
        scale: multiplies the scores; defaults to ``D ** -0.5``.
        block_m, block_n: rows of q and of k/v per tile, one of 16, 32, 64, 128 (default 64 x 64,
            32 x 32 for float32 with head dims above 64 so the tiles fit in shared memory).
        return_lse: also return the float32 logsumexp ``(B, H, T)``.
        input_precision: how a float32 ``tl.dot`` multiplies on a GPU: ``"ieee"`` (exact float32,
            the default) or ``"tf32"`` (tensor cores, about 3 decimal digits). Ignored for 16-bit inputs.

    Returns:
        ``(B, H, T, D_v)`` in the dtype of q (and the logsumexp). A query that sees no key gets
        zeros and logsumexp ``-inf``. The backward pass runs :func:`fa2_backward_dkdv_kernel` and
        :func:`fa2_backward_dq_kernel`, recomputing the weights from the saved logsumexp.
    """
    _, scale, block_m, block_n = check_flash_inputs(q, k, v, causal, scale, block_m, block_n, input_precision)
    check_bool(return_lse, "return_lse")
    out, lse = _FlashAttentionKernel.apply(q, k, v, causal, scale, block_m, block_n, input_precision)
    return (out, lse) if return_lse else out
