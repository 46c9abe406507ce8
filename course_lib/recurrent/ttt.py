"""TTT-Linear: the state is the weight of a linear model trained by gradient descent as it reads.

The hidden state is a matrix W (D_k, D_v). Each token is a training example: the key k_t is the
input, the value v_t the target, and the inner loss is the reconstruction error

    loss_t(W) = ||W^T k_t - v_t||^2 / 2,        grad_W loss_t(W) = k_t (W^T k_t - v_t)^T.

Online (mini-batch size 1) one gradient step per token with learning rate lr_t, then read:

    W_t = W_{t-1} - lr_t k_t (W_{t-1}^T k_t - v_t)^T,        o_t = W_t^T (scale * q_t).

Special case: expanding the step, ``W_t = (I - lr_t k_t k_t^T) W_{t-1} + lr_t k_t v_t^T``, which is
exactly the delta rule with ``beta_t = lr_t``: TTT-Linear with a plain linear inner model (no
LayerNorm, no residual), mini-batch size 1 and this loss *is* DeltaNet.

With mini-batch size b the gradient of every token in a mini-batch is taken at W from the start
of the mini-batch (W_0), and the steps accumulate: ``W_t = W_0 - sum_{s <= t} lr_s k_s (W_0^T k_s
- v_s)^T``. Tokens of one mini-batch no longer see each other's corrections, which makes the
mini-batch parallel. (Learning to (Learn at Test Time): RNNs with Expressive Hidden States, Sun et
al., 2024. The paper's TTT-Linear wraps W in LayerNorm and a residual and learns the views k, v.)
"""

from __future__ import annotations

import torch

from ..checks import check_attention_inputs, check_divisible, check_int
from ._common import check_options, check_per_step, check_scale, check_state, compute_dtype
from .delta_rule import delta_chunk_scan

__all__ = ["ttt_linear"]


def _ttt_linear_recurrent(q, k, v, lr, scale, weight, mini_batch_size):
    """Naive reference: explicit gradient steps, the gradient taken at the mini-batch's start."""
    outputs = []
    for t in range(q.shape[2]):
        if t % mini_batch_size == 0:
            weight_at_start = weight
        prediction = torch.einsum("bhkv,bhk->bhv", weight_at_start, k[:, :, t])
        gradient = k[:, :, t, :, None] * (prediction - v[:, :, t])[:, :, None, :]
        weight = weight - lr[:, :, t, None, None] * gradient
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t] * scale, weight))
    return torch.stack(outputs, dim=2), weight


def ttt_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    *,
    mini_batch_size: int = 16,
    form: str = "chunk",
    chunk_size: int = 64,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """TTT-Linear with inner learning rates ``lr`` (B, H, T), >= 0.

    q, k: (B, H, T, D_k); v: (B, H, T, D_v); mini_batch_size: tokens per inner gradient step
    (16 in the paper; 1 gives the delta rule); for the chunk form chunk_size must be a
    multiple of it. The state is
    the inner weight W (B, H, D_k, D_v); initial_state is W_0 (zeros when None). The chunk form is
    the delta rule's WY form with the corrections of one mini-batch decoupled.
    Returns o (B, H, T, D_v) in q's dtype, plus the final W when ``output_final_state``.
    """
    B, H, T, S, D_k, D_v = check_attention_inputs(q, k, v)
    if S != T:
        raise ValueError(f"k must have the same length T={T} as q, got k {tuple(k.shape)}")
    check_options(form, chunk_size, output_final_state, ("recurrent", "chunk"))
    mini_batch_size = check_int(mini_batch_size, "mini_batch_size", min=1)
    if form == "chunk":  # chunks must start on a mini-batch boundary
        check_divisible(chunk_size, "chunk_size", mini_batch_size, "mini_batch_size")
    check_per_step(lr, "lr", q)
    if not bool(torch.isfinite(lr).all()) or bool((lr < 0).any()):
        raise ValueError("lr must be finite and >= 0 (inner learning rates)")
    scale = check_scale(scale, D_k)
    check_state(initial_state, (B, H, D_k, D_v), q.device)

    input_dtype, dtype = q.dtype, compute_dtype(q)
    q, k, v, lr = (x.to(dtype) for x in (q, k, v, lr))
    weight = q.new_zeros(B, H, D_k, D_v) if initial_state is None else initial_state.to(dtype)
    if form == "recurrent":
        o, weight = _ttt_linear_recurrent(q, k, v, lr, scale, weight, mini_batch_size)
    else:
        o, weight = delta_chunk_scan(q * scale, k, v, lr, None, chunk_size, weight, mini_batch_size)
    o = o.to(input_dtype)
    return (o, weight) if output_final_state else o
