"""Checkers for notebook 05: a dilated mask, a block layout to a token mask, the StreamingLLM keep set,
the number of layers a causal window needs to connect a sequence, a sliding-window kernel that skips work,
H2O's keep rule, MoBA's routing mask and attention over time; the chapter's predict and explain exercises.

Expected values come from the definitions, computed densely here (masks over all pairs, sorts over all
keys), not from the library's kernels. The kernels that must skip work are checked against the work the
guard counted (:func:`~course_lib.exercises.guard.last_work`).
"""

from __future__ import annotations

import math

import torch

from .common import Case, Draw, Mismatch, checker, compare, compare_exact, compare_number, declare
from .guard import last_work

__all__ = [
    "check_dilated_mask",
    "check_block_layout_to_mask",
    "check_streaming_keep",
    "check_window_layers",
    "check_sliding_window_attention",
    "check_h2o_keep",
    "check_moba_mask",
    "check_time_attention",
]


def _dilated(
    T: int, window: int, dilation: int, *, causal: bool = True, span: int | None = None
) -> torch.Tensor:
    distance = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    if not causal:
        distance = distance.abs()
    span = (window - 1) * dilation if span is None else span
    return (distance >= 0) & (distance % dilation == 0) & (distance <= span)


@checker(
    "5.1",
    title="a dilated mask",
    points=1,
    task="the dilated mask",
    fallback="course_lib.sparse:dilated_mask",
)
def check_dilated_mask(draw: Draw):
    """``fn(T, window, dilation)``: the causal (T, T) bool mask where query i sees keys i, i - r, ...,
    i - (window - 1) r that exist."""
    for name, T, window, dilation in [
        ("a typical pattern", draw.int(8, 16), draw.int(2, 4), draw.int(2, 3)),
        ("window 1: only the query itself", draw.int(4, 9), 1, draw.int(2, 4)),
        ("dilation 1: a plain sliding window", draw.int(5, 12), draw.int(2, 5), 1),
        ("a window longer than the sequence", draw.int(3, 6), draw.int(7, 9), 2),
        ("T = 1", 1, draw.int(1, 3), draw.int(1, 3)),
    ]:
        variants = {
            "the pattern in both directions (not causal)": lambda T=T, w=window, r=dilation: _dilated(
                T, w, r, causal=False
            ),
            "keys up to window - 1 positions back, not window - 1 *kept* keys back": (
                lambda T=T, w=window, r=dilation: _dilated(T, w, r, span=w - 1)
            ),
            "a plain sliding window (the dilation ignored)": lambda T=T, w=window: _dilated(T, w, 1),
        }

        def judge(got, expected, variants=variants, name=f"T={T}, window={window}, dilation={dilation}"):
            compare_exact(got, expected, f"mask ({name})", variants=variants)

        yield Case(
            f"{name}: T={T}, window={window}, dilation={dilation}",
            (T, window, dilation),
            expected=_dilated(T, window, dilation),
            compare=judge,
            inputs=["T", "window", "dilation"],
        )


@checker("5.2", title="from a block layout to a token mask", points=1, task="the block-layout expansion")
def check_block_layout_to_mask(draw: Draw):
    """``fn(layout, block_size, T)``: expand a (ceil(T/b), ceil(T/b)) bool layout to the (T, T) token mask,
    cropping the last, partial blocks."""
    for name, T, block_size in [
        ("b divides T", (b := draw.choice([2, 3, 4])) * draw.int(2, 4), b),
        ("b does not divide T", draw.not_multiple(7, 19, 4), 4),
        ("another ragged size", draw.not_multiple(5, 14, 3), 3),
        ("one block larger than T", draw.int(2, 5), 8),
        ("blocks of one token", draw.int(3, 7), 1),
    ]:
        blocks = -(-T // block_size)
        layout = draw.rand(blocks, blocks) < 0.45
        layout[0, -1] = True  # a corner tile, so an off-by-one in the cropping shows
        expected = layout.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[:T, :T]
        variants = {
            "the layout tiled (repeat) instead of each entry blown up (repeat_interleave)": (
                lambda layout=layout, b=block_size, T=T: layout.repeat(b, b)[:T, :T]
            ),
            "the layout transposed": lambda layout=layout, b=block_size, T=T: layout.T.repeat_interleave(
                b, 0
            ).repeat_interleave(b, 1)[:T, :T],
            "the mask not cropped to T x T": lambda layout=layout, b=block_size: layout.repeat_interleave(
                b, 0
            ).repeat_interleave(b, 1),
        }

        def judge(got, expected, variants=variants, label=f"T={T}, block_size={block_size}"):
            compare_exact(got, expected, f"token mask ({label})", variants=variants)

        yield Case(
            f"{name}: T={T}, block_size={block_size}",
            (layout, block_size, T),
            expected=expected,
            compare=judge,
            inputs=["layout", "block_size", "T"],
        )


def _streaming(seq_len: int, budget: int, num_sinks: int) -> torch.Tensor:
    if budget >= seq_len:
        return torch.arange(seq_len)
    recent = budget - num_sinks
    return torch.cat([torch.arange(num_sinks), torch.arange(seq_len - recent, seq_len)])


@checker(
    "5.3",
    title="the StreamingLLM keep set",
    points=1,
    task="the StreamingLLM keep set",
    fallback="course_lib.sparse:streaming_keep",
)
def check_streaming_keep(draw: Draw):
    """``fn(seq_len, budget, num_sinks)``: the sorted int64 indices kept: the first ``num_sinks`` and the
    newest ``budget - num_sinks``; all of them when ``budget >= seq_len``."""
    for name, seq_len, budget, sinks in [
        ("a typical budget", draw.int(30, 90), draw.int(8, 20), draw.int(1, 4)),
        ("no sinks", draw.int(10, 40), draw.int(3, 9), 0),
        ("every kept entry a sink", draw.int(10, 30), (s := draw.int(2, 6)), s),
        ("the budget covers the cache", (n := draw.int(3, 9)), n + draw.int(0, 4), min(2, n)),
        ("one entry over budget", (m := draw.int(6, 12)), m - 1, draw.int(1, 3)),
    ]:
        variants = {
            "the newest budget entries (the sinks forgotten)": lambda n=seq_len, b=budget: torch.arange(
                max(0, n - b), n
            ),
            "the sinks plus the newest budget entries (num_sinks too many)": (
                lambda n=seq_len, b=budget, s=sinks: torch.cat(
                    [torch.arange(s), torch.arange(max(s, n - b), n)]
                )
            ),
        }

        def judge(
            got, expected, variants=variants, label=f"seq_len={seq_len}, budget={budget}, sinks={sinks}"
        ):
            if (
                isinstance(got, torch.Tensor)
                and got.dim() == 1
                and got.numel() > 1
                and not bool((got[1:] > got[:-1]).all())
            ):
                raise Mismatch(f"{label}: the indices must be sorted and distinct, got {got.tolist()}")
            compare_exact(got, expected, f"kept indices ({label})", variants=variants)

        yield Case(
            f"{name}: seq_len={seq_len}, budget={budget}, num_sinks={sinks}",
            (seq_len, budget, sinks),
            expected=_streaming(seq_len, budget, sinks),
            compare=judge,
            inputs=["seq_len", "budget", "num_sinks"],
        )


@checker("5.4", title="layers for a causal window", points=1, task="the layer count")
def check_window_layers(draw: Draw):
    """``fn(T, window)``: how many layers of a causal sliding window (window >= 2, counting the query itself)
    until the last of T tokens has heard from the first: ceil((T - 1) / (window - 1))."""
    for name, T, window in [
        ("a long sequence, a short window", draw.int(40, 200), draw.int(3, 9)),
        ("window 2: one step back per layer", draw.int(5, 30), 2),
        ("T - 1 a multiple of window - 1", (w := draw.int(3, 6)) + (w - 1) * draw.int(2, 5), w),
        ("a window longer than the sequence", draw.int(2, 8), draw.int(9, 20)),
        ("T = 2", 2, draw.int(2, 5)),
    ]:
        expected = math.ceil((T - 1) / (window - 1))
        variants = {
            "ceil(T / window)": math.ceil(T / window),
            "floor((T - 1) / (window - 1)) (rounded down)": (T - 1) // (window - 1),
            "ceil((T - 1) / window) (the query counted as a step)": math.ceil((T - 1) / window),
            "ceil(T / (window - 1))": math.ceil(T / (window - 1)),
        }

        def judge(got, expected, variants=variants, label=f"T={T}, window={window}"):
            if isinstance(got, bool) or not isinstance(got, (int, torch.Tensor)):
                raise Mismatch(f"{label}: return the number of layers as an int, got {got!r}")
            compare_number(
                got,
                expected,
                f"layers ({label})",
                integer=True,
                variants={k: v for k, v in variants.items() if v != expected},
            )

        yield Case(
            f"{name}: T={T}, window={window}",
            (T, window),
            expected=expected,
            compare=judge,
            inputs=["T", "window"],
        )


# --- 5.5: a sliding-window kernel that skips work -----------------------------------------------------


def _window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    offset: int | None = None,
    allowed: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense attention with the causal window mask (query i at position offset + i, default S - T)."""
    T, S = q.shape[-2], k.shape[-2]
    offset = S - T if offset is None else offset
    if allowed is None:
        distance = (torch.arange(T)[:, None] + offset) - torch.arange(S)[None, :]
        allowed = (distance >= 0) & (distance < window)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v


def _block_window(T: int, S: int, window: int, *, leak: bool = False, from_block_start: bool = False):
    """The mask of two blocked kernels that go wrong (blocks of ``window`` queries): one lets a block's
    queries see every key up to the block's end, one starts each block's keys at its first query."""
    position = torch.arange(T)[:, None] + (S - T)
    key = torch.arange(S)[None, :]
    block_start = (torch.arange(T)[:, None] // window) * window + (S - T)
    block_end = torch.minimum(block_start + window - 1, torch.tensor(S - 1))
    if leak:
        return (key <= block_end) & (key > position - window)
    return (key <= position) & (key > position - window) & (key >= block_start)


def _skip_check(label: str, B: int, H: int, T: int, S: int, D: int, D_v: int, what: str) -> None:
    """Refuse a call whose work (read from the guard) is that of dense attention."""
    work = last_work()
    pairs = B * H * T * S
    dense = pairs * (D + D_v)
    if work.largest > pairs // 4:
        raise Mismatch(
            f"{label}: right values, but your function built a tensor of {work.largest:,} entries, "
            f"{work.largest / pairs:.0%} of the B*H*T*S = {pairs:,} scores of dense attention "
            f"(a mask on dense scores still computes them all). {what}"
        )
    done = work.multiply_adds + work.elements
    if done > dense // 4:
        raise Mismatch(
            f"{label}: right values, but your function did {done:,} operations (multiply-adds of its "
            f"matrix products plus entries written), {done / dense:.0%} of the {dense:,} multiply-adds of "
            f"dense attention: it does not skip the pairs outside the window. {what}"
        )


@checker(
    "5.5",
    title="a sliding-window kernel that skips work",
    points=2,
    task="the sliding-window kernel",
    fallback="course_lib.sparse:sliding_window_attention",
)
def check_sliding_window_attention(draw: Draw):
    """``fn(q, k, v, window)``: causal sliding-window attention, q ``(B, H, T, D)``, k ``(B, H, S, D)``,
    v ``(B, H, S, D_v)`` with ``S >= T``; query i sits at position ``S - T + i`` and sees the ``window``
    keys up to its own position that exist; scores scaled by ``1/sqrt(D)``. The kernel must skip the
    pairs outside the window: no ``(T, S)`` scores or mask, and a fraction of dense attention's work."""
    for name, B, H, T, S, window, D, D_v, spread, dtype in [
        (
            "T = S, not a multiple of the window",
            draw.int(1, 2),
            draw.int(1, 3),
            (n := draw.not_multiple(11, 40, (w := draw.int(3, 6)))),
            n,
            w,
            draw.choice([3, 5]),
            draw.choice([2, 4]),
            1.0,
            torch.float64,
        ),
        (
            "a chunk after a cached prefix: S > T",
            1,
            2,
            (t := draw.int(5, 13)),
            t + draw.int(5, 20),
            draw.int(3, 7),
            4,
            3,
            1.0,
            torch.float64,
        ),
        ("window 1: each query sees only itself", 1, 2, draw.int(4, 9), None, 1, 3, 3, 1.0, torch.float64),
        (
            "a window longer than the sequence: causal attention",
            1,
            1,
            (u := draw.int(4, 10)),
            u,
            u + draw.int(1, 5),
            4,
            2,
            1.0,
            torch.float64,
        ),
        (
            "one query (a decoding step): T = 1",
            2,
            2,
            1,
            draw.int(20, 40),
            draw.int(4, 9),
            4,
            4,
            1.0,
            torch.float64,
        ),
        (
            "large scores (up to about +-1000): exp overflows without the max",
            1,
            2,
            (m := draw.int(9, 20)),
            m,
            draw.int(3, 5),
            4,
            4,
            60.0,
            torch.float64,
        ),
        ("float32 inputs", 1, 2, (f := draw.int(9, 20)), f, draw.int(3, 6), 8, 8, 1.0, torch.float32),
        (
            "a long sequence: does the kernel skip work?",
            1,
            2,
            2048,
            2048,
            draw.int(8, 24),
            16,
            16,
            1.0,
            torch.float64,
        ),
    ]:
        S = T if S is None else S
        q = draw.randn(B, H, T, D, dtype=dtype, scale=spread)
        k = draw.randn(B, H, S, D, dtype=dtype, scale=spread)
        v = draw.randn(B, H, S, D_v, dtype=dtype)
        label = f"T={T}, S={S}, window={window}"
        variants = {
            "a window of window + 1 keys (distance <= window instead of < window)": (
                lambda q=q, k=k, v=v, w=window: _window_attention(q, k, v, w + 1)
            ),
            "attention without the 1/sqrt(D) scale": lambda q=q, k=k, v=v, w=window: _window_attention(
                q, k, v, w, scale=1.0
            ),
            "blocks of window queries that see every key up to the end of their block (no causal mask "
            "inside the block)": lambda q=q, k=k, v=v, w=window, T=T, S=S: _window_attention(
                q, k, v, w, allowed=_block_window(T, S, w, leak=True)
            ),
            "blocks of window queries whose keys start at the block's first query (the window - 1 keys "
            "before it are missing)": lambda q=q, k=k, v=v, w=window, T=T, S=S: _window_attention(
                q, k, v, w, allowed=_block_window(T, S, w, from_block_start=True)
            ),
        }
        if S > T:
            variants["the window aligned to the start of the keys (query i at position i, not S - T + i)"] = (
                lambda q=q, k=k, v=v, w=window: _window_attention(q, k, v, w, offset=0)
            )
        tail = torch.zeros(T, dtype=torch.bool)
        if T % window and T > window:
            tail[T - T % window :] = True
        regions = {"in the last, shorter block of queries": tail.view(1, 1, T, 1)}
        advice = {"in the last, shorter block of queries": "T is not a multiple of the block: do not skip it"}
        tolerance = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-9)
        skip = T >= 1024

        def judge(
            got,
            expected,
            variants=variants,
            regions=regions,
            advice=advice,
            tolerance=tolerance,
            label=label,
            skip=skip,
            shapes=(B, H, T, S, D, D_v),
        ):
            compare(
                got,
                expected,
                f"output ({label})",
                variants=variants,
                regions=regions,
                advice=advice,
                factors={"sqrt(D)": shapes[4] ** 0.5},
                **tolerance,
            )
            if skip:
                _skip_check(
                    label,
                    *shapes,
                    "Cut the queries into blocks; each block needs only the keys from window - 1 before "
                    "its first query to its last query: compute that tile alone.",
                )

        yield Case(
            f"{name}: B={B}, H={H}, T={T}, S={S}, window={window}, D={D}, D_v={D_v}",
            (q, k, v, window),
            expected=lambda q=q, k=k, v=v, w=window: _window_attention(q, k, v, w),
            compare=judge,
            inputs=["q", "k", "v", "window"],
        )


# --- 5.6: H2O's keep rule -------------------------------------------------------------------------------


def _h2o(
    weights: torch.Tensor,
    budget: int,
    recent: int | None = None,
    *,
    score: str = "sum",
    heavy_from_all: bool = False,
    round_up: bool = False,
    shared: bool = False,
) -> torch.Tensor:
    """H2O's kept indices from the definition: the newest ``recent`` keys and, among the older ones, those
    that received the most attention (sorted); the misconceptions through the keyword arguments."""
    S = weights.shape[-1]
    batch = weights.shape[:-2]
    if budget >= S:
        return torch.arange(S).expand(*batch, S)
    if recent is None:
        recent = budget - budget // 2 if round_up else budget // 2
    if score == "sum":
        received = weights.sum(-2)
    elif score == "max":
        received = weights.amax(-2)
    else:  # the mean over the queries that could see each key
        received = weights.sum(-2) / (weights > 0).sum(-2).clamp(min=1)
    if shared:
        received = received.sum(-2, keepdim=True).expand_as(received)
    candidates = received if heavy_from_all else received[..., : S - recent]
    order = torch.sort(candidates, dim=-1, descending=True, stable=True).indices
    heavy = order[..., : budget - recent]
    newest = torch.arange(S - recent, S).expand(*batch, recent)
    return torch.cat([heavy, newest], dim=-1).sort(dim=-1).values


def _attention_weights(draw: Draw, B: int, H: int, T: int, S: int) -> torch.Tensor:
    """Softmax weights of random scores, causal with the queries at the end of the keys; a few keys get
    a bump so that heavy hitters exist, one of them among the newest (which a rule must not count twice)."""
    scores = draw.randn(B, H, T, S, scale=1.5)
    scores[..., torch.tensor(draw.permutation(S)[: max(1, S // 6)])] += 2.0
    scores[..., S - 1 - draw.int(0, 1)] += 5.0
    allowed = torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)


@checker(
    "5.6",
    title="H2O's keep rule",
    points=2,
    task="H2O's keep rule",
    fallback="course_lib.sparse:h2o_keep",
)
def check_h2o_keep(draw: Draw):
    """``fn(attention_weights, budget, recent=None)``: the sorted int64 indices ``(B, H, min(budget, S))``
    H2O keeps per head from prefill weights ``(B, H, T, S)``: the ``recent`` newest keys (default
    ``budget // 2``) plus the ``budget - recent`` older keys that received the most attention, summed over
    the queries; every key when the budget covers the cache."""
    for name, B, H, T, S, budget, recent in [
        (
            "a prefill, the default recent = budget // 2",
            draw.int(1, 2),
            draw.int(2, 3),
            (n := draw.int(14, 30)),
            n,
            2 * draw.int(3, 5),
            None,
        ),
        ("an odd budget", 1, draw.int(2, 3), (m := draw.int(14, 30)), m, 2 * draw.int(2, 4) + 1, None),
        ("recent = 0: heavy hitters only", 1, 2, (a := draw.int(12, 24)), a, draw.int(4, 7), 0),
        (
            "recent = budget: the newest entries only",
            1,
            2,
            (b := draw.int(12, 24)),
            b,
            (r := draw.int(4, 7)),
            r,
        ),
        (
            "a few decoding steps' weights over a longer cache: T < S",
            2,
            2,
            draw.int(3, 6),
            draw.int(20, 40),
            draw.int(6, 10),
            None,
        ),
        ("the budget covers the cache", 1, 2, (c := draw.int(5, 9)), c, c + draw.int(1, 3), None),
    ]:
        weights = _attention_weights(draw, B, H, T, S)
        kwargs = {} if recent is None else {"recent": recent}
        variants = {
            "the keys scored by the largest weight they received (max), not the sum": (
                lambda w=weights, b=budget, r=recent: _h2o(w, b, r, score="max")
            ),
            "the keys scored by their mean weight over the queries that see them, not the sum": (
                lambda w=weights, b=budget, r=recent: _h2o(w, b, r, score="mean")
            ),
            "the heavy hitters chosen among all keys, the recent ones included (kept twice)": (
                lambda w=weights, b=budget, r=recent: _h2o(w, b, r, heavy_from_all=True)
            ),
            "one choice for every head (the weights summed over the heads too)": (
                lambda w=weights, b=budget, r=recent: _h2o(w, b, r, shared=True)
            ),
        }
        if recent is None and budget % 2:
            variants["recent = budget - budget // 2 (rounded up, not budget // 2)"] = (
                lambda w=weights, b=budget: _h2o(w, b, round_up=True)
            )
        label = f"T={T}, S={S}, budget={budget}, recent={'default' if recent is None else recent}"

        def judge(got, expected, variants=variants, label=label):
            unsorted = None
            if (
                isinstance(got, torch.Tensor)
                and got.shape == expected.shape
                and got.shape[-1] > 1
                and not (got.is_floating_point() or got.dtype == torch.bool)
                and not bool((got[..., 1:] > got[..., :-1]).all())
            ):
                unsorted = (
                    "the indices of each head must be sorted and distinct; the first head's: "
                    f"{got.reshape(-1, got.shape[-1])[0].tolist()}"
                )
            try:
                compare_exact(got, expected, f"kept indices ({label})", variants=variants)
            except Mismatch as mismatch:
                text = str(mismatch)
                if unsorted and "hint: your result equals" not in text:
                    text += "\nhint: " + unsorted
                raise Mismatch(text) from None

        yield Case(
            f"{name}: B={B}, H={H}, {label}",
            (weights, budget),
            kwargs,
            expected=lambda w=weights, b=budget, r=recent: _h2o(w, b, r),
            compare=judge,
            inputs=["attention_weights", "budget"],
        )


# --- 5.7: MoBA's routing mask ---------------------------------------------------------------------------


def _moba(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    top_k: int,
    *,
    force_own: bool = True,
    exclude_future: bool = True,
    causal_inside: bool = True,
    extra: int = 0,
) -> torch.Tensor:
    """MoBA's (B, H, T, T) mask from the definition (T = S); the misconceptions through the keywords."""
    B, H, T, D = q.shape
    blocks = -(-T // block_size)
    means = torch.stack(
        [k[:, :, j * block_size : (j + 1) * block_size].mean(dim=2) for j in range(blocks)], dim=2
    )
    gate = q @ means.transpose(-1, -2)  # (B, H, T, blocks)
    own = (torch.arange(T) // block_size)[:, None]
    index = torch.arange(blocks)[None, :]
    eligible = index <= own if exclude_future else torch.ones(T, blocks, dtype=torch.bool)
    ranking = gate.masked_fill(~eligible, float("-inf"))
    if force_own:
        ranking = ranking.masked_fill(index == own, float("inf"))
    order = torch.sort(ranking, dim=-1, descending=True, stable=True).indices[..., : top_k + extra]
    chosen = torch.zeros_like(gate, dtype=torch.bool).scatter(-1, order, True) & eligible
    mask = chosen.repeat_interleave(block_size, dim=-1)[..., :T]
    if causal_inside:
        mask = mask & torch.ones(T, T, dtype=torch.bool).tril()
    return mask


@checker(
    "5.7",
    title="MoBA's routing mask",
    points=2,
    task="MoBA's routing",
    fallback="course_lib.sparse:moba_mask",
)
def check_moba_mask(draw: Draw):
    """``fn(q, k, block_size, top_k)``: the bool ``(B, H, T, T)`` mask of the keys each query attends to
    under MoBA (causal self-attention, T = S): keys cut into blocks of ``block_size`` (the last one may
    be shorter), a block's gate score is ``q . mean(its keys)``; each query takes its ``top_k`` best
    blocks, its own block always among them, never a block that starts after it; causal inside."""
    for name, B, H, T, block_size, top_k, D in [
        (
            "T a multiple of the block",
            1,
            2,
            (b := draw.int(3, 5)) * draw.int(4, 6),
            b,
            draw.int(2, 3),
            draw.int(4, 8),
        ),
        (
            "T not a multiple of the block: the last block is shorter",
            draw.int(1, 2),
            2,
            draw.not_multiple(13, 30, (c := draw.int(3, 5))),
            c,
            draw.int(2, 3),
            5,
        ),
        ("top_k = 1: the own block only", 1, 2, draw.int(10, 20), draw.int(3, 4), 1, 4),
        (
            "top_k at least the number of blocks: causal attention",
            1,
            1,
            (t := draw.int(8, 14)),
            4,
            -(-t // 4) + 1,
            4,
        ),
        ("blocks of one key", 1, 2, draw.int(6, 10), 1, draw.int(2, 4), 3),
        ("one query: T = 1", 1, 2, 1, draw.int(2, 4), draw.int(1, 3), 4),
    ]:
        q, k = draw.randn(B, H, T, D), draw.randn(B, H, T, D)
        variants = {
            "top_k blocks chosen by score with the own block not forced": (
                lambda q=q, k=k, b=block_size, n=top_k: _moba(q, k, b, n, force_own=False)
            ),
            "later blocks allowed to compete for the top_k slots (the causal mask then empties them)": (
                lambda q=q, k=k, b=block_size, n=top_k: _moba(q, k, b, n, exclude_future=False)
            ),
            "later blocks chosen and attended (no causal rule at all)": (
                lambda q=q, k=k, b=block_size, n=top_k: _moba(
                    q, k, b, n, exclude_future=False, causal_inside=False
                )
            ),
            "no causal mask inside the own block (a query sees the later keys of its block)": (
                lambda q=q, k=k, b=block_size, n=top_k: _moba(q, k, b, n, causal_inside=False)
            ),
            "the own block added on top of the top_k best (top_k + 1 blocks)": (
                lambda q=q, k=k, b=block_size, n=top_k: _moba(q, k, b, n, extra=1)
            ),
        }
        label = f"T={T}, block_size={block_size}, top_k={top_k}"

        def judge(got, expected, variants=variants, label=label):
            compare_exact(got, expected, f"mask ({label})", variants=variants)

        yield Case(
            f"{name}: B={B}, H={H}, {label}, D={D}",
            (q, k),
            {"block_size": block_size, "top_k": top_k},
            expected=lambda q=q, k=k, b=block_size, n=top_k: _moba(q, k, b, n),
            compare=judge,
            inputs=["q", "k"],
        )


# --- 5.8: divided space-time attention, the time step -----------------------------------------------------


def _over_time(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: str = "patch", scale=None):
    """Dense attention over the flattened F * N tokens with a same-patch (or same-frame) mask."""
    B, H, frames, N, D = q.shape
    token = torch.arange(frames * N)
    if mask == "patch":
        allowed = (token[:, None] % N) == (token[None, :] % N)
    else:
        allowed = (token[:, None] // N) == (token[None, :] // N)
    scale = D**-0.5 if scale is None else scale
    flat = [x.reshape(B, H, frames * N, x.shape[-1]) for x in (q, k, v)]
    scores = (flat[0] @ flat[1].transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, -1) @ flat[2]).view(B, H, frames, N, v.shape[-1])


def _no_transpose(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The reshape to (B, H * N, F, D) without moving the frame axis: rows are F consecutive tokens."""
    B, H, frames, N, D = q.shape
    q2, k2, v2 = (x.reshape(B, H * N, frames, x.shape[-1]) for x in (q, k, v))
    out = torch.softmax(q2 @ k2.transpose(-1, -2) * D**-0.5, -1) @ v2
    return out.reshape(B, H, frames, N, v.shape[-1])


@checker(
    "5.8",
    title="attention over time",
    points=1,
    task="attention over time",
    fallback="course_lib.sparse:time_attention",
)
def check_time_attention(draw: Draw):
    """``fn(q, k, v)``: TimeSformer's time step. q, k ``(B, H, F, N, D)``, v ``(B, H, F, N, D_v)`` for F
    frames of N patches; each patch attends to the same patch in every frame (F keys, no mask, scale
    ``1/sqrt(D)``). Returns ``(B, H, F, N, D_v)``, without building a ``(F*N, F*N)`` score matrix."""
    for name, B, H, frames, N, D, D_v in [
        ("a few frames of a few patches, F != N", draw.int(1, 2), 2, draw.int(3, 5), draw.int(6, 9), 4, 3),
        ("one frame: each patch sees only itself", 1, 2, 1, draw.int(4, 7), 4, 2),
        ("one patch per frame", 2, 1, draw.int(3, 6), 1, 3, 3),
        ("more frames than patches", 1, 2, draw.int(7, 9), draw.int(2, 4), 5, 4),
        ("8 frames of 64 patches: no (F*N) x (F*N) scores", 1, 2, 8, 64, 8, 8),
    ]:
        q, k, v = (
            draw.randn(B, H, frames, N, D),
            draw.randn(B, H, frames, N, D),
            draw.randn(B, H, frames, N, D_v),
        )
        variants = {
            "the reshape to (B, H*N, F, D) without the transpose (a 'patch' is then F consecutive tokens)": (
                lambda q=q, k=k, v=v: _no_transpose(q, k, v)
            ),
            "attention over the patches of each frame (space, not time)": (
                lambda q=q, k=k, v=v: _over_time(q, k, v, mask="frame")
            ),
            "attention without the 1/sqrt(D) scale": lambda q=q, k=k, v=v: _over_time(q, k, v, scale=1.0),
        }
        label = f"F={frames}, N={N}"
        large = frames * N >= 256

        def judge(got, expected, variants=variants, label=label, large=large, shapes=(B, H, frames * N)):
            compare(got, expected, f"output ({label})", atol=1e-10, rtol=1e-9, variants=variants)
            if large:
                B_, H_, tokens = shapes
                full = B_ * H_ * tokens * tokens
                work = last_work()
                if work.largest > full // 4:
                    raise Mismatch(
                        f"{label}: right values, but your function built a tensor of {work.largest:,} "
                        f"entries, {work.largest / full:.0%} of the {full:,} scores of full attention over "
                        "the F*N tokens: attention over time needs only F x F scores per patch "
                        "(move the patch axis next to the heads and attend over the frames)"
                    )

        yield Case(
            f"{name}: B={B}, H={H}, {label}, D={D}, D_v={D_v}",
            (q, k, v),
            expected=lambda q=q, k=k, v=v: _over_time(q, k, v),
            compare=judge,
            inputs=["q", "k", "v"],
        )


# --- predict and explain ------------------------------------------------------------------------------

declare("5.9", kind="predict", title="NSA's share of a causal kernel's key blocks at T = 8192")
declare("5.10", kind="explain", title="why the window alone keeps up with NSA and MoBA here", points=2)
declare("5.11", kind="predict", title="which eviction policy loses least")
