"""Checkers for notebook 07: GLA and the delta rule token by token and in chunks, RetNet's decay matrix,
SSD written as GLA, Mamba-1's parallel scan in log space, HGRN's layer gates, and Gated DeltaNet as RWKV-7;
and the chapter's predict and explain exercises.

References: the library's token-by-token forms (a different algorithm from the chunkwise and matrix
forms the exercises ask for), a plain loop for the scan, and the definitions.
"""

from __future__ import annotations

import math

import torch

from ..recurrent import (
    delta_rule,
    gated_delta_rule,
    gla,
    hgrn_forget_gate,
    hgrn_lower_bounds,
    rwkv7,
    ssd,
)
from .common import Case, Draw, Mismatch, checker, compare, declare

__all__ = [
    "check_gla_recurrent",
    "check_delta_rule_recurrent",
    "check_retention_decay_matrix",
    "check_ssd_as_gla",
    "check_gla_chunkwise",
    "check_delta_chunk_step",
    "check_log_space_scan",
    "check_hgrn_layer_gates",
    "check_gated_delta_as_rwkv7",
]


def _compare_naming_nan(got, expected, what, *, variants, **options) -> None:
    """:func:`compare`, and when the result has NaN or inf where the answer has none, name the variant that
    the finite entries equal, if the non-finite ones lie where that variant is wrong too (compare's own
    variant hints look only at finite results)."""
    try:
        compare(got, expected, what, variants=variants, **options)
    except Mismatch as mismatch:
        if "NaN" not in str(mismatch) or not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            raise
        mine = got.detach().double()
        finite = torch.isfinite(mine)
        for label, make in variants.items():
            try:
                candidate = make().double()
            except Exception:  # a variant that does not apply to these inputs
                continue
            if candidate.shape != mine.shape:
                continue
            wrong_there = ~torch.isclose(candidate, expected.double(), atol=1e-9, rtol=1e-8)
            if torch.allclose(mine[finite], candidate[finite], atol=1e-6, rtol=1e-5) and bool(
                wrong_there[~finite].all()
            ):
                raise Mismatch(
                    f"{mismatch}\nhint: where yours is finite it equals {label} (and the NaN entries are "
                    "where that mistake leaves the range of a log gate)"
                ) from None
        raise


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


# ---------------------------------------------------------------------------------------------------
# 7.5: the chunkwise form of GLA (the part inside a chunk and the part carried between chunks).


def _chunk_gla_variant(q, k, v, g, scale, C, state, mistake=None):
    """Chunkwise GLA written plainly, with one named ``mistake`` (None: the right answer), for hints."""
    B, H, T, D_k = k.shape
    S = torch.zeros(B, H, D_k, v.shape[-1], dtype=q.dtype) if state is None else state
    outputs = []
    for start in range(0, T, C):
        qc, kc, vc, gc = (x[:, :, start : start + C] for x in (q, k, v, g))
        n = qc.shape[2]
        b = gc.cumsum(2)
        if mistake == "exclusive":
            b = b - gc
        diff = b[:, :, :, None, :] - b[:, :, None, :, :]  # (B, H, t, s, D_k)
        keep = torch.ones(n, n, dtype=torch.bool)
        keep = {"strict": keep.tril(-1), "no mask": keep}.get(mistake, keep.tril())
        decay = torch.where(keep[..., None], diff, torch.tensor(float("-inf"), dtype=q.dtype)).exp()
        intra = torch.einsum("bhtd,bhsd,bhtsd->bhts", scale * qc, kc, decay) @ vc
        read = scale * qc * (1.0 if mistake == "read undecayed" else b.exp())
        inter = 0.0 if mistake == "no read" else read @ S
        outputs.append(intra + inter)
        last = b[:, :, -1:]
        kept = S if mistake == "state undecayed" else last.transpose(-1, -2).exp() * S
        written = kc if mistake == "write undecayed" else kc * (last - b).exp()
        S = kept + written.transpose(-1, -2) @ vc
    return torch.cat(outputs, 2), S


@checker(
    "7.5",
    title="chunkwise GLA",
    points=2,
    task="GLA's chunkwise form",
)
def check_gla_chunkwise(draw: Draw):
    """``fn(q, k, v, g, scale, chunk_size, initial_state) -> (o, final_state)``: GLA in chunks of
    ``chunk_size`` tokens (the last one may be shorter). Inside a chunk, masked attention with the
    relative decays ``exp(b_t - b_s)`` per key dimension (``b`` the cumulative log gate within the
    chunk); across chunks, the state: read with ``q_t exp(b_t)``, then decayed by ``exp(b_C)`` and
    written with ``k_s exp(b_C - b_s)``. Compared with the library's token-by-token form."""
    C = draw.choice([4, 8])
    long_chunk = draw.choice([40, 48])
    long_T = draw.not_multiple(9 * long_chunk, 12 * long_chunk, long_chunk)
    for name, B, H, T, chunk, D_k, D_v, gate, with_state, budget in [
        (
            "T not a multiple of the chunk, from zero",
            draw.int(1, 2),
            draw.int(1, 2),
            draw.not_multiple(9, 30, C),
            C,
            draw.int(2, 5),
            draw.int(2, 5),
            "mild",
            False,
            False,
        ),
        (
            "from an initial state",
            1,
            draw.int(1, 3),
            draw.not_multiple(10, 25, C),
            C,
            draw.int(2, 4),
            draw.int(2, 4),
            "mild",
            True,
            False,
        ),
        (
            "strong forgetting: a chunk forgets more than e^-700",
            1,
            1,
            draw.int(40, 70),
            32,
            draw.int(2, 4),
            draw.int(2, 3),
            "strong",
            True,
            False,
        ),
        ("one chunk longer than the sequence", 1, 2, draw.int(2, 7), 8, 3, 2, "mild", True, False),
        ("chunks of one token", 1, 1, draw.int(3, 6), 1, draw.int(2, 4), 2, "mild", True, False),
        ("many long chunks (in matrix products, not token by token)", 1, 1, long_T, long_chunk, 3, 2, "mild",
         True, True),
    ]:  # fmt: skip
        yield _gla_chunk_case(draw, name, B, H, T, chunk, D_k, D_v, gate, with_state, budget)


def _gla_chunk_case(draw, name, B, H, T, C, D_k, D_v, gate, with_state, budget) -> Case:
    q, k = draw.randn(B, H, T, D_k), draw.randn(B, H, T, D_k)
    v = draw.randn(B, H, T, D_v)
    if gate == "strong":
        g = -60 * draw.rand(B, H, T, D_k)
    else:
        g = torch.nn.functional.logsigmoid(draw.randn(B, H, T, D_k) + 2)
    scale = draw.float(0.2, 1.0)
    state = draw.randn(B, H, D_k, D_v) if with_state else None
    o, final = gla(q, k, v, g, scale=scale, form="recurrent", initial_state=state, output_final_state=True)
    mistakes = {
        "the queries never read the state carried from earlier chunks (no inter-chunk part)": "no read",
        "the carried state read with q_t instead of q_t exp(b_t) (its decay inside the chunk left out)": (
            "read undecayed"
        ),
        "the state carried over without its decay exp(b_C) over the chunk": "state undecayed",
        "the chunk's keys written without their decay to the chunk's end, exp(b_C - b_s)": "write undecayed",
        "each query missing its own token (the mask excludes the diagonal)": "strict",
        "keys after the query inside the chunk (the mask is not causal)": "no mask",
        "the decays one step short (b_t - b_s with an exclusive cumulative sum)": "exclusive",
    }
    variants = {
        label: (lambda m=m: _chunk_gla_variant(q, k, v, g, scale, C, state, m)[0])
        for label, m in mistakes.items()
    }
    chunk_end = torch.zeros(B, H, T, dtype=torch.bool)
    for start in range(0, T, C):
        forgotten = g[:, :, start : start + C].sum(2).min(-1).values < -700  # (B, H)
        chunk_end[:, :, start : start + C] = forgotten[..., None]
    regions = {"in chunks that forget more than e^-700": chunk_end[..., None].expand(B, H, T, D_v)}
    advice = {
        "in chunks that forget more than e^-700": "exp(-b_s) overflows there: never split exp(b_t - b_s) "
        "into exp(b_t) * exp(-b_s); exponentiate the difference, which is <= 0 below the diagonal"
    }

    def judge(got, expected):
        o_got, final_got = _pair(got, "(o, final_state)")
        compare(
            o_got, expected[0], "o", atol=1e-9, rtol=1e-8, variants=variants, regions=regions, advice=advice
        )
        compare(final_got, expected[1], "final_state", atol=1e-9, rtol=1e-8)

    chunks = -(-T // C)
    return Case(
        f"{name}: B={B}, H={H}, T={T}, chunk_size={C}, D_k={D_k}, D_v={D_v}",
        (q, k, v, g, scale, C, state),
        expected=(o, final),
        compare=judge,
        inputs=["q", "k", "v", "g", "scale", "chunk_size", "initial_state"],
        max_torch_calls=80 * chunks + 80 if budget else None,
        too_many_calls=(
            f"the {chunks} chunks need a few dozen each; a loop over the tokens of a chunk? Inside a chunk "
            "use matrix products (the parallel form), between chunks the state"
        ),
    )


# ---------------------------------------------------------------------------------------------------
# 7.6: one chunk of the delta rule (the WY / UT-transform form).


def _delta_chunk_variant(q, k, v, beta, S, scale, mistake=None):
    """One chunk of the delta rule in matrix form, with one named ``mistake`` (None: right), for hints."""
    n = k.shape[2]
    kk = k @ k.transpose(-1, -2)
    lower = kk.tril(0 if mistake == "diagonal in the system" else -1)
    system = torch.eye(n, dtype=k.dtype) + beta[..., None] * lower
    prediction = 0.0 if mistake == "state prediction left out" else k @ S
    rhs = beta[..., None] * (v - prediction)
    if mistake == "linear attention":
        U = beta[..., None] * v
    elif mistake == "start state only":
        U = rhs
    else:
        unit = mistake != "diagonal in the system"
        U = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=unit)
    scores = (q @ k.transpose(-1, -2)).tril(-1 if mistake == "own write not read" else 0)
    factor = 1.0 if mistake == "no scale" else scale
    return factor * (q @ S + scores @ U), S + k.transpose(-1, -2) @ U


@checker("7.6", title="the delta rule's chunk step", points=2, task="the delta rule's chunk step")
def check_delta_chunk_step(draw: Draw):
    """``fn(q, k, v, beta, S, scale) -> (o, S_next)``: one chunk of n tokens of the delta rule from the
    state ``S`` (B, H, D_k, D_v) at its start, in matrix form: the corrections ``U`` of the chunk solve
    ``(I + tril(diag(beta) K K^T, -1)) U = diag(beta) (V - K S)``; then ``o = scale (Q S + tril(Q K^T) U)``
    and ``S_next = S + K^T U``. Compared with the library's token-by-token delta rule."""
    for name, B, H, n, D_k, D_v, unit, beta_kind, zero_state_, budget in [
        ("unit keys, a state carried in", draw.int(1, 2), draw.int(1, 2), draw.int(5, 14), draw.int(3, 6),
         draw.int(2, 5), True, "random", False, False),
        ("the first chunk (S = 0)", 1, 2, draw.int(4, 10), draw.int(2, 5), draw.int(2, 4), True, "random",
         True, False),
        ("keys not normalised", 1, 1, draw.int(4, 9), draw.int(3, 5), draw.int(2, 4), False, "random", False,
         False),
        ("beta = 1: each write overwrites", 1, 1, draw.int(4, 9), 4, 3, True, "one", False, False),
        ("beta = 0: nothing is written", 1, 1, draw.int(3, 7), 3, 2, True, "zero", False, False),
        ("a chunk of one token", 2, 1, 1, draw.int(2, 5), draw.int(2, 4), True, "random", False, False),
        ("a long chunk (in matrix form, not token by token)", 1, 1, draw.int(56, 72), 8, 4, True, "random",
         False, True),
    ]:  # fmt: skip
        q, k = draw.randn(B, H, n, D_k), draw.randn(B, H, n, D_k)
        if unit:
            k = k / k.norm(dim=-1, keepdim=True)
        v = draw.randn(B, H, n, D_v)
        beta = {
            "random": draw.rand(B, H, n),
            "one": torch.ones(B, H, n, dtype=q.dtype),
            "zero": torch.zeros(B, H, n, dtype=q.dtype),
        }[beta_kind]
        S = torch.zeros(B, H, D_k, D_v, dtype=q.dtype) if zero_state_ else draw.randn(B, H, D_k, D_v)
        scale = draw.float(0.2, 1.0)
        yield _delta_chunk_case(name, q, k, v, beta, S, scale, budget)


def _delta_chunk_case(name, q, k, v, beta, S, scale, budget) -> Case:
    B, H, n, D_k = q.shape
    D_v = v.shape[-1]
    mistakes = {
        "linear attention's chunk (U = beta V: no correction at all)": "linear attention",
        "corrections against the chunk's start state only (u_t = beta_t (v_t - S^T k_t), no triangular "
        "solve: a token's correction must also see the writes of the earlier tokens of its chunk)": (
            "start state only"
        ),
        "the correction without what the carried state predicts (V - K S: the K S part is missing)": (
            "state prediction left out"
        ),
        "the triangular system with beta_t k_t . k_t on its diagonal (it is unit lower-triangular: I plus "
        "the strictly lower part)": "diagonal in the system",
        "each output missing its own token's write (tril(Q K^T) must keep the diagonal)": (
            "own write not read"
        ),
        "o without the scale": "no scale",
    }

    def make(m):
        return lambda: _delta_chunk_variant(q, k, v, beta, S, scale, m)

    o_variants = {label: (lambda m=m: make(m)()[0]) for label, m in mistakes.items()}
    state_variants = {label: (lambda m=m: make(m)()[1]) for label, m in mistakes.items() if m != "no scale"}

    def expected():
        return delta_rule(
            q, k, v, beta, scale=scale, form="recurrent", initial_state=S, output_final_state=True
        )

    def judge(got, expected):
        o_got, state_got = _pair(got, "(o, S_next)")
        compare(o_got, expected[0], "o", atol=1e-9, rtol=1e-8, variants=o_variants)
        compare(state_got, expected[1], "S_next", atol=1e-9, rtol=1e-8, variants=state_variants)

    return Case(
        f"{name}: B={B}, H={H}, n={n}, D_k={D_k}, D_v={D_v}",
        (q, k, v, beta, S, scale),
        expected=expected,
        compare=judge,
        inputs=["q", "k", "v", "beta", "S", "scale"],
        max_torch_calls=60 if budget else None,
        too_many_calls=(
            f"a chunk step needs a couple of dozen whatever n is; a loop over the chunk's {n} tokens? Solve "
            "the triangular system with torch.linalg.solve_triangular(..., upper=False, unitriangular=True)"
        ),
    )


# ---------------------------------------------------------------------------------------------------
# 7.7: Mamba-1's parallel scan, in log space.


def _scan_loop(g: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: one step at a time along dim -2, ``h_t = exp(g_t) h_{t-1} + x_t`` from 0."""
    h = torch.zeros_like(x[..., 0, :])
    states = []
    for t in range(x.shape[-2]):
        h = torch.exp(g[..., t, :]) * h + x[..., t, :]
        states.append(h)
    return g.cumsum(-2), torch.stack(states, dim=-2)


def _hillis_steele_variant(g, x, mistake=None):
    """Hillis and Steele's scan with one named ``mistake`` (None: right), for hints."""
    T, shift = g.shape[-2], 1
    rounds = max(0, math.ceil(math.log2(T))) if T > 1 else 0
    if mistake == "one round short":
        rounds = max(0, rounds - 1)
    pad = 1.0 if mistake == "pad 1" else 0.0
    for _ in range(rounds):
        g_back = torch.nn.functional.pad(g, (0, 0, shift, 0), value=pad)[..., :T, :]
        x_back = torch.nn.functional.pad(x, (0, 0, shift, 0))[..., :T, :]
        if mistake == "reversed":
            g, x = g_back + g, torch.exp(g_back) * x + x_back
        else:
            g, x = g_back + g, torch.exp(g) * x_back + x
        shift *= 2
    if mistake == "exclusive":
        g = torch.nn.functional.pad(g, (0, 0, 1, 0))[..., :T, :]
        x = torch.nn.functional.pad(x, (0, 0, 1, 0))[..., :T, :]
    return g, x


@checker(
    "7.7",
    title="a parallel scan in log space",
    points=2,
    task="the scan",
    forbid=("associative_scan", "logcumsumexp"),
    fallback="course_lib.recurrent:associative_scan",
)
def check_log_space_scan(draw: Draw):
    """``fn(g, x) -> (G, h)``: every prefix of ``h_t = exp(g_t) h_{t-1} + x_t`` (from h_0 = 0) along dim
    -2, and ``G_t = g_1 + ... + g_t``, in ceil(log2 T) rounds of whole-tensor operations (Hillis and
    Steele): in each round every position combines with the one ``2^r`` before it,
    ``(g_1, x_1) then (g_2, x_2) = (g_1 + g_2, exp(g_2) x_1 + x_2)``."""
    T_long = draw.int(300, 700)
    power = draw.int(3, 5)
    for name, shape, gate, budget in [
        ("a short sequence", (draw.int(1, 2), draw.int(2, 4), draw.int(3, 9), draw.int(2, 4)), "mild", False),
        ("T a power of two", (2, draw.int(1, 3), 2**power, 3), "mild", False),
        ("T one more than a power of two", (1, 2, 2**power + 1, draw.int(2, 4)), "mild", False),
        ("strong decay: cumulative log decays below -800", (1, 64, 3), "strong", False),
        ("T = 1", (2, 3, 1, 2), "mild", False),
        ("a long sequence (log-depth, not a loop over time steps)", (1, T_long, 2), "mild", True),
    ]:
        g = -30 * draw.rand(*shape) if gate == "strong" else -draw.rand(*shape) * draw.float(0.05, 1.0)
        x = draw.randn(*shape)
        yield _scan_case(name, g, x, budget)


def _scan_case(name, g, x, budget) -> Case:
    T = g.shape[-2]
    rounds = math.ceil(math.log2(T)) if T > 1 else 0
    mistakes = {
        "the combine in the wrong order (exp(g_1) x_2 + x_1: the later step's decay must scale the earlier "
        "input)": "reversed",
        "the shifted-in positions padded with a log decay of 1 (the identity step is g = 0, x = 0)": "pad 1",
        f"one round short ({rounds - 1} rounds: positions from 2^{rounds - 1} on miss their earliest "
        f"steps; T={T} needs ceil(log2 T) = {rounds})": "one round short",
        "the exclusive scan (h_{t-1} at position t: the scan includes step t itself)": "exclusive",
    }
    variants_h = {label: (lambda m=m: _hillis_steele_variant(g, x, m)[1]) for label, m in mistakes.items()}
    variants_g = {label: (lambda m=m: _hillis_steele_variant(g, x, m)[0]) for label, m in mistakes.items()}
    variants_h["cumsum then divide (P_t * cumsum(x_s / P_s))"] = lambda: (
        torch.exp(g.cumsum(-2)) * torch.cumsum(x / torch.exp(g.cumsum(-2)), dim=-2)
    )
    cumulative = g.cumsum(-2)
    overflow = (cumulative < -709).expand_as(x)
    regions = {"at positions whose cumulative log decay is below -709": overflow}
    advice = {
        "at positions whose cumulative log decay is below -709": "1 / P_s = exp(-G_s) overflows there: "
        "cumsum-then-divide cannot work; combine pairs so that only exp(g) of a later step (<= 0) is taken"
    }

    def judge(got, expected):
        G_got, h_got = _pair(got, "(G, h)")
        compare(
            h_got, expected[1], "h", atol=1e-9, rtol=1e-8, variants=variants_h, regions=regions, advice=advice
        )
        compare(G_got, expected[0], "G", atol=1e-9, rtol=1e-9, variants=variants_g)

    return Case(
        f"{name}: shape {tuple(g.shape)}, T={T}",
        (g, x),
        expected=lambda: _scan_loop(g, x),
        compare=judge,
        inputs=["g", "x"],
        max_torch_calls=20 * rounds + 30 if budget else None,
        too_many_calls=(
            f"T={T} takes ceil(log2 T) = {rounds} rounds of a handful of whole-tensor operations each; a "
            "loop over the time steps?"
        ),
    )


# ---------------------------------------------------------------------------------------------------
# 7.8: HGRN's forget gates for every layer, with their lower bounds.


def _hgrn_gates_variant(bound_logits, gate_logits, mistake=None):
    dim = -1 if mistake == "softmax over channels" and bound_logits.dim() > 1 else 0
    p = bound_logits.softmax(dim=dim)
    bounds = p.cumsum(0) if mistake == "no minus p1" else p.cumsum(0) - p[0]
    if mistake == "decreasing":
        bounds = bounds.flip(0)
    gamma = bounds.reshape(bounds.shape[0], *([1] * (gate_logits.dim() - bounds.dim())), *bounds.shape[1:])
    sigma = torch.sigmoid(gate_logits)
    if mistake == "max":
        return torch.log(torch.maximum(gamma, sigma))
    if mistake == "no 1 - gamma":
        return torch.log((gamma + sigma).clamp(max=1.0))
    f = gamma + (1 - gamma) * sigma
    return f if mistake == "f" else torch.log(f)


def _hgrn_gates_reference(bound_logits: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """Layer by layer with the library's two functions (used after the reader's call, never during it)."""
    bounds = hgrn_lower_bounds(bound_logits)
    out = []
    for layer in range(gate_logits.shape[0]):
        gamma = bounds[layer]
        out.append(hgrn_forget_gate(gate_logits[layer], gamma if gamma.dim() else gamma.expand(1)))
    return torch.stack(out)


@checker("7.8", title="HGRN's forget gates for every layer", points=1, task="HGRN's layer gates")
def check_hgrn_layer_gates(draw: Draw):
    """``fn(bound_logits, gate_logits) -> log_f``: the log forget gates of every layer. ``bound_logits``
    (L,) or (L, D) give the lower bounds ``gamma = cumsum(softmax(bound_logits, layers)) - p_1`` (0 for the
    first layer, rising with depth); ``gate_logits`` (L, ..., D) the data's logits of each layer; the gate is
    ``f = gamma_l + (1 - gamma_l) sigmoid(gate_logits[l])``, returned as ``log f`` (finite for any logit)."""
    for name, L, per_channel, extra, offset, scale_g in [
        ("one bound per layer", draw.int(2, 6), False, (draw.int(1, 2), draw.int(3, 9)), 0.0, 2.0),
        ("a bound per layer and channel", draw.int(2, 5), True, (2, draw.int(2, 6)), 0.0, 2.0),
        (
            "gate logits down to -1000 (the first layer has no floor)",
            draw.int(2, 4),
            True,
            (1, 5),
            0.0,
            1000.0,
        ),
        ("bound logits near 800 (exp overflows: a softmax by hand gives NaN)", 3, False, (2, 4), 800.0, 2.0),
        ("a single layer", 1, False, (2, 3), 0.0, 3.0),
    ]:
        D = draw.int(2, 5)
        bound_logits = (draw.randn(L, D) if per_channel else draw.randn(L)) + offset
        gate_logits = draw.randn(L, *extra, D) * scale_g
        if scale_g > 100:
            gate_logits = -gate_logits.abs()
        yield _hgrn_gates_case(
            f"{name}: L={L}, gate_logits {tuple(gate_logits.shape)}", bound_logits, gate_logits
        )


def _hgrn_gates_case(name, bound_logits, gate_logits) -> Case:
    mistakes = {
        "bounds without subtracting p_1 (the first layer's bound must be 0, not p_1)": "no minus p1",
        "the softmax over the channels instead of the layers": "softmax over channels",
        "bounds that fall with depth (upper layers must remember longer, not shorter)": "decreasing",
        "f itself instead of log f": "f",
        "max(gamma, sigmoid) instead of gamma + (1 - gamma) sigmoid": "max",
        "gamma + sigmoid without the (1 - gamma) factor": "no 1 - gamma",
    }
    variants = {
        label: (lambda m=m: _hgrn_gates_variant(bound_logits, gate_logits, m))
        for label, m in mistakes.items()
    }
    first = torch.zeros_like(gate_logits, dtype=torch.bool)
    first[0] = True
    where = "in the first layer, where there is no floor"
    regions = {where: first & (gate_logits < -700)}
    advice = {
        where: "sigmoid(x) underflows to 0 for x < -745, so log(sigmoid(x)) is -inf: use F.logsigmoid, "
        "and torch.logaddexp(log gamma, log(1 - gamma) + logsigmoid(x)) where there is a floor"
    }

    def judge(got, expected):
        _compare_naming_nan(
            got, expected, "log f", atol=1e-10, rtol=1e-9, variants=variants, regions=regions, advice=advice
        )

    return Case(
        name,
        (bound_logits, gate_logits),
        expected=lambda: _hgrn_gates_reference(bound_logits, gate_logits),
        compare=judge,
        inputs=["bound_logits", "gate_logits"],
    )


# ---------------------------------------------------------------------------------------------------
# 7.10: DeltaNet and Gated DeltaNet as RWKV-7.


@checker("7.10", title="Gated DeltaNet as RWKV-7", points=1, task="the mapping to RWKV-7")
def check_gated_delta_as_rwkv7(draw: Draw):
    """``fn(k, beta, g=None) -> (k_written, w, a, b)``, each (B, H, T, D_k), such that
    ``rwkv7(q, k_written, v, w, a, b)`` equals ``gated_delta_rule(q, k, v, g, beta)`` (``delta_rule`` when
    g is None): outputs and final states, from the same initial state. ``w`` is a log decay (<= 0)."""
    for name, gated, unit, strength in [
        ("DeltaNet (g = None), unit keys", False, True, 0.0),
        ("Gated DeltaNet, unit keys", True, True, 1.0),
        ("Gated DeltaNet, strong decay", True, True, 6.0),
        ("Gated DeltaNet, keys not normalised", True, False, 1.0),
    ]:
        B, H, T, D_k, D_v = draw.int(1, 2), draw.int(1, 2), draw.int(3, 12), draw.int(2, 5), draw.int(2, 4)
        q, k, v = draw.randn(B, H, T, D_k), draw.randn(B, H, T, D_k), draw.randn(B, H, T, D_v)
        if unit:
            k = k / k.norm(dim=-1, keepdim=True)
        beta = draw.rand(B, H, T)
        g = torch.nn.functional.logsigmoid(draw.randn(B, H, T) + 2) * strength if gated else None
        yield _rwkv7_case(f"{name}: B={B}, H={H}, T={T}, D_k={D_k}, D_v={D_v}", q, k, v, beta, g, draw)


def _rwkv7_case(name, q, k, v, beta, g, draw) -> Case:
    B, H, T, D_k = k.shape
    state = draw.randn(B, H, D_k, v.shape[-1])
    scale = draw.float(0.3, 1.0)
    options = dict(scale=scale, form="recurrent", initial_state=state, output_final_state=True)

    def expected():
        if g is None:
            return delta_rule(q, k, v, beta, **options)
        return gated_delta_rule(q, k, v, g, beta, **options)

    def judge(got, expected):
        if not isinstance(got, (tuple, list)) or len(got) != 4:
            raise Mismatch(f"expected a tuple (k_written, w, a, b), got {type(got).__name__}")
        for label, tensor in zip(("k_written", "w", "a", "b"), got):
            if not isinstance(tensor, torch.Tensor):
                raise Mismatch(f"{label}: expected a tensor, got {type(tensor).__name__}")
            if tensor.shape != k.shape:
                hint = ""
                if tensor.shape == k.shape[:3]:
                    hint = " (a per-step decay (B, H, T) must be expanded to every key dimension)"
                raise Mismatch(
                    f"{label} must have k's shape {tuple(k.shape)}, got {tuple(tensor.shape)}{hint}"
                )
        k_w, w, a, b = got
        hints = []
        if bool((w > 0).any()):
            hints.append("w must be a log decay (<= 0): g itself, not exp(g); with no decay, w = 0")
        gate = torch.zeros_like(beta) if g is None else g
        if (
            g is not None
            and torch.allclose(b.abs(), (beta[..., None] * k).abs())
            and bool((gate < -1e-6).any())
        ):
            hints.append(
                "the rank-one part b a^T must carry the decay too: "
                "diag(exp(w)) + b a^T = exp(g) (I - beta k k^T)"
            )
        if torch.allclose(k_w, k) and not torch.allclose(beta, torch.ones_like(beta)):
            hints.append("the written key is beta k: the delta rule writes beta_t k_t v_t^T")
        if bool(((a * b).sum(-1) > 1e-12).any()):
            hints.append(
                "the rank-one term must remove along k (b a^T = -exp(g) beta k k^T): check the sign of a or b"
            )
        try:
            o, final = rwkv7(q, k_w, v, w, a, b, **options)
        except (ValueError, TypeError, RuntimeError) as error:
            raise Mismatch(
                "\n".join([f"rwkv7 refused your tensors: {error}"] + ["hint: " + h for h in hints])
            ) from None
        try:
            compare(o, expected[0], "rwkv7(q, k_written, v, w, a, b) vs the (gated) delta rule", atol=1e-9,
                    rtol=1e-8)  # fmt: skip
            compare(final, expected[1], "final state", atol=1e-9, rtol=1e-8)
        except Mismatch as mismatch:
            raise Mismatch("\n".join([str(mismatch)] + ["hint: " + h for h in hints])) from None

    return Case(
        name,
        (k, beta) if g is None else (k, beta, g),
        expected=expected,
        compare=judge,
        inputs=["k", "beta"] if g is None else ["k", "beta", "g"],
    )


# ---------------------------------------------------------------------------------------------------
# Predict and explain.

declare("7.9", kind="predict", title="HGRN-2 when every forget gate is 1")
declare("7.11", kind="explain", title="what the delta rule's correction buys", points=2)
