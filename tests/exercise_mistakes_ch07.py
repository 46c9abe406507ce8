"""Wrong solutions of chapter 07's new exercises (7.5-7.10), one per misconception: each must fail its checker
with a message that names it (the fragment). Exercises 7.1-7.4 keep theirs in tests/exercise_mistakes.py."""

import math

import torch
import torch.nn.functional as F

import course_lib


def _gla_chunk(q, k, v, g, scale, C, state, *, mistake=None):
    B, H, T, D_k = q.shape
    S = q.new_zeros(B, H, D_k, v.shape[-1]) if state is None else state
    pieces = []
    if mistake == "token loop":
        for t in range(T):
            S = g[:, :, t].exp().unsqueeze(-1) * S + k[:, :, t].unsqueeze(-1) * v[:, :, t].unsqueeze(-2)
            pieces.append(torch.einsum("bhd,bhde->bhe", scale * q[:, :, t], S).unsqueeze(2))
        return torch.cat(pieces, 2), S
    for begin in range(0, T, C):
        qc, kc, vc = (
            scale * q[:, :, begin : begin + C],
            k[:, :, begin : begin + C],
            v[:, :, begin : begin + C],
        )
        n = qc.shape[2]
        b = g[:, :, begin : begin + C].cumsum(2)
        if mistake == "factorised":  # exp(b_t) * exp(-b_s): overflows once a chunk forgets enough
            scores = ((qc * b.exp()) @ (kc * (-b).exp()).transpose(-1, -2)).tril()
        else:
            below = torch.ones(n, n, dtype=torch.bool).tril(-1 if mistake == "strict" else 0)
            relative = (b.unsqueeze(3) - b.unsqueeze(2)).masked_fill(~below[..., None], -math.inf).exp()
            scores = torch.einsum("bhtd,bhsd,bhtsd->bhts", qc, kc, relative)
        inter = 0.0 if mistake == "no read" else (qc * (1.0 if mistake == "read undecayed" else b.exp())) @ S
        pieces.append(scores @ vc + inter)
        total = b[:, :, -1:]
        kept = S if mistake == "state undecayed" else total.transpose(-1, -2).exp() * S
        written = kc if mistake == "write undecayed" else kc * (total - b).exp()
        S = kept + written.transpose(-1, -2) @ vc
    return torch.cat(pieces, 2), S


def _delta_chunk(q, k, v, beta, S, scale, *, mistake=None):
    n = k.shape[2]
    if mistake == "token loop":
        outputs = []
        for t in range(n):
            error = v[:, :, t] - torch.einsum("bhde,bhd->bhe", S, k[:, :, t])
            S = S + beta[:, :, t, None, None] * k[:, :, t].unsqueeze(-1) * error.unsqueeze(-2)
            outputs.append(scale * torch.einsum("bhd,bhde->bhe", q[:, :, t], S))
        return torch.stack(outputs, 2), S
    earlier = (k @ k.transpose(-1, -2)).tril(0 if mistake == "diagonal" else -1)
    system = torch.eye(n, dtype=k.dtype) + beta.unsqueeze(-1) * earlier
    target = beta.unsqueeze(-1) * (v - (0.0 if mistake == "no prediction" else k @ S))
    if mistake == "linear attention":
        U = beta.unsqueeze(-1) * v
    elif mistake == "start state only":
        U = target
    else:
        unit = mistake != "diagonal"  # with unitriangular=True the solver would ignore the diagonal
        U = torch.linalg.solve_triangular(system, target, upper=False, unitriangular=unit)
    scores = (q @ k.transpose(-1, -2)).tril(-1 if mistake == "strict" else 0)
    return scale * (q @ S + scores @ U), S + k.transpose(-1, -2) @ U


def _scan(g, x, *, mistake=None):
    T, step = g.shape[-2], 1
    if mistake == "loop":
        h, states = torch.zeros_like(x[..., 0, :]), []
        for t in range(T):
            h = torch.exp(g[..., t, :]) * h + x[..., t, :]
            states.append(h)
        return g.cumsum(-2), torch.stack(states, -2)
    if mistake == "cumsum":
        P = torch.exp(g.cumsum(-2))
        return g.cumsum(-2), P * torch.cumsum(x / P, dim=-2)
    limit = T // 2 if mistake == "one round short" else T
    while step < limit:
        g_before = F.pad(g, (0, 0, step, 0), value=1.0 if mistake == "pad 1" else 0.0)[..., :T, :]
        x_before = F.pad(x, (0, 0, step, 0))[..., :T, :]
        if mistake == "reversed":
            g, x = g_before + g, torch.exp(g_before) * x + x_before
        else:
            g, x = g_before + g, torch.exp(g) * x_before + x
        step *= 2
    if mistake == "exclusive":
        return F.pad(g, (0, 0, 1, 0))[..., :T, :], F.pad(x, (0, 0, 1, 0))[..., :T, :]
    return g, x


def _hgrn_gates(bound_logits, gate_logits, *, mistake=None):
    if mistake == "softmax by hand":
        e = bound_logits.exp()
        p = e / e.sum(0)
    else:
        p = torch.softmax(bound_logits, dim=-1 if mistake == "channels" else 0)
    gamma = p.cumsum(0) - (0.0 if mistake == "no minus p1" else p[0])
    if mistake == "decreasing":
        gamma = gamma.flip(0)
    gamma = gamma.reshape(gamma.shape[0], *[1] * (gate_logits.dim() - gamma.dim()), *gamma.shape[1:])
    if mistake == "naive log":
        return torch.log(gamma + (1 - gamma) * torch.sigmoid(gate_logits))
    if mistake == "max":
        return torch.log(torch.maximum(gamma, torch.sigmoid(gate_logits)))
    log_f = torch.logaddexp(torch.log(gamma), torch.log1p(-gamma) + F.logsigmoid(gate_logits))
    return log_f.exp() if mistake == "f" else log_f


def _as_rwkv7(k, beta, g=None, *, mistake=None):
    gate = torch.zeros_like(beta) if g is None else g
    written = k if mistake == "key not scaled" else beta.unsqueeze(-1) * k
    w = gate.exp() if mistake == "w not log" else gate
    w = w if mistake == "w per step" else w.unsqueeze(-1).expand_as(k)
    decay = 1.0 if mistake == "no decay on rank one" else gate.exp().unsqueeze(-1)
    b = decay * beta.unsqueeze(-1) * k
    a = k if mistake == "sign" else -k
    return written, w, a, b


MISTAKES = {
    "7.5": [
        ("no inter-chunk part", "no inter-chunk part", lambda *a: _gla_chunk(*a, mistake="no read")),
        (
            "the carried state read undecayed",
            "read with q_t instead",
            lambda *a: _gla_chunk(*a, mistake="read undecayed"),
        ),
        (
            "the state not decayed over the chunk",
            "without its decay exp(b_C)",
            lambda *a: _gla_chunk(*a, mistake="state undecayed"),
        ),
        (
            "keys written undecayed",
            "written without their decay",
            lambda *a: _gla_chunk(*a, mistake="write undecayed"),
        ),
        ("the diagonal left out", "missing its own token", lambda *a: _gla_chunk(*a, mistake="strict")),
        (
            "exp(b_t) * exp(-b_s) overflows",
            "exp(-b_s) overflows",
            lambda *a: _gla_chunk(*a, mistake="factorised"),
        ),
        (
            "a token loop",
            "a loop over the tokens of a chunk",
            lambda *a: _gla_chunk(*a, mistake="token loop"),
        ),
        (
            "the library's gla",
            "course's own code",
            lambda q, k, v, g, scale, C, state: course_lib.recurrent.gla(
                q, k, v, g, scale=scale, chunk_size=C, initial_state=state, output_final_state=True
            ),
        ),
    ],
    "7.6": [
        (
            "linear attention's chunk",
            "no correction at all",
            lambda *a: _delta_chunk(*a, mistake="linear attention"),
        ),
        ("no triangular solve", "no triangular", lambda *a: _delta_chunk(*a, mistake="start state only")),
        (
            "K S not subtracted",
            "the K S part is missing",
            lambda *a: _delta_chunk(*a, mistake="no prediction"),
        ),
        ("the diagonal in the system", "on its diagonal", lambda *a: _delta_chunk(*a, mistake="diagonal")),
        (
            "own write not read",
            "missing its own token's write",
            lambda *a: _delta_chunk(*a, mistake="strict"),
        ),
        ("a token loop", "a loop over the chunk's", lambda *a: _delta_chunk(*a, mistake="token loop")),
        (
            "the library's delta_rule",
            "course's own code",
            lambda q, k, v, beta, S, scale: course_lib.recurrent.delta_rule(
                q, k, v, beta, scale=scale, initial_state=S, output_final_state=True
            ),
        ),
    ],
    "7.7": [
        ("cumsum then divide", "cumsum-then-divide cannot work", lambda g, x: _scan(g, x, mistake="cumsum")),
        (
            "the combine reversed",
            "the combine in the wrong order",
            lambda g, x: _scan(g, x, mistake="reversed"),
        ),
        ("padding g with 1", "padded with a log decay of 1", lambda g, x: _scan(g, x, mistake="pad 1")),
        ("one round short", "one round short", lambda g, x: _scan(g, x, mistake="one round short")),
        ("the exclusive scan", "the exclusive scan", lambda g, x: _scan(g, x, mistake="exclusive")),
        ("a loop over time", "a loop over the time steps", lambda g, x: _scan(g, x, mistake="loop")),
        (
            "torch's logcumsumexp",
            "does the scan whole",
            lambda g, x: (g.cumsum(-2), torch.logcumsumexp(x - g.cumsum(-2), -2)),
        ),
        (
            "the library's associative_scan",
            "course's own code",
            lambda g, x: course_lib.recurrent.associative_scan(g, x),
        ),
    ],
    "7.8": [
        (
            "the first layer's bound is p_1",
            "without subtracting p_1",
            lambda b, x: _hgrn_gates(b, x, mistake="no minus p1"),
        ),
        (
            "softmax over the channels",
            "over the channels instead of the layers",
            lambda b, x: _hgrn_gates(b, x, mistake="channels"),
        ),
        (
            "bounds falling with depth",
            "fall with depth",
            lambda b, x: _hgrn_gates(b, x, mistake="decreasing"),
        ),
        ("f instead of log f", "f itself instead of log f", lambda b, x: _hgrn_gates(b, x, mistake="f")),
        (
            "max instead of the floor formula",
            "max(gamma, sigmoid)",
            lambda b, x: _hgrn_gates(b, x, mistake="max"),
        ),
        (
            "log of an underflowed sigmoid",
            "use F.logsigmoid",
            lambda b, x: _hgrn_gates(b, x, mistake="naive log"),
        ),
        ("a softmax by hand", "NaN", lambda b, x: _hgrn_gates(b, x, mistake="softmax by hand")),
        (
            "the library's gates",
            "course's own code",
            lambda b, x: torch.stack(
                [
                    course_lib.recurrent.hgrn_forget_gate(x[i], course_lib.recurrent.hgrn_lower_bounds(b)[i])
                    for i in range(x.shape[0])
                ]
            ),
        ),
    ],
    "7.10": [
        (
            "w = exp(g)",
            "w must be a log decay",
            lambda k, beta, g=None: _as_rwkv7(k, beta, g, mistake="w not log"),
        ),
        (
            "the decay left out of the rank-one part",
            "must carry the decay too",
            lambda k, beta, g=None: _as_rwkv7(k, beta, g, mistake="no decay on rank one"),
        ),
        (
            "the written key not scaled by beta",
            "the written key is beta k",
            lambda k, beta, g=None: _as_rwkv7(k, beta, g, mistake="key not scaled"),
        ),
        (
            "the sign of the rank-one part",
            "check the sign",
            lambda k, beta, g=None: _as_rwkv7(k, beta, g, mistake="sign"),
        ),
        (
            "w per step, not per key dimension",
            "expanded to every key dimension",
            lambda k, beta, g=None: _as_rwkv7(k, beta, g, mistake="w per step"),
        ),
        (
            "the library's rwkv7_delta_rule_inputs",
            "course's own code",
            lambda k, beta, g=None: tuple(course_lib.recurrent.rwkv7_delta_rule_inputs(k, beta, g).values()),
        ),
    ],
}
