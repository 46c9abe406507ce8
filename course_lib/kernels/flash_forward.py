"""FlashAttention-2's forward pass as a Triton kernel: ``course_lib.tiling.flash``'s FA2 loop on a GPU.

The PyTorch loop walks Q blocks in an outer ``for``; here each Q block is one *program*, and the
GPU runs many at once. ``tl.program_id(0)`` says which Q block this program owns and
``tl.program_id(1)`` which (batch, head). The inner loop over K/V blocks stays a loop. The running
max, sum and accumulator of the Q block are local variables: the compiler keeps them in registers,
on chip, for the whole loop, and only the final output and logsumexp are written to memory.

Masks do the bookkeeping the PyTorch code did with slicing: rows past T, keys past S and lanes past
the head dim are loaded as 0 and never stored; scores that causal attention forbids become -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..checks import check_attention_inputs, check_bool, resolve_scale
from .common import (
    check_block,
    check_head_dim,
    check_indexable,
    check_kernel_dtype,
    check_precision,
    compute_dtype_for_dot,
    dot_precision,
    kernel_device,
    launch,
    padded_dim,
)

__all__ = ["attend_block", "causal_key_end", "fa2_forward_kernel", "fa2_forward", "default_blocks"]


@triton.jit
def attend_block(q, k, v, visible, row_max, row_sum, acc, scale, PRECISION: tl.constexpr):
    """One step of the inner loop: fold a K/V block into the Q block's running softmax.

    q (BLOCK_M, D), k (BLOCK_N, D), v (BLOCK_N, D_v); ``visible`` (BLOCK_M, BLOCK_N) is False for
    keys a query may not see (past S, or above the causal diagonal).
    """
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    scores = tl.where(visible, scores, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row that has seen nothing yet
    probabilities = tl.exp(scores - safe_max[:, None])
    # Everything accumulated so far was relative to the old max: rescale it.
    correction = tl.exp(row_max - safe_max)
    row_sum = row_sum * correction + tl.sum(probabilities, axis=1)
    acc = acc * correction[:, None] + tl.dot(probabilities.to(v.dtype), v, input_precision=PRECISION)
    return new_max, row_sum, acc


@triton.jit
def causal_key_end(start_m, T, S, BLOCK_M: tl.constexpr):
    """One past the last key any query of the block ``start_m .. start_m + BLOCK_M - 1`` may see.

    Query i sees keys 0 .. i + S - T (the diagonal aligned to the end); K blocks from here on are
    wholly above the diagonal, and the loop stops before them.
    """
    return tl.minimum(S, start_m + BLOCK_M + S - T)


@triton.jit
def fa2_forward_kernel(
    Q, K, V, O, LSE,  # contiguous (B, H, T, D), (B, H, S, D), (B, H, S, D_v), (B, H, T, D_v), (B, H, T)
    T, S, D, DV, scale,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
    ATTEND: tl.constexpr = attend_block,  # the loop's two steps, passed in so that the
    KEY_END: tl.constexpr = causal_key_end,  # notebook's exercises can plug in their own
):  # fmt: skip
    # Which tile this program owns: Q block pid 0, of the (batch, head) pid 1.
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    Q += head * T * D  # this (batch, head)'s matrices
    K += head * S * D
    V += head * S * DV
    O += head * T * DV
    LSE += head * T

    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    value_dims = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + rows[:, None] * D + dims[None, :], mask=(rows[:, None] < T) & (dims[None, :] < D), other=0.0
    )

    # The Q block's softmax state: on chip for the whole loop.
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    key_end = S
    if CAUSAL:
        key_end = KEY_END(start_m, T, S, BLOCK_M)  # skip the blocks above the diagonal
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
        visible = cols[None, :] < S
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + S - T)
        row_max, row_sum, acc = ATTEND(q, k, v, visible, row_max, row_sum, acc, scale, PRECISION)

    # Normalise once, at the end; a query that saw no key keeps zeros and logsumexp -inf.
    safe_sum = tl.where(row_sum > 0, row_sum, 1.0)
    out = acc / safe_sum[:, None]
    tl.store(
        O + rows[:, None] * DV + value_dims[None, :],
        out.to(O.dtype.element_ty),
        mask=(rows[:, None] < T) & (value_dims[None, :] < DV),
    )
    lse = tl.where(row_sum > 0, row_max + tl.log(safe_sum), float("-inf"))
    tl.store(LSE + rows, lse, mask=rows < T)


def default_blocks(head_dim: int, value_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """``(block_m, block_n)`` whose tiles fit in the shared memory of every recent NVIDIA GPU (99 KiB
    per block on consumer Ada/Ampere): 64 x 64, or 32 x 32 for float32 with head dims above 64
    (``python -m course_lib.kernels.compile_check`` prints what each kernel needs)."""
    wide = max(head_dim, value_dim) > 64 and dtype == torch.float32
    return (32, 32) if wide else (64, 64)


def check_flash_inputs(q, k, v, causal, scale, block_m, block_n, input_precision):
    """The checks of :func:`fa2_forward` and :func:`course_lib.kernels.flash_attention`."""
    B, H, T, S, D, DV = check_attention_inputs(q, k, v)
    check_kernel_dtype(q, "q")
    check_head_dim(D, "head dim D")
    check_head_dim(DV, "value head dim D_v")
    check_bool(causal, "causal")
    scale = resolve_scale(scale, D)
    default_m, default_n = default_blocks(D, DV, q.dtype)
    block_m = check_block(default_m if block_m is None else block_m, "block_m")
    block_n = check_block(default_n if block_n is None else block_n, "block_n")
    check_precision(input_precision)
    check_indexable((q, k, v), ("q", "k", "v"))
    kernel_device((q, k, v), ("q", "k", "v"))  # last: every argument error is reported on any device
    return (B, H, T, S, D, DV), scale, block_m, block_n


def fa2_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    input_precision: str = "ieee",
    attend=None,
    key_end=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run :func:`fa2_forward_kernel` (no autograd): ``(out (B, H, T, D_v), lse (B, H, T) float32)``.

    Same inputs as :func:`course_lib.kernels.flash_attention`, which adds the backward pass.
    ``attend`` and ``key_end``, ``@triton.jit`` functions with the signatures of :func:`attend_block`
    and :func:`causal_key_end`, replace the library's steps (the notebook's exercises plug in here).
    Under the interpreter bfloat16 inputs run in float32 (see ``common.compute_dtype_for_dot``).
    """
    _, scale, block_m, block_n = check_flash_inputs(q, k, v, causal, scale, block_m, block_n, input_precision)
    steps = {"ATTEND": attend or attend_block, "KEY_END": key_end or causal_key_end}
    work = compute_dtype_for_dot(q.dtype)
    out, lse = _fa2_forward(
        *(x.to(work) for x in (q, k, v)), causal, scale, block_m, block_n, input_precision, **steps
    )
    return out.to(q.dtype), lse


def _fa2_forward(q, k, v, causal, scale, block_m, block_n, input_precision, **steps):
    """The launch, on checked inputs (bfloat16 already cast to float32 under the interpreter)."""
    B, H, T, D = q.shape
    S, DV = k.shape[2], v.shape[3]
    out = q.new_empty(B, H, T, DV)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    if T == 0 or B * H == 0:
        return out, lse
    q, k, v = (x.contiguous() for x in (q, k, v))
    grid = (triton.cdiv(T, block_m), B * H)  # one program per (Q block, batch x head)
    launch(
        fa2_forward_kernel,
        grid,
        q, k, v, out, lse, T, S, D, DV, scale,
        CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=padded_dim(D), BLOCK_DV=padded_dim(DV),
        PRECISION=dot_precision(q.dtype, input_precision), num_warps=4, num_stages=2, **steps,
        blocks=f"block_m={block_m}, block_n={block_n} with head dims {D}/{DV} in {q.dtype}",
    )  # fmt: skip
    return out, lse
