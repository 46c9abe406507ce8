"""Chunked gated linear attention (GLA, and simple GLA) as a Triton kernel.

``course_lib.recurrent.chunk_gated_scan`` computes, for each chunk of C steps, with
``b`` the cumulative log gate inside the chunk (every exponent below is <= 0):

    intra-chunk:  o_t += sum_{s <= t} (q_t . (k_s * exp(b_t - b_s))) v_s     (masked attention)
    inter-chunk:  o_t += (q_t * exp(b_t)) S                                  (read the carried state)
    carry:        S    = exp(b_C) * S + (k * exp(b_C - b))^T V               (decay, then write)

PyTorch does the first two for all chunks at once and scans the states in a short loop. The kernel
gives each (batch x head, block of value dims) one program that walks the chunks in order, with
the state ``S`` (D_k x BLOCK_DV) as a local variable: it lives in registers across the whole
sequence and is written to memory once, at the end, if asked for.

The gate is ``g (B, H, T, D_k)`` (GLA: one log decay per key dimension) or ``g (B, H, T)`` (simple
GLA: one per head and step, as in RetNet with data-dependent decay or Mamba-2). With per-dimension
gates ``exp(b_t - b_s)`` differs for every key dim, so the intra-chunk scores are an elementwise
product summed over D_k, a (C, C, D_k) temporary; with a scalar gate they are one ``tl.dot`` times
a (C, C) decay matrix. Inputs are computed in float32 (the course's rule for half precision).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..checks import check_bool, check_shape, check_tensor, resolve_scale
from ..recurrent._common import check_log_gate, check_recurrent_inputs
from .common import (
    check_block,
    check_head_dim,
    check_indexable,
    check_kernel_dtype,
    check_precision,
    kernel_device,
    launch,
    padded_dim,
)

__all__ = ["gla_chunk_kernel", "gla_chunk"]


@triton.jit
def gla_chunk_kernel(
    Q, K, V, G, O, INITIAL, FINAL,  # contiguous float32: (B, H, T, D_k) x2, (B, H, T, D_v), G, O, states
    T, DK, DV, scale,
    SCALAR_GATE: tl.constexpr, HAS_INITIAL: tl.constexpr, STORE_FINAL: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(1)
    value_dims = tl.program_id(0) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    key_dims = tl.arange(0, BLOCK_DK)
    steps = tl.arange(0, CHUNK)
    causal = steps[:, None] >= steps[None, :]  # inside a chunk, step t reads keys s <= t
    Q += head * T * DK
    K += head * T * DK
    V += head * T * DV
    O += head * T * DV
    if SCALAR_GATE:
        G += head * T
    else:
        G += head * T * DK

    state_mask = (key_dims[:, None] < DK) & (value_dims[None, :] < DV)
    state_offsets = head * DK * DV + key_dims[:, None] * DV + value_dims[None, :]
    state = tl.zeros([BLOCK_DK, BLOCK_DV], dtype=tl.float32)  # S: on chip for the whole sequence
    if HAS_INITIAL:
        state = tl.load(INITIAL + state_offsets, mask=state_mask, other=0.0)

    for chunk_start in range(0, T, CHUNK):
        t = chunk_start + steps
        key_mask = (t[:, None] < T) & (key_dims[None, :] < DK)
        value_mask = (t[:, None] < T) & (value_dims[None, :] < DV)
        # Rows past T load as zeros: zero keys, values and log gates change nothing.
        q = tl.load(Q + t[:, None] * DK + key_dims[None, :], mask=key_mask, other=0.0) * scale
        k = tl.load(K + t[:, None] * DK + key_dims[None, :], mask=key_mask, other=0.0)
        v = tl.load(V + t[:, None] * DV + value_dims[None, :], mask=value_mask, other=0.0)
        if SCALAR_GATE:
            g = tl.load(G + t, mask=t < T, other=0.0)  # (CHUNK,)
            b = tl.cumsum(g, axis=0)  # log decay from the chunk's start, <= 0 and decreasing
            b_end = tl.sum(g, axis=0)
            decay = tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * decay
            q_from_start = q * tl.exp(b)[:, None]
            k_to_end = k * tl.exp(b_end - b)[:, None]
            chunk_decay = tl.exp(b_end)
        else:
            g = tl.load(G + t[:, None] * DK + key_dims[None, :], mask=key_mask, other=0.0)  # (CHUNK, D_k)
            b = tl.cumsum(g, axis=0)
            b_end = tl.sum(g, axis=0)  # (D_k,)
            # exp(b_t - b_s) per key dim, never split into exp(b_t) exp(-b_s): the second overflows.
            relative = tl.where(causal[:, :, None], b[:, None, :] - b[None, :, :], float("-inf"))
            scores = tl.sum(q[:, None, :] * k[None, :, :] * tl.exp(relative), axis=2)
            q_from_start = q * tl.exp(b)
            k_to_end = k * tl.exp(b_end[None, :] - b)
            chunk_decay = tl.exp(b_end)[:, None]
        intra = tl.dot(scores, v, input_precision=PRECISION)
        inter = tl.dot(q_from_start, state, input_precision=PRECISION)
        tl.store(O + t[:, None] * DV + value_dims[None, :], intra + inter, mask=value_mask)
        # Carry the state to the next chunk: decay first, then write.
        state = state * chunk_decay + tl.dot(tl.trans(k_to_end), v, input_precision=PRECISION)

    if STORE_FINAL:
        tl.store(FINAL + state_offsets, state, mask=state_mask)


def gla_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    chunk_size: int = 16,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    block_dv: int = 32,
    input_precision: str = "ieee",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Forward pass of gated linear attention by :func:`gla_chunk_kernel` (no autograd).

    Same recurrence and arguments as ``course_lib.recurrent.gla`` (decay, then write, then read):
    q, k ``(B, H, T, D_k)``, v ``(B, H, T, D_v)``; g the log gates, ``(B, H, T, D_k)`` (GLA) or
    ``(B, H, T)`` (simple GLA), all <= 0; initial_state ``(B, H, D_k, D_v)`` or None.

    Args:
        chunk_size: steps per chunk, one of 16, 32, 64, 128 (the chunk is a ``tl.dot`` operand).
            Per-dimension gates build a (chunk, chunk, D_k) temporary: keep chunks small (16).
        block_dv: value dims per program, one of 16, 32, 64, 128.
        input_precision: ``"ieee"`` or ``"tf32"`` for the float32 ``tl.dot`` on a GPU.

    Returns:
        o ``(B, H, T, D_v)`` in q's dtype, and the float32 final state when ``output_final_state``.
    """
    B, H, T, DK, DV, scale = check_recurrent_inputs(
        q, k, v, form="chunk", forms=("chunk",), chunk_size=chunk_size, scale=scale,
        initial_state=initial_state, output_final_state=output_final_state,
    )  # fmt: skip
    check_tensor(g, "g", ndim=(3, 4), floating=True)
    scalar_gate = g.dim() == 3
    check_shape(
        g,
        "g",
        (B, H, T) if scalar_gate else (B, H, T, DK),
        names="B, H, T" if scalar_gate else "B, H, T, D_k",
    )
    check_log_gate(g, "g")
    tensors = (q, k, v, g) + (() if initial_state is None else (initial_state,))
    names = ("q", "k", "v", "g", "initial_state")[: len(tensors)]
    for x, name in zip(tensors, names):
        check_kernel_dtype(x, name)
    check_head_dim(DK, "key head dim D_k")
    check_head_dim(DV, "value head dim D_v")
    chunk_size = check_block(chunk_size, "chunk_size")
    block_dv = check_block(block_dv, "block_dv")
    check_precision(input_precision)
    check_bool(output_final_state, "output_final_state")
    scale = resolve_scale(scale, DK)
    check_indexable(tensors, names)
    device = kernel_device(tensors, names)

    # The course's rule for half precision: compute in float32, cast the output back.
    q32, k32, v32, g32 = (x.to(torch.float32).contiguous() for x in (q, k, v, g))
    out = torch.zeros(B, H, T, DV, device=device, dtype=torch.float32)
    final = torch.zeros(B, H, DK, DV, device=device, dtype=torch.float32)
    initial = final if initial_state is None else initial_state.to(torch.float32).contiguous()
    if T == 0 or B * H == 0:
        final = initial.clone()
    else:
        launch(
            gla_chunk_kernel,
            (triton.cdiv(DV, block_dv), B * H),
            q32, k32, v32, g32, out, initial, final, T, DK, DV, scale,
            SCALAR_GATE=scalar_gate, HAS_INITIAL=initial_state is not None, STORE_FINAL=output_final_state,
            CHUNK=chunk_size, BLOCK_DK=padded_dim(DK), BLOCK_DV=block_dv, PRECISION=input_precision,
            num_warps=4,
            blocks=f"chunk_size={chunk_size}, block_dv={block_dv} with D_k={DK}",
        )  # fmt: skip
    out = out.to(q.dtype)
    return (out, final) if output_final_state else out
