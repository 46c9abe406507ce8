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

TTT-MLP (:func:`ttt_mlp`) makes the inner model a two-layer MLP, ``f(x; W1, W2) = gelu(x W1) W2``
(row vectors; the paper adds LayerNorm and a residual, left out here). Its gradient is no longer
linear in the state, so the delta-rule algebra stops; the mini-batch form still parallelises a
mini-batch, because every token's gradient is taken at the mini-batch's starting weights::

    Z = Q W1 - tril(Q K^T * lr) G1,     O = gelu(Z) W2 - tril(gelu(Z) H_k^T * lr) E

with ``H_k = gelu(K W1)``, the errors ``E = H_k W2 - V`` and ``G1 = (E W2^T) * gelu'(K W1)``
(the "dual form" of the paper: the weights of each token are never formed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..checks import check_bool, check_choice, check_divisible, check_int, check_shape, check_tensor
from ._common import check_per_step, check_recurrent_inputs, check_sequence_inputs, run_form, zero_state
from .delta_rule import delta_chunk_scan
from .runner import read_state, run_recurrence

__all__ = ["ttt_linear", "ttt_mlp"]


def _ttt_linear_recurrent(q, k, v, lr, scale, weight, mini_batch_size):
    """Naive reference: explicit gradient steps, the gradient taken at the mini-batch's start.

    The runner's state is the pair ``(W, W_0)``: the weights and a copy of them as they were when
    the current mini-batch began. The "decay" only refreshes that copy on a mini-batch boundary.
    """

    def start_of_mini_batch(t, state):
        weight, weight_at_start = state
        return weight, (weight if t % mini_batch_size == 0 else weight_at_start)

    def gradient_step(t, state):
        weight_at_start = state[1]
        prediction = torch.einsum("bhkv,bhk->bhv", weight_at_start, k[:, :, t])
        gradient = k[:, :, t, :, None] * (prediction - v[:, :, t])[:, :, None, :]
        return -lr[:, :, t, None, None] * gradient, torch.zeros_like(weight_at_start)

    o, (weight, _) = run_recurrence(
        q.shape[2],
        (weight, weight),
        decay=start_of_mini_batch,
        write=gradient_step,
        read=lambda t, state: read_state(q[:, :, t] * scale, state[0]),
    )
    return o, weight


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
    B, H, T, D_k, D_v, scale = check_recurrent_inputs(
        q,
        k,
        v,
        form=form,
        forms=("recurrent", "chunk"),
        chunk_size=chunk_size,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
    )
    mini_batch_size = check_int(mini_batch_size, "mini_batch_size", min=1)
    if form == "chunk":  # chunks must start on a mini-batch boundary
        check_divisible(chunk_size, "chunk_size", mini_batch_size, "mini_batch_size")
    check_per_step(lr, "lr", q)
    if not bool(torch.isfinite(lr).all()) or bool((lr < 0).any()):
        raise ValueError("lr must be finite and >= 0 (inner learning rates)")
    forms = {
        "recurrent": lambda q, k, v, lr, W: _ttt_linear_recurrent(q, k, v, lr, scale, W, mini_batch_size),
        "chunk": lambda q, k, v, lr, W: delta_chunk_scan(
            q * scale, k, v, lr, None, chunk_size, W, mini_batch_size
        ),
    }
    weight = zero_state(q, D_k, D_v, initial_state)
    return run_form(forms, form, (q, k, v, lr), weight, value_dim=D_v, output_final_state=output_final_state)


# --- TTT-MLP ------------------------------------------------------------------------------------


def _mlp(x: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor) -> torch.Tensor:
    """The inner model ``gelu(x W1) W2`` on rows of ``x (..., L, D_k)``."""
    return F.gelu(x @ W1) @ W2


def _gelu_derivative(z: torch.Tensor) -> torch.Tensor:
    """d gelu(z) / dz for the exact (erf) GELU: ``Phi(z) + z phi(z)``."""
    cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    density = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return cdf + z * density


def _ttt_mlp_recurrent(q, k, v, lr, W1, W2, mini_batch_size):
    """Naive reference: per token, the gradient of its loss by autograd at the mini-batch's start.

    The runner's state is ``(W1, W2, W1_0, W2_0)``: the weights and their copy from the start of
    the mini-batch, refreshed by the "decay" on each boundary, as in TTT-Linear's reference.
    Differentiable (``create_graph``) when gradients are enabled, so the outer loop can train it.
    """

    def start_of_mini_batch(t, state):
        W1, W2, *at_start = state
        return (W1, W2, W1, W2) if t % mini_batch_size == 0 else (W1, W2, *at_start)

    def gradient_step(t, state):
        with torch.enable_grad():
            w1, w2 = (w if w.requires_grad else w.detach().requires_grad_() for w in state[2:])
            loss = 0.5 * (_mlp(k[:, :, t, None], w1, w2) - v[:, :, t, None]).pow(2).sum()
            grad1, grad2 = torch.autograd.grad(loss, (w1, w2), create_graph=torch.is_grad_enabled())
        rate = lr[:, :, t, None, None]
        return -rate * grad1, -rate * grad2, torch.zeros_like(state[2]), torch.zeros_like(state[3])

    o, (W1, W2, _, _) = run_recurrence(
        q.shape[2],
        (W1, W2, W1, W2),
        decay=start_of_mini_batch,
        write=gradient_step,
        read=lambda t, state: _mlp(q[:, :, t, None], state[0], state[1])[:, :, 0],
    )
    return o, (W1, W2)


def _ttt_mlp_minibatch(q, k, v, lr, W1, W2, mini_batch_size):
    """The dual form: one mini-batch at a time, its tokens in parallel with hand-written gradients."""
    T = q.shape[2]
    outputs = []
    for start in range(0, T, mini_batch_size):
        span = slice(start, min(start + mini_batch_size, T))
        q_b, k_b, v_b, lr_b = q[:, :, span], k[:, :, span], v[:, :, span], lr[:, :, span, None]
        b = q_b.shape[2]
        causal = torch.ones(b, b, dtype=torch.bool, device=q.device).tril()
        # Forward pass of the keys at the starting weights, and the per-token gradients' factors.
        z_k = k_b @ W1
        h_k = F.gelu(z_k)
        error = h_k @ W2 - v_b  # dloss/dprediction, (B, H, b, D_v)
        grad_z = (error @ W2.transpose(-1, -2)) * _gelu_derivative(z_k)  # dloss/dz, (B, H, b, D_h)
        # Query t sees the sum of the gradient steps of tokens s <= t of its mini-batch.
        z_q = q_b @ W1 - ((q_b @ k_b.transpose(-1, -2)) * causal * lr_b.transpose(-1, -2)) @ grad_z
        h_q = F.gelu(z_q)
        outputs.append(h_q @ W2 - ((h_q @ h_k.transpose(-1, -2)) * causal * lr_b.transpose(-1, -2)) @ error)
        W1 = W1 - k_b.transpose(-1, -2) @ (lr_b * grad_z)
        W2 = W2 - h_k.transpose(-1, -2) @ (lr_b * error)
    return torch.cat(outputs, dim=2), (W1, W2)


def ttt_mlp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    initial_state: tuple[torch.Tensor, torch.Tensor],
    *,
    mini_batch_size: int = 16,
    form: str = "chunk",
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """TTT-MLP: the state is a two-layer MLP ``gelu(x W1) W2`` trained on ``(k_t, v_t)`` as it reads.

    q, k: (B, H, T, D_k); v: (B, H, T, D_v); lr: (B, H, T) inner learning rates >= 0;
    initial_state: the starting weights ``(W1, W2)`` of shapes (B, H, D_k, D_h) and (B, H, D_h, D_v)
    (required: from zero weights no gradient flows). Output ``o_t = f(q_t; W_t)`` (no extra scale).
    ``form="recurrent"`` takes each token's gradient with autograd, ``"chunk"`` is the mini-batch
    dual form with hand-written gradients. Returns o (B, H, T, D_v) in q's dtype, plus the final
    ``(W1, W2)`` when ``output_final_state``.
    """
    B, H, T, D_k, D_v = check_sequence_inputs(q, k, v)
    check_choice(form, "form", ("recurrent", "chunk"))  # no chunk_size: the mini-batch is the chunk
    check_bool(output_final_state, "output_final_state")
    mini_batch_size = check_int(mini_batch_size, "mini_batch_size", min=1)
    check_per_step(lr, "lr", q)
    if not bool(torch.isfinite(lr).all()) or bool((lr < 0).any()):
        raise ValueError("lr must be finite and >= 0 (inner learning rates)")
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
        raise TypeError("initial_state must be a tuple (W1, W2) of the inner MLP's weights")
    W1, W2 = initial_state
    check_tensor(W1, "initial_state[0]", ndim=4, floating=True)
    check_shape(W1, "initial_state[0]", (B, H, D_k, None), names="B, H, D_k, D_h")
    check_tensor(W2, "initial_state[1]", ndim=4, floating=True)
    check_shape(W2, "initial_state[1]", (B, H, W1.shape[-1], D_v), names="B, H, D_h, D_v")
    for name, w in (("initial_state[0]", W1), ("initial_state[1]", W2)):
        if w.device != q.device:
            raise ValueError(f"{name} must be on {q.device} like q, got {w.device}")
    forms = {
        "recurrent": lambda q, k, v, lr, W: _ttt_mlp_recurrent(q, k, v, lr, *W, mini_batch_size),
        "chunk": lambda q, k, v, lr, W: _ttt_mlp_minibatch(q, k, v, lr, *W, mini_batch_size),
    }
    return run_form(
        forms, form, (q, k, v, lr), (W1, W2), value_dim=D_v, output_final_state=output_final_state
    )
