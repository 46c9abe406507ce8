"""Checkers for notebook 07: GLA and the delta rule in their recurrent form, RetNet's decay matrix, and SSD
written as GLA.

References: the library's *chunk* forms (a different algorithm from the token loop the exercises ask
for), and the decay matrix from its definition.
"""

from __future__ import annotations

import torch

from ..recurrent import delta_rule, gla, ssd
from .common import Case, Draw, Mismatch, checker, compare

__all__ = [
    "check_gla_recurrent",
    "check_delta_rule_recurrent",
    "check_retention_decay_matrix",
    "check_ssd_as_gla",
]


def _pair(got: object, names: str) -> tuple:
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise Mismatch(f"expected a pair {names}, got {type(got).__name__}")
    return tuple(got)


def _loop(q, k, v, decay, write, scale, state, read_first=False):
    """A plain token loop, for the wrong variants: decay(t, S), write(t, S), read."""
    outputs = []
    for t in range(q.shape[2]):
        if read_first:
            outputs.append(torch.einsum("bhd,bhde->bhe", scale * q[:, :, t], state))
        state = decay(t, state)
        state = state + write(t, state)
        if not read_first:
            outputs.append(torch.einsum("bhd,bhde->bhe", scale * q[:, :, t], state))
    return torch.stack(outputs, 2), state


@checker(
    "7.1",
    title="GLA, token by token",
    points=2,
    task="GLA's recurrent form",
    fallback="course_lib.recurrent:gla",
)
def check_gla_recurrent(draw: Draw):
    """``fn(q, k, v, g, scale, initial_state) -> (o, final_state)``: GLA's recurrence for (B, H, T, D)
    inputs. ``g`` (B, H, T, D_k) is the log forget gate per key dimension, ``initial_state``
    (B, H, D_k, D_v) or None (zeros). Per token: decay each row i of S by ``exp(g[..., i])``, add
    ``k v^T``, read ``o = S^T (scale q)``."""
    for name, B, H, T, D_k, D_v, gate, with_state in [
        (
            "a few tokens from zero",
            draw.int(1, 2),
            draw.int(1, 3),
            draw.int(3, 9),
            draw.int(2, 5),
            draw.int(2, 6),
            0.3,
            False,
        ),
        (
            "from an initial state",
            1,
            draw.int(1, 2),
            draw.int(2, 7),
            draw.int(2, 4),
            draw.int(2, 4),
            0.3,
            True,
        ),
        (
            "strong forgetting (log gates around -30)",
            1,
            1,
            draw.int(3, 6),
            draw.int(2, 4),
            draw.int(2, 4),
            30.0,
            True,
        ),
        ("no forgetting (g = 0: linear attention)", 1, 2, draw.int(3, 6), 3, 2, 0.0, False),
        ("one token", 2, 1, 1, draw.int(2, 5), draw.int(2, 5), 0.5, True),
    ]:
        yield _gla_case(draw, name, B, H, T, D_k, D_v, gate, with_state)


def _gla_case(draw, name, B, H, T, D_k, D_v, gate, with_state) -> Case:
    q, k = draw.randn(B, H, T, D_k), draw.randn(B, H, T, D_k)
    v = draw.randn(B, H, T, D_v)
    g = -draw.rand(B, H, T, D_k) * gate
    scale = draw.float(0.2, 1.0)
    state = draw.randn(B, H, D_k, D_v) if with_state else None
    o, final = gla(q, k, v, g, scale=scale, initial_state=state, output_final_state=True, chunk_size=4)
    zero = torch.zeros(B, H, D_k, D_v, dtype=q.dtype) if state is None else state

    def outer(t, S):
        return k[:, :, t, :, None] * v[:, :, t, None, :]

    variants = {
        "the write before the decay (the token's own k v^T decayed too)": lambda: _loop(
            q,
            k,
            v,
            lambda t, S: S,
            lambda t, S: outer(t, S) + (g[:, :, t].exp()[..., None] - 1) * (S + outer(t, S)),
            scale,
            zero,
        )[0],
        "the read before the write (o from the previous state)": lambda: _loop(
            q, k, v, lambda t, S: g[:, :, t].exp()[..., None] * S, outer, scale, zero, read_first=True
        )[0],
        "the gate applied to the value dimensions (columns of S) instead of the key dimensions": lambda: (
            _loop(
                q,
                k,
                v,
                lambda t, S: S * g[:, :, t, : S.shape[-1]].exp()[..., None, :] if D_k >= D_v else S,
                outer,
                scale,
                zero,
            )[0]
        ),
        "the gate used without exp (a log gate is not a factor)": lambda: _loop(
            q, k, v, lambda t, S: g[:, :, t][..., None] * S, outer, scale, zero
        )[0],
        "o without the scale": lambda: _loop(
            q, k, v, lambda t, S: g[:, :, t].exp()[..., None] * S, outer, 1.0, zero
        )[0],
    }

    def judge(got, expected):
        o_got, final_got = _pair(got, "(o, final_state)")
        compare(o_got, expected[0], "o", atol=1e-10, rtol=1e-8, variants=variants)
        compare(final_got, expected[1], "final_state", atol=1e-10, rtol=1e-8)

    return Case(
        f"{name}: B={B}, H={H}, T={T}, D_k={D_k}, D_v={D_v}",
        (q, k, v, g, scale, state),
        expected=(o, final),
        compare=judge,
        inputs=["q", "k", "v", "g", "scale", "initial_state"],
    )


@checker(
    "7.2",
    title="the delta rule, token by token",
    points=2,
    task="the delta rule's recurrent form",
    fallback="course_lib.recurrent:delta_rule",
)
def check_delta_rule_recurrent(draw: Draw):
    """``fn(q, k, v, beta, scale, initial_state) -> (o, final_state)``: the delta rule for (B, H, T, D)
    inputs; ``beta`` (B, H, T) in [0, 1]. Per token: ``S += beta k (v - S^T k)^T``, then
    ``o = S^T (scale q)``. Keys are passed as they are (the layer normalises them, not this function)."""
    for name, B, H, T, D_k, D_v, unit, with_state, beta_kind in [
        (
            "unit keys from zero",
            draw.int(1, 2),
            draw.int(1, 2),
            draw.int(3, 9),
            draw.int(2, 5),
            draw.int(2, 5),
            True,
            False,
            "random",
        ),
        (
            "from an initial state, keys not normalised",
            1,
            2,
            draw.int(2, 6),
            draw.int(2, 4),
            draw.int(2, 4),
            False,
            True,
            "random",
        ),
        ("beta = 1: each write overwrites", 1, 1, draw.int(3, 7), 3, 3, True, True, "one"),
        ("beta = 0: nothing is written", 1, 1, draw.int(2, 5), 3, 2, True, True, "zero"),
        ("one token", 2, 1, 1, draw.int(2, 5), draw.int(2, 5), True, True, "random"),
    ]:
        yield _delta_case(draw, name, B, H, T, D_k, D_v, unit, with_state, beta_kind)


def _delta_case(draw, name, B, H, T, D_k, D_v, unit, with_state, beta_kind) -> Case:
    q, k = draw.randn(B, H, T, D_k), draw.randn(B, H, T, D_k)
    if unit:
        k = k / k.norm(dim=-1, keepdim=True)
    v = draw.randn(B, H, T, D_v)
    beta = {
        "random": draw.rand(B, H, T),
        "one": torch.ones(B, H, T, dtype=q.dtype),
        "zero": torch.zeros(B, H, T, dtype=q.dtype),
    }[beta_kind]
    scale = draw.float(0.2, 1.0)
    state = draw.randn(B, H, D_k, D_v) if with_state else None
    o, final = delta_rule(
        q, k, v, beta, scale=scale, initial_state=state, output_final_state=True, chunk_size=4
    )
    zero = torch.zeros(B, H, D_k, D_v, dtype=q.dtype) if state is None else state

    def recall(S, t):
        return torch.einsum("bhde,bhd->bhe", S, k[:, :, t])

    def delta(t, S):
        return beta[:, :, t, None, None] * k[:, :, t, :, None] * (v[:, :, t] - recall(S, t))[..., None, :]

    variants = {
        "linear attention with a select gate (beta k v^T, without the - S^T k correction)": lambda: _loop(
            q,
            k,
            v,
            lambda t, S: S,
            lambda t, S: beta[:, :, t, None, None] * k[:, :, t, :, None] * v[:, :, t, None, :],
            scale,
            zero,
        )[0],
        "the read before the write": lambda: _loop(
            q, k, v, lambda t, S: S, delta, scale, zero, read_first=True
        )[0],
        "the correction with S k instead of S^T k": lambda: _loop(
            q,
            k,
            v,
            lambda t, S: S,
            lambda t, S: (
                beta[:, :, t, None, None]
                * k[:, :, t, :, None]
                * (
                    v[:, :, t] - torch.einsum("bhde,bhe->bhd", S, k[:, :, t, : S.shape[-1]])
                    if D_k == D_v
                    else v[:, :, t]
                )[..., None, :]
            ),
            scale,
            zero,
        )[0],
        "o without the scale": lambda: _loop(q, k, v, lambda t, S: S, delta, 1.0, zero)[0],
    }

    def judge(got, expected):
        o_got, final_got = _pair(got, "(o, final_state)")
        compare(o_got, expected[0], "o", atol=1e-10, rtol=1e-8, variants=variants)
        compare(final_got, expected[1], "final_state", atol=1e-10, rtol=1e-8)

    return Case(
        f"{name}: B={B}, H={H}, T={T}, D_k={D_k}, D_v={D_v}",
        (q, k, v, beta, scale, state),
        expected=(o, final),
        compare=judge,
        inputs=["q", "k", "v", "beta", "scale", "initial_state"],
    )


def _decay(gamma: float, T: int, *, shift: int = 0, causal: bool = True) -> torch.Tensor:
    t = torch.arange(T, dtype=torch.float64)
    exponent = t[:, None] - t[None, :] + shift
    values = torch.tensor(gamma, dtype=torch.float64) ** exponent
    return torch.where(exponent - shift >= 0, values, torch.zeros(())) if causal else values


@checker("7.3", title="RetNet's decay matrix", points=1, task="the decay matrix")
def check_retention_decay_matrix(draw: Draw):
    """``fn(gamma, T) -> D`` (T, T) float64 with ``D[t, s] = gamma^(t - s)`` for ``s <= t``, 0 above the
    diagonal (row t is the query, column s the key)."""
    for name, gamma, T in [
        ("a typical head", draw.float(0.8, 0.99), draw.int(4, 12)),
        ("a fast-forgetting head", draw.float(0.3, 0.6), draw.int(5, 9)),
        ("a head close to 1", 1 - 2.0 ** -draw.int(7, 9), draw.int(3, 8)),
        ("T = 1", draw.float(0.5, 0.99), 1),
        ("a long sequence (gamma^t underflows far from the diagonal)", draw.float(0.2, 0.4), 900),
    ]:
        variants = {
            "the matrix transposed (gamma^(s - t) above the diagonal)": lambda g=gamma, T=T: _decay(g, T).T,
            "gamma^(t - s) everywhere (nothing zeroed above the diagonal)": lambda g=gamma, T=T: _decay(
                g, T, causal=False
            ),
            "gamma^(t - s + 1) (the diagonal decayed once too often)": lambda g=gamma, T=T: _decay(
                g, T, shift=1
            ),
        }

        def judge(got, expected, variants=variants, label=f"gamma={gamma:.6g}, T={T}"):
            compare(got, expected, f"decay matrix ({label})", atol=1e-12, rtol=1e-10, variants=variants)

        yield Case(
            f"{name}: gamma={gamma:.6g}, T={T}",
            (gamma, T),
            expected=_decay(gamma, T),
            compare=judge,
            inputs=["gamma", "T"],
        )


@checker("7.4", title="SSD is gated linear attention", points=1, task="the SSD-to-GLA mapping")
def check_ssd_as_gla(draw: Draw):
    """``fn(x, dt, A, B, C) -> (q, k, v, g)`` such that ``gla(q, k, v, g, scale=1.0)`` equals
    ``ssd(x, dt, A, B, C)``; g has GLA's shape (batch, H, T, N): one log gate per key dimension."""
    for name, batch, H, T, P, N in [
        ("one head", 1, 1, draw.int(3, 9), draw.int(2, 4), draw.int(2, 5)),
        (
            "several heads, T not a multiple of a chunk",
            draw.int(1, 2),
            draw.int(2, 3),
            draw.int(10, 21),
            draw.int(2, 5),
            draw.int(2, 4),
        ),
    ]:
        yield _ssd_case(draw, name, batch, H, T, P, N)


def _ssd_case(draw, name, batch, H, T, P, N) -> Case:
    x = draw.randn(batch, H, T, P)
    dt = torch.nn.functional.softplus(draw.randn(batch, H, T))
    A = -draw.rand(H) * 2 - 0.1
    B, C = draw.randn(batch, H, T, N), draw.randn(batch, H, T, N)

    def judge(got, expected):
        if not isinstance(got, (tuple, list)) or len(got) != 4:
            raise Mismatch(f"expected a tuple (q, k, v, g), got {type(got).__name__}")
        q, k, v, g = got
        for label, tensor in zip("qkvg", got):
            if not isinstance(tensor, torch.Tensor):
                raise Mismatch(f"{label}: expected a tensor, got {type(tensor).__name__}")
        if g.shape != B.shape:
            hint = (
                " (a per-step gate (batch, H, T) must be expanded to every key dimension)"
                if g.shape == dt.shape
                else ""
            )
            raise Mismatch(f"g must have shape {tuple(B.shape)} (batch, H, T, N), got {tuple(g.shape)}{hint}")
        hints = []
        if torch.equal(q, B) and torch.equal(k, C):
            hints.append("B and C are swapped: C reads the state (the query), B writes it (the key)")
        if torch.equal(v, x):
            hints.append("v = x leaves out dt: the write is B (dt x)^T")
        if bool((g > 0).any()):
            hints.append("g must be a log gate (<= 0): A * dt, not exp(A * dt)")
        try:
            out = gla(q, k, v, g, scale=1.0)
            compare(out, expected, "gla(q, k, v, g, scale=1) vs ssd(x, dt, A, B, C)", atol=1e-10, rtol=1e-8)
        except Mismatch as mismatch:
            raise Mismatch("\n".join([str(mismatch)] + ["hint: " + h for h in hints])) from None
        except (ValueError, TypeError, RuntimeError) as error:
            raise Mismatch(f"gla refused your tensors: {error}") from None

    return Case(
        f"{name}: batch={batch}, H={H}, T={T}, P={P}, N={N}",
        (x, dt, A, B, C),
        expected=ssd(x, dt, A, B, C),
        compare=judge,
        inputs=["x", "dt", "A", "B", "C"],
    )
