"""Checkers for notebook 06: the elu+1 feature map, one recurrent step, one chunk update, the whole chunkwise
form with its state carried; the chapter's predict and explain exercises.

Expected values come from the formulas of the exercises, written densely here (einsum over whole
tensors), not from the library's loops. The chunkwise form is also checked against the work the guard
counted (:func:`~course_lib.exercises.guard.last_work`): no (T, T) matrix, no loop over tokens.
"""

from __future__ import annotations

import torch

from .common import Case, Draw, Mismatch, checker, compare, declare
from .guard import last_work

__all__ = [
    "check_elu_plus_one",
    "check_recurrent_step",
    "check_chunk_update",
    "check_chunked_linear_attention",
]

ELU_SHORTCUTS = ("elu", "celu", "selu", "elu_", "celu_", "selu_")


@checker(
    "6.1",
    title="the elu+1 feature map",
    points=1,
    task="elu+1",
    forbid=ELU_SHORTCUTS,
    fallback="course_lib.linear:elu_plus_one",
)
def check_elu_plus_one(draw: Draw):
    """``fn(x)``: ``x + 1`` where ``x > 0``, ``exp(x)`` elsewhere, elementwise, without ``F.elu``."""
    for name, x in [
        ("a ramp from -5 to 5 (0 included)", torch.linspace(-5, 5, 21, dtype=torch.float64)),
        ("Gaussian (B, H, T, D)", draw.randn(draw.int(1, 2), draw.int(1, 3), draw.int(2, 7), draw.int(2, 5))),
        (
            "very negative and very positive inputs",
            torch.tensor([-1e4, -700.0, -30.0, 0.0, 30.0, 800.0, 1e4], dtype=torch.float64),
        ),
        ("float32 input", draw.randn(draw.int(2, 5), draw.int(2, 5), dtype=torch.float32)),
    ]:
        variants = {
            "elu(x) without the + 1": lambda x=x: torch.where(x > 0, x, torch.expm1(x.clamp(max=0))),
            "exp(x) everywhere": lambda x=x: torch.exp(x),
            "x + 1 everywhere": lambda x=x: x + 1,
            "relu(x) + 1": lambda x=x: x.clamp(min=0) + 1,
        }
        regions = {"at large positive inputs": x > 80}
        advice = {
            "at large positive inputs": "exp(x) overflows there: compute exp only of min(x, 0), or pick "
            "the branch without evaluating exp on positive x"
        }
        tolerance = dict(atol=1e-6, rtol=1e-5) if x.dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)

        def judge(got, expected, variants=variants, regions=regions, advice=advice, tolerance=tolerance):
            compare(got, expected, "elu+1", variants=variants, regions=regions, advice=advice, **tolerance)

        yield Case(
            f"{name}: shape {tuple(x.shape)}, {str(x.dtype).removeprefix('torch.')}",
            (x,),
            expected=torch.where(x > 0, x + 1, torch.exp(x.clamp(max=0))),
            compare=judge,
            inputs=["x"],
        )


def _triple(got: object, names: str, count: int) -> tuple:
    if not isinstance(got, (tuple, list)) or len(got) != count:
        raise Mismatch(f"expected a tuple {names}, got {type(got).__name__}")
    return tuple(got)


@checker("6.2", title="one recurrent step", points=2, task="the recurrent step")
def check_recurrent_step(draw: Draw):
    """``fn(S, z, phi_q, phi_k, v) -> (S_new, z_new, o)``: one step of normalised linear attention, write
    first (``S_new = S + phi_k v^T``, ``z_new = z + phi_k``), then read
    (``o = S_new^T phi_q / (phi_q . z_new)``). Shapes: S (B, H, D', D_v), z, phi_q, phi_k (B, H, D'),
    v (B, H, D_v)."""
    for name, B, H, D, D_v, history in [
        ("the first token (empty state)", 1, 1, draw.int(2, 5), draw.int(2, 5), 0),
        (
            "after a few tokens, D' != D_v",
            draw.int(1, 2),
            draw.int(2, 3),
            draw.int(3, 6),
            draw.int(2, 7),
            draw.int(2, 9),
        ),
        ("one feature", 1, 2, 1, draw.int(2, 4), draw.int(1, 4)),
    ]:
        past_k = draw.rand(B, H, history, D) + 0.1
        past_v = draw.randn(B, H, history, D_v)
        S = torch.einsum("bhtd,bhte->bhde", past_k, past_v)
        z = past_k.sum(2)
        phi_q, phi_k = draw.rand(B, H, D) + 0.1, draw.rand(B, H, D) + 0.1
        v = draw.randn(B, H, D_v)
        S_new = S + phi_k[..., :, None] * v[..., None, :]
        z_new = z + phi_k
        o = torch.einsum("bhd,bhde->bhe", phi_q, S_new) / (phi_q * z_new).sum(-1, keepdim=True)
        o_old = torch.einsum("bhd,bhde->bhe", phi_q, S) / (phi_q * z).sum(-1, keepdim=True)
        variants_o = {
            "the read before the write (o from the state without this token)": lambda o_old=o_old: o_old,
            "o not divided by phi_q . z_new": lambda phi_q=phi_q, S_new=S_new: torch.einsum(
                "bhd,bhde->bhe", phi_q, S_new
            ),
        }
        variants_S = {
            "the state transposed (v phi_k^T, shape D_v x D')": lambda S_new=S_new: S_new.transpose(-1, -2)
        }
        empty = {"in a step from the empty state (z = 0)": torch.full_like(o, history == 0, dtype=torch.bool)}
        advice = {
            "in a step from the empty state (z = 0)": "reading before writing divides by phi_q . z = 0 on "
            "the first token: write the token into S and z first, then read"
        }

        def judge(got, expected, variants_o=variants_o, variants_S=variants_S, empty=empty, advice=advice):
            S_got, z_got, o_got = _triple(got, "(S_new, z_new, o)", 3)
            compare(S_got, expected[0], "S_new", atol=1e-12, rtol=1e-10, variants=variants_S)
            compare(z_got, expected[1], "z_new", atol=1e-12, rtol=1e-10)
            compare(
                o_got,
                expected[2],
                "o",
                atol=1e-12,
                rtol=1e-10,
                variants=variants_o,
                regions=empty,
                advice=advice,
            )

        yield Case(
            f"{name}: B={B}, H={H}, D'={D}, D_v={D_v}, after {history} tokens",
            (S, z, phi_q, phi_k, v),
            expected=(S_new, z_new, o),
            compare=judge,
            inputs=["S", "z", "phi_q", "phi_k", "v"],
        )


@checker("6.3", title="one chunk update", points=2, task="the chunk update")
def check_chunk_update(draw: Draw):
    """``fn(S, phi_q, phi_k, v) -> (o, S_new)``: one chunk of causal, unnormalised linear attention:
    ``o = phi_q S + tril(phi_q phi_k^T) v`` and ``S_new = S + phi_k^T v``. Shapes: S (B, H, D', D_v),
    phi_q, phi_k (B, H, C, D'), v (B, H, C, D_v)."""
    for name, B, H, C, D, D_v in [
        (
            "a chunk of a few tokens",
            draw.int(1, 2),
            draw.int(1, 3),
            draw.int(3, 8),
            draw.int(2, 5),
            draw.int(2, 6),
        ),
        ("a chunk of one token", 1, draw.int(1, 3), 1, draw.int(2, 4), draw.int(2, 4)),
        ("a long chunk, D' != D_v", 1, 1, draw.int(9, 16), draw.int(3, 6), draw.int(2, 3)),
    ]:
        yield _chunk_case(draw, name, B, H, C, D, D_v)


def _chunk_case(draw: Draw, name: str, B: int, H: int, C: int, D: int, D_v: int) -> Case:
    S = draw.randn(B, H, D, D_v)
    phi_q, phi_k = draw.rand(B, H, C, D), draw.rand(B, H, C, D)
    v = draw.randn(B, H, C, D_v)
    scores = phi_q @ phi_k.transpose(-1, -2)
    causal = torch.ones(C, C, dtype=torch.bool).tril()
    o = phi_q @ S + scores.masked_fill(~causal, 0.0) @ v
    S_new = S + phi_k.transpose(-1, -2) @ v
    variants_o = {
        "o without the causal mask inside the chunk (later keys leak in)": lambda: phi_q @ S + scores @ v,
        "o with the diagonal left out (tril(..., -1)): a query must see its own key": lambda: (
            phi_q @ S + scores.masked_fill(~torch.ones(C, C, dtype=torch.bool).tril(-1), 0.0) @ v
        ),
        "o read from the new state (the chunk counted twice)": lambda: (
            phi_q @ S_new + scores.masked_fill(~causal, 0.0) @ v
        ),
        "o without the state of the earlier chunks": lambda: scores.masked_fill(~causal, 0.0) @ v,
    }

    def judge(got, expected):
        o_got, S_got = _triple(got, "(o, S_new)", 2)
        compare(o_got, expected[0], "o", atol=1e-12, rtol=1e-10, variants=variants_o)
        compare(
            S_got,
            expected[1],
            "S_new",
            atol=1e-12,
            rtol=1e-10,
            variants={
                "S + phi_q^T v (the queries written instead of the keys)": lambda: (
                    S + phi_q.transpose(-1, -2) @ v
                )
            },
        )

    return Case(
        f"{name}: B={B}, H={H}, C={C}, D'={D}, D_v={D_v}",
        (S, phi_q, phi_k, v),
        expected=(o, S_new),
        compare=judge,
        inputs=["S", "phi_q", "phi_k", "v"],
    )


# --- 6.4: chunkwise causal linear attention with the state carried --------------------------------------


def _by_chunks(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    state: torch.Tensor,
    *,
    read_after_write: bool = False,
    mask: str = "causal",
    carry: bool = True,
) -> torch.Tensor:
    """The outputs of chunkwise mistakes (for hints): the state read after the chunk's write, no mask or
    no diagonal inside the chunk, or the state not carried from chunk to chunk."""
    outputs, S = [], state
    for start in range(0, phi_q.shape[2], chunk_size):
        q, k, x = (t[:, :, start : start + chunk_size] for t in (phi_q, phi_k, v))
        scores = q @ k.transpose(-1, -2)
        if mask == "causal":
            scores = torch.tril(scores)
        elif mask == "strict":
            scores = torch.tril(scores, -1)
        after = S + k.transpose(-1, -2) @ x
        outputs.append(q @ (after if read_after_write else S) + scores @ x)
        if carry:
            S = after
    return torch.cat(outputs, dim=2)


@checker(
    "6.4",
    title="chunkwise causal linear attention with the state carried",
    points=2,
    task="the chunkwise form",
)
def check_chunked_linear_attention(draw: Draw):
    """``fn(phi_q, phi_k, v, chunk_size, initial_state=None) -> (o, final_state)``: causal, unnormalised
    linear attention in chunks: ``o_t = phi_q_t^T (S_0 + sum_{j <= t} phi_k_j v_j^T)`` and
    ``final_state = S_0 + phi_K^T V``, with ``S_0`` the initial state (zeros when None). phi_q, phi_k
    ``(B, H, T, D')``, v ``(B, H, T, D_v)``, states ``(B, H, D', D_v)``. The last chunk may be shorter. The
    form must be chunkwise: no ``(T, T)`` matrix, and a few operations per chunk, not per token."""
    for name, B, H, T, C, D, D_v, with_state, dtype in [
        (
            "T a multiple of the chunk, no initial state",
            draw.int(1, 2),
            draw.int(1, 3),
            (c := draw.int(3, 5)) * draw.int(2, 4),
            c,
            draw.int(2, 5),
            draw.int(2, 6),
            False,
            torch.float64,
        ),
        (
            "a ragged last chunk",
            1,
            2,
            draw.not_multiple(10, 23, (r := draw.int(3, 5))),
            r,
            4,
            3,
            False,
            torch.float64,
        ),
        (
            "an initial state carried in, a ragged last chunk",
            2,
            2,
            draw.not_multiple(9, 20, (s := draw.int(3, 4))),
            s,
            3,
            4,
            True,
            torch.float64,
        ),
        (
            "one chunk longer than the sequence",
            1,
            2,
            (u := draw.int(3, 7)),
            u + draw.int(1, 6),
            4,
            2,
            True,
            torch.float64,
        ),
        ("chunks of one token (the recurrent form)", 1, 2, draw.int(4, 8), 1, 3, 3, True, torch.float64),
        ("one token: T = 1", 1, 3, 1, draw.int(2, 4), 4, 4, True, torch.float64),
        ("float32, D' != D_v", 1, 2, draw.not_multiple(10, 20, 4), 4, 6, 3, True, torch.float32),
        (
            "a long sequence: chunkwise, not parallel or token by token",
            1,
            2,
            draw.not_multiple(900, 1100, (w := draw.choice([32, 64]))),
            w,
            8,
            8,
            True,
            torch.float64,
        ),
    ]:
        phi_q, phi_k = draw.rand(B, H, T, D, dtype=dtype), draw.rand(B, H, T, D, dtype=dtype)
        v = draw.randn(B, H, T, D_v, dtype=dtype)
        state = draw.randn(B, H, D, D_v, dtype=dtype) if with_state else None
        S0 = torch.zeros(B, H, D, D_v, dtype=dtype) if state is None else state
        o = torch.tril(phi_q @ phi_k.transpose(-1, -2)) @ v + phi_q @ S0
        final = S0 + phi_k.transpose(-1, -2) @ v
        whole = T - T % C if T > C else T
        variants_o = {
            "o read from the state after the chunk's own write (the chunk counted twice)": (
                lambda a=(phi_q, phi_k, v, C, S0): _by_chunks(*a, read_after_write=True)
            ),
            "o without the causal mask inside the chunk (later keys of the chunk leak in)": (
                lambda a=(phi_q, phi_k, v, C, S0): _by_chunks(*a, mask="none")
            ),
            "o with the diagonal left out (tril(..., -1)): a query must see its own key": (
                lambda a=(phi_q, phi_k, v, C, S0): _by_chunks(*a, mask="strict")
            ),
            "o with the state not carried from chunk to chunk (each chunk starts from the initial state)": (
                lambda a=(phi_q, phi_k, v, C, S0): _by_chunks(*a, carry=False)
            ),
            "the output without the last, shorter chunk": lambda o=o, whole=whole: o[:, :, :whole],
        }
        if with_state:
            variants_o["o with the initial state ignored"] = lambda a=(phi_q, phi_k, v, C, S0): _by_chunks(
                *a[:4], torch.zeros_like(a[4])
            )
        before_last = (T - 1) // C * C  # where the last chunk starts
        wrong_states = {  # cheap: computed now, named if the reader's state equals one
            "the final state without the initial state": phi_k.transpose(-1, -2) @ v,
            "the state before the last chunk's write": S0
            + phi_k[:, :, :before_last].transpose(-1, -2) @ v[:, :, :before_last],
            "the state written with phi_q instead of phi_k": S0 + phi_q.transpose(-1, -2) @ v,
            "the state transposed (V^T phi_K, shape D_v x D')": final.transpose(-1, -2),
        }
        variants_S = {key: (lambda x=x: x) for key, x in wrong_states.items()}
        tolerance = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-9)
        label = f"T={T}, chunk_size={C}"
        long = T >= 512

        def judge(
            got,
            expected,
            variants_o=variants_o,
            variants_S=variants_S,
            tolerance=tolerance,
            label=label,
            long=long,
            shapes=(B, H, T, C),
        ):
            o_got, S_got = _triple(got, "(o, final_state)", 2)
            compare(o_got, expected[0], f"o ({label})", variants=variants_o, **tolerance)
            compare(S_got, expected[1], f"final_state ({label})", variants=variants_S, **tolerance)
            if long:
                _chunkwise_check(label, *shapes)

        yield Case(
            f"{name}: B={B}, H={H}, {label}, D'={D}, D_v={D_v}"
            + (", with an initial state" if with_state else ""),
            (phi_q, phi_k, v, C),
            {} if state is None else {"initial_state": state},
            expected=(o, final),
            compare=judge,
            inputs=["phi_q", "phi_k", "v", "chunk_size"],
        )


def _chunkwise_check(label: str, B: int, H: int, T: int, C: int) -> None:
    """Refuse the parallel form (a T x T matrix) and the recurrent one (operations per token)."""
    work = last_work()
    matrix = B * H * T * T
    if work.largest > matrix // 4:
        raise Mismatch(
            f"{label}: right values, but your function built a tensor of {work.largest:,} entries, "
            f"{work.largest / matrix:.0%} of the (T, T) matrices tril(phi_Q phi_K^T) of all heads "
            f"({matrix:,}): that is the parallel form. Inside a chunk only its C x C block is needed; the "
            "earlier chunks reach a query through the state."
        )
    chunks = -(-T // C)
    if work.operations > 30 * chunks + 100:
        raise Mismatch(
            f"{label}: right values, but your function ran {work.operations:,} operations for {chunks} "
            f"chunks (about {work.operations / T:.1f} per token): a loop over tokens (the recurrent form), "
            "not over chunks. Each chunk takes a few matrix products: a read of the state, the masked "
            "C x C block, and one write of the whole chunk into the state."
        )


# --- predict and explain ------------------------------------------------------------------------------

declare("6.5", kind="explain", title="why the chunk form exists", points=2)
declare("6.6", kind="predict", title="the rank of linear attention's matrix")
declare("6.7", kind="predict", title="how many pairs a 16 x 16 state recalls")
