"""xLSTM's matrix LSTM (mLSTM): exponential input gate, forget gate and a normaliser state.

With input gate pre-activation ``i_t`` (the gate is ``exp(i_t)``) and log forget gate ``f_t <= 0``,

    C_t = exp(f_t) C_{t-1} + exp(i_t) k_t v_t^T        (D_k, D_v) memory
    n_t = exp(f_t) n_{t-1} + exp(i_t) k_t              (D_k,) normaliser
    o_t = C_t^T q_t / max(|n_t . q_t|, 1),             q_t already multiplied by the scale.

``exp(i_t)`` overflows for large i, so the states are stored divided by ``exp(m_t)`` with the
stabiliser ``m_t = max(f_t + m_{t-1}, i_t)``. Dividing C and n by the same ``exp(m_t)`` changes the
output only through the 1 in the denominator, which must become ``exp(-m_t)``:

    o_t = C~_t^T q_t / max(|n~_t . q_t|, exp(-m_t))    (exactly the unstabilised output).

Because the output does not depend on m, the stabiliser carries no gradient (it is detached).
(xLSTM: Extended Long Short-Term Memory, Beck et al., 2024.)
"""

from __future__ import annotations

import torch

from ..checks import check_shape, check_tensor
from ._common import check_log_gate, check_per_step, check_recurrent_inputs, pad_time, run_form, zero_state
from .runner import read_state, run_recurrence

__all__ = ["mlstm"]

MLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _mlstm_recurrent(q, k, v, i, f, scale, state):
    """Naive reference: the stabilised recurrence one token at a time. state = (C~, n~, m).

    The decay moves the stabiliser to ``m_t = max(f_t + m_{t-1}, i_t)`` and rescales C~ and n~ to
    it; the write then adds the token with its gate ``exp(i_t - m_t)`` (and leaves m as it is).
    """

    def decay(t, state):
        memory, normaliser, stabiliser = state
        new_stabiliser = torch.maximum(f[:, :, t] + stabiliser, i[:, :, t]).detach()
        forget = (f[:, :, t] + stabiliser - new_stabiliser).exp()[..., None]
        return forget[..., None] * memory, forget * normaliser, new_stabiliser

    def write(t, state):
        gate = (i[:, :, t] - state[2]).exp()[..., None]
        return (
            (gate * k[:, :, t])[..., None] * v[:, :, t, None, :],
            gate * k[:, :, t],
            torch.zeros_like(state[2]),
        )

    def read(t, state):
        memory, normaliser, stabiliser = state
        query = q[:, :, t] * scale
        denominator = torch.maximum((normaliser * query).sum(-1).abs(), (-stabiliser).exp())
        return read_state(query, memory) / denominator[..., None]

    return run_recurrence(q.shape[2], state, decay=decay, write=write, read=read)


def _mlstm_chunk(q, k, v, i, f, chunk_size, state):
    """Chunkwise form: inside a chunk the paper's parallel form, across chunks the (C~, n~, m) state.

    ``log_weight[t, s] = F_t - F_s + i_s`` is the log of key s's total gate at query t (F the
    within-chunk cumulative log forget); the incoming state enters with ``F_t + m``. The running
    max over both is the recurrent stabiliser m_t, so both forms store identical states.
    """
    B, H, T, D_k = q.shape
    size = min(chunk_size, T)
    q, k, v, f = (pad_time(x, size) for x in (q, k, v, f[..., None]))
    # Padded steps get input gate exp(-inf) = 0, so they neither write nor move the stabiliser.
    i = torch.nn.functional.pad(i, (0, q.shape[2] - T), value=float("-inf"))
    N = q.shape[2] // size
    q, k, v = (x.reshape(B, H, N, size, x.shape[-1]) for x in (q, k, v))
    i, F = i.reshape(B, H, N, size), f.reshape(B, H, N, size).cumsum(dim=-1)
    below = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    log_weight = (F[..., :, None] - F[..., None, :] + i[..., None, :]).masked_fill(~below, float("-inf"))
    intra_max = log_weight.max(dim=-1).values.detach()
    scores = q @ k.transpose(-1, -2)
    to_end = F[..., -1:] - F + i  # log gate of each key at the chunk's end

    memory, normaliser, stabiliser = state
    outputs = []
    for n in range(N):
        from_state = F[:, :, n] + stabiliser[..., None]  # (B, H, size)
        m = torch.maximum(intra_max[:, :, n], from_state.detach())
        weights = (log_weight[:, :, n] - m[..., None]).exp() * scores[:, :, n]
        state_weight = (from_state - m).exp()[..., None]
        numerator = weights @ v[:, :, n] + state_weight * (q[:, :, n] @ memory)
        denominator = weights.sum(-1) + state_weight[..., 0] * (q[:, :, n] @ normaliser[..., None])[..., 0]
        outputs.append(numerator / torch.maximum(denominator.abs(), (-m).exp())[..., None])

        new_stabiliser = torch.maximum(F[:, :, n, -1] + stabiliser, to_end[:, :, n].max(-1).values).detach()
        carry = (F[:, :, n, -1] + stabiliser - new_stabiliser).exp()
        key_weights = (to_end[:, :, n] - new_stabiliser[..., None]).exp()[..., None] * k[:, :, n]
        memory = carry[..., None, None] * memory + key_weights.transpose(-1, -2) @ v[:, :, n]
        normaliser = carry[..., None] * normaliser + key_weights.sum(dim=-2)
        stabiliser = new_stabiliser
    o = torch.stack(outputs, dim=2).reshape(B, H, N * size, -1)[:, :, :T]
    return o, (memory, normaliser, stabiliser)


def mlstm(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    *,
    form: str = "chunk",
    chunk_size: int = 64,
    scale: float | None = None,
    initial_state: MLSTMState | None = None,
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, MLSTMState]:
    """The mLSTM cell (without its output gate).

    q, k: (B, H, T, D_k); v: (B, H, T, D_v); i: (B, H, T) input gate pre-activations (any real);
    f: (B, H, T) log forget gates, <= 0 (e.g. ``logsigmoid`` of a pre-activation).
    form "recurrent" or "chunk" (with ``chunk_size >= T`` it is the paper's parallel form).
    The state is the stabilised triple ``(C~ (B, H, D_k, D_v), n~ (B, H, D_k), m (B, H))``; the true
    memory is ``exp(m) * C~``. ``initial_state=None`` means zeros with m = 0.
    Returns o (B, H, T, D_v) in q's dtype, plus the final triple when ``output_final_state``.
    """
    B, H, T, D_k, D_v, scale = check_recurrent_inputs(
        q,
        k,
        v,
        form=form,
        forms=("recurrent", "chunk"),
        chunk_size=chunk_size,
        scale=scale,
        initial_state=None,  # a triple, checked below
        output_final_state=output_final_state,
    )
    check_per_step(i, "i", q)
    if not bool(torch.isfinite(i).all()):
        raise ValueError("i must be finite (an input gate pre-activation)")
    check_per_step(f, "f", q)
    check_log_gate(f, "f")
    if initial_state is None:
        memory = zero_state(q, D_k, D_v, None)
        state = (memory, memory.new_zeros(B, H, D_k), memory.new_zeros(B, H))
    else:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 3:
            raise TypeError("initial_state must be a tuple (C, n, m) of three tensors")
        shapes = (((B, H, D_k, D_v), "B, H, D_k, D_v"), ((B, H, D_k), "B, H, D_k"), ((B, H), "B, H"))
        for index, (part, (shape, names)) in enumerate(zip(initial_state, shapes, strict=True)):
            check_tensor(part, f"initial_state[{index}]", floating=True)
            check_shape(part, f"initial_state[{index}]", shape, names=names)
            if part.device != q.device:
                raise ValueError(f"initial_state[{index}] must be on {q.device} like q, got {part.device}")
        state = tuple(initial_state)
    forms = {
        "recurrent": lambda q, k, v, i, f, S: _mlstm_recurrent(q, k, v, i, f, scale, S),
        "chunk": lambda q, k, v, i, f, S: _mlstm_chunk(q * scale, k, v, i, f, chunk_size, S),
    }
    return run_form(forms, form, (q, k, v, i, f), state, value_dim=D_v, output_final_state=output_final_state)
