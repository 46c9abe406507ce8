"""Checkers for notebook 03: merging softmax statistics, one masked FA2 tile update, combining split-KV
partials, counting the tiles causal attention skips, the FA2 forward pass with causal tile skipping and
the logsumexp, and the backward pass of one tile; and the chapter's predict and explain exercises.

Expected values are computed from their definitions on whole rows (dense softmax, logsumexp), not from
the library's tiled code.
"""

from __future__ import annotations

import torch

from .common import Case, Draw, Mismatch, checker, compare, compare_number, declare

__all__ = [
    "check_merge_softmax_stats",
    "check_fa2_step",
    "check_combine_partials",
    "check_causal_skips",
    "check_flash_forward",
    "check_tile_backward",
]

NEG_INF = float("-inf")


def _stats(x: torch.Tensor, allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, sum of exp(x - max)) of each row from the definition; a row with nothing gives (-inf, 0)."""
    if allowed is not None:
        x = x.masked_fill(~allowed, NEG_INF)
    if x.shape[-1] == 0:
        return torch.full(x.shape[:-1], NEG_INF, dtype=x.dtype), torch.zeros(x.shape[:-1], dtype=x.dtype)
    row_max = x.amax(-1)
    safe = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    return row_max, torch.exp(x - safe.unsqueeze(-1)).sum(-1)


def _tuple(got: object, count: int, names: str) -> tuple:
    if not isinstance(got, (tuple, list)) or len(got) != count:
        raise Mismatch(f"expected a tuple {names} of {count} tensors, got {type(got).__name__}")
    return tuple(got)


@checker("3.1", title="merging two softmax pieces", points=1, task="the softmax merge")
def check_merge_softmax_stats(draw: Draw):
    """``fn(m_a, l_a, m_b, l_b) -> (m, l)``: the max and the sum of ``exp(x - m)`` over two pieces of each
    row, from each piece's max ``m_x`` and sum ``l_x``; an empty piece has ``m = -inf, l = 0``."""
    for name, rows, n_a, n_b, spread, offset, empty in [
        ("pieces of random sizes", draw.int(2, 6), draw.int(1, 6), draw.int(1, 6), 1.0, 0.0, None),
        ("a single entry in each piece", draw.int(1, 4), 1, 1, 1.0, 0.0, None),
        (
            "scores around +800 (exp overflows without the max)",
            draw.int(2, 5),
            draw.int(2, 5),
            draw.int(2, 5),
            30.0,
            800.0,
            None,
        ),
        (
            "scores around -800 (exp underflows to 0 without the max)",
            draw.int(2, 5),
            draw.int(2, 5),
            draw.int(2, 5),
            30.0,
            -800.0,
            None,
        ),
        ("the first piece empty in some rows", 5, draw.int(2, 4), draw.int(2, 4), 1.0, 0.0, "a"),
        ("both pieces empty in some rows", 5, draw.int(2, 4), draw.int(2, 4), 1.0, 0.0, "both"),
    ]:
        x = offset + draw.randn(rows, n_a + n_b, scale=spread)
        allowed = torch.ones_like(x, dtype=torch.bool)
        if empty == "a":
            allowed[::2, :n_a] = False
        elif empty == "both":
            allowed[1::2, :] = False
            allowed[0, :n_a] = False
        stats_a = _stats(x[:, :n_a], allowed[:, :n_a])
        stats_b = _stats(x[:, n_a:], allowed[:, n_a:])
        both_empty = ~allowed.any(-1)
        a_empty, b_empty = ~allowed[:, :n_a].any(-1), ~allowed[:, n_a:].any(-1)
        regions = {
            "in rows where both pieces are empty (both maxima -inf)": both_empty,
            "in rows where one piece is empty": (a_empty | b_empty) & ~both_empty,
            "in rows whose scores are far from 0": x.abs().amax(-1) > 700,
        }
        advice = {
            list(regions)[0]: "-inf - (-inf) is NaN: when the merged max is -inf the merged sum is 0",
            list(regions)[1]: "exp(-inf - m) is 0 for an empty piece, as long as m is finite",
            list(regions)[
                2
            ]: "rescale each sum by exp(m_x - m) with the merged max m; never exp a score alone",
        }

        def judge(got, expected, regions=regions, advice=advice, stats_a=stats_a, stats_b=stats_b):
            m, l = _tuple(got, 2, "(m, l)")
            compare(m, expected[0], "merged max m", atol=1e-12, rtol=1e-12, regions=regions, advice=advice)
            compare(
                l,
                expected[1],
                "merged sum l",
                atol=1e-10,
                rtol=1e-9,
                regions=regions,
                advice=advice,
                variants={"l_a + l_b, not rescaled to the merged max": lambda: stats_a[1] + stats_b[1]},
            )

        yield Case(
            f"{name}: {rows} rows, pieces of {n_a} and {n_b}",
            (*stats_a, *stats_b),
            expected=lambda x=x, allowed=allowed: _stats(x, allowed),
            compare=judge,
            inputs=["m_a", "l_a", "m_b", "l_b"],
        )


@checker("3.2", title="one masked FA2 tile update", points=2, task="the FA2 step")
def check_fa2_step(draw: Draw):
    """``fn(q_block, k_block, v_block, row_max, row_sum, acc, allowed) -> (row_max, row_sum, acc)``: one FA2
    inner step. ``q_block`` is already scaled; ``allowed`` (B_r, B_c) says which keys of this tile each query
    may see (all of them when None); the state describes the keys seen so far (``row_max``: their max score,
    ``row_sum``: sum of ``exp(s - row_max)``, ``acc``: unnormalised ``sum exp(s - row_max) v``), and
    ``(-inf, 0, 0)`` for a row that has seen no key yet. After the step it describes both blocks."""
    for name, rows, seen, new, D, spread, mask_kind in [
        ("a middle tile, no mask", draw.int(2, 6), draw.int(2, 7), draw.int(2, 7), draw.int(2, 6), 1.0, None),
        ("the first tile (state -inf, 0, 0)", draw.int(2, 5), 0, draw.int(2, 6), draw.int(2, 5), 1.0, None),
        (
            "a causal tile on the diagonal",
            (n := draw.int(3, 6)),
            draw.int(2, 5),
            n,
            draw.int(2, 5),
            1.0,
            "causal",
        ),
        (
            "the first tile, causal with more queries than keys: some rows see nothing yet",
            draw.int(4, 6),
            0,
            draw.int(2, 3),
            draw.int(2, 4),
            1.0,
            "late",
        ),
        ("large scores (up to ~800)", draw.int(2, 4), draw.int(2, 5), draw.int(2, 5), 4, 14.0, None),
        (
            "a new block whose scores are far below the running max",
            draw.int(2, 4),
            draw.int(2, 4),
            draw.int(2, 4),
            4,
            1.0,
            "low",
        ),
    ]:
        q = draw.randn(rows, D, scale=spread)
        k = draw.randn(seen + new, D, scale=spread)
        v = draw.randn(seen + new, D + 1)
        allowed_all = torch.ones(rows, seen + new, dtype=torch.bool)
        if mask_kind == "causal":  # the tile's queries are the last `rows` positions up to key seen + new
            allowed_all = torch.arange(seen + new)[None, :] <= torch.arange(rows)[:, None] + seen
        elif mask_kind == "late":
            allowed_all = torch.arange(seen + new)[None, :] <= torch.arange(rows)[:, None] + (
                seen + new - rows
            )
        if mask_kind == "low":
            k[seen:] = -k[seen:]
            q = q.abs()
            k[:seen] = k[:seen].abs() * 6
        scores = q @ k.T

        def state(count, scores=scores, v=v, allowed_all=allowed_all, rows=rows):
            row_max, row_sum = _stats(scores[:, :count], allowed_all[:, :count])
            safe = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
            weights = torch.exp(scores[:, :count] - safe[:, None]).masked_fill(~allowed_all[:, :count], 0.0)
            return row_max, row_sum, weights @ v[:count]

        before = state(seen)
        allowed = None if mask_kind in (None, "low") else allowed_all[:, seen:]
        nothing = ~allowed_all.any(-1)
        regions = {
            "in rows that have seen no allowed key yet": nothing,
            "in rows whose scores exceed 700": scores.abs().amax(-1) > 700,
            "in rows with masked keys in this tile": ~allowed_all[:, seen:].all(-1) & ~nothing,
        }
        advice = {
            list(regions)[0]: "their state must stay (-inf, 0, 0): exp(-inf - (-inf)) is NaN, so guard the "
            "rescaling factor where the new max is -inf",
            list(regions)[1]: "subtract the new running max before exp",
            list(regions)[2]: "masked scores must become -inf before the max and the exp",
        }

        def judge(
            got,
            expected,
            regions=regions,
            advice=advice,
            before=before,
            scores=scores,
            seen=seen,
            allowed_all=allowed_all,
        ):
            m, l, acc = _tuple(got, 3, "(row_max, row_sum, acc)")
            compare(m, expected[0], "row_max", atol=1e-12, rtol=1e-12, regions=regions, advice=advice)
            new_max = torch.where(torch.isfinite(expected[0]), expected[0], 0.0)
            new_part = torch.exp(scores[:, seen:] - new_max[:, None]).masked_fill(~allowed_all[:, seen:], 0.0)
            compare(
                l,
                expected[1],
                "row_sum",
                atol=1e-10,
                rtol=1e-9,
                regions=regions,
                advice=advice,
                variants={
                    "the old row_sum not rescaled by exp(old max - new max)": lambda: (
                        before[1] + new_part.sum(-1)
                    )
                },
            )
            compare(acc, expected[2], "acc", atol=1e-10, rtol=1e-9, regions=regions, advice=advice)

        yield Case(
            f"{name}: B_r={rows}, {seen} keys seen, {new} new, D={D}",
            (q, k[seen:], v[seen:], *before),
            {"allowed": allowed},
            expected=lambda state=state, n=seen + new: state(n),
            compare=judge,
            inputs=["q_block", "k_block", "v_block", "row_max", "row_sum", "acc"],
        )


@checker(
    "3.3",
    title="combining split-KV partials",
    points=2,
    task="the split-KV combine",
    fallback="course_lib.tiling:combine_partials",
)
def check_combine_partials(draw: Draw):
    """``fn(outputs, lses) -> (o, lse)``: combine attention over disjoint key splits. ``outputs[c]``
    ``(B, H, T, D_v)`` is split c's normalised output and ``lses[c]`` ``(B, H, T)`` its logsumexp
    (``-inf`` with zeros for a query that sees no key of the split). Must equal attention over all keys,
    with zeros and ``-inf`` for a query that sees no key at all."""
    for name, T, S, splits, spread, causal_offset in [
        ("decoding: one query, splits of uneven size", 1, draw.int(20, 70), draw.int(2, 5), 1.0, None),
        ("several queries, two splits", draw.int(2, 5), draw.int(6, 14), 2, 1.0, None),
        ("one key per split", draw.int(1, 3), (s := draw.int(3, 7)), s, 1.0, None),
        (
            "logsumexps around +-800 (exp overflows without the max)",
            draw.int(1, 3),
            draw.int(6, 12),
            draw.int(2, 4),
            3.0,
            None,
        ),
        (
            "causal with T > S: the first queries see no key in any split",
            draw.int(6, 9),
            draw.int(3, 5),
            draw.int(2, 3),
            1.0,
            "causal",
        ),
    ]:
        D_v = draw.choice([3, 5])
        scores = draw.randn(1, 2, T, S, scale=spread)
        if spread > 1:  # one head's scores near +800, the other's near -800
            scores = scores + torch.tensor([800.0, -800.0], dtype=scores.dtype)[None, :, None, None]
        v = draw.randn(1, 2, S, D_v)
        allowed = torch.ones(T, S, dtype=torch.bool)
        if causal_offset:
            allowed = torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)
        masked = scores.masked_fill(~allowed, NEG_INF)
        cuts = sorted(draw.permutation(S - 1)[: splits - 1]) if splits > 1 else []
        bounds = [0] + [c + 1 for c in cuts] + [S]
        outputs, lses = [], []
        for start, end in zip(bounds[:-1], bounds[1:]):
            piece = masked[..., start:end]
            lse = torch.logsumexp(piece, -1)
            weights = torch.exp(piece - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
            outputs.append(weights.nan_to_num(0.0) @ v[:, :, start:end])
            lses.append(lse)
        total = torch.logsumexp(masked, -1)
        expected_o = (
            torch.exp(masked - torch.where(torch.isfinite(total), total, 0.0)[..., None]).nan_to_num(0.0) @ v
        )
        nothing = ~allowed.any(-1).expand(1, 2, T)
        regions = {
            "in queries that see no key at all": nothing,
            "in queries whose logsumexp exceeds 700 in size": torch.isfinite(total) & (total.abs() > 700),
        }
        advice = {
            list(regions)[0]: "every split's lse is -inf there: the output is 0 and the lse -inf, not NaN",
            list(regions)[
                1
            ]: "weigh split c by exp(lse_c - lse) with the total lse; exp(lse_c) alone overflows",
        }

        def judge(got, expected, regions=regions, advice=advice, outputs=outputs):
            o, lse = _tuple(got, 2, "(o, lse)")
            compare(
                o,
                expected[0],
                "combined output",
                atol=1e-10,
                rtol=1e-9,
                regions=regions,
                advice=advice,
                variants={"the plain mean of the split outputs": lambda: torch.stack(outputs).mean(0)},
            )
            compare(
                lse,
                expected[1],
                "combined logsumexp",
                atol=1e-10,
                rtol=1e-10,
                regions={k: v[..., 0] if v.dim() == 4 else v for k, v in regions.items()},
                advice=advice,
            )

        yield Case(
            f"{name}: T={T}, S={S}, {splits} splits",
            (outputs, lses),
            expected=(expected_o, total),
            compare=judge,
            inputs=["outputs", "lses"],
        )


def _skipped(T: int, S: int, block_q: int, block_k: int, *, offset: int | None = None) -> int:
    """Tiles with no (query, key) pair allowed by the causal mask, counted pair by pair."""
    offset = S - T if offset is None else offset
    allowed = torch.arange(S)[None, :] <= torch.arange(T)[:, None] + offset
    return sum(
        not bool(allowed[q0 : q0 + block_q, k0 : k0 + block_k].any())
        for q0 in range(0, T, block_q)
        for k0 in range(0, S, block_k)
    )


@checker("3.4", title="counting skipped tiles", points=1, task="the count of skipped tiles")
def check_causal_skips(draw: Draw):
    """``fn(T, S, block_q, block_k)``: how many (Q block, K block) tiles causal attention skips because no
    query in the tile may see any key in it (query i sees keys j <= i + S - T)."""
    for name, T, S, block_q, block_k in [
        ("T = S, equal blocks that divide T", 1024, 1024, 64, 64),
        ("T = S, blocks that do not divide T", (n := draw.not_multiple(20, 90, 8)), n, 8, 8),
        ("different block sizes", (m := draw.int(30, 90)), m, draw.choice([4, 8]), draw.choice([3, 5, 16])),
        (
            "T < S (a chunk after a cached prefix)",
            draw.int(8, 30),
            draw.int(31, 70),
            draw.choice([4, 8]),
            draw.choice([4, 8]),
        ),
        (
            "T > S: the first queries see nothing",
            draw.int(40, 70),
            draw.int(10, 30),
            draw.choice([4, 8]),
            draw.choice([4, 6]),
        ),
        ("one block larger than the sequence", (t := draw.int(5, 60)), t, 128, 128),
    ]:
        expected = _skipped(T, S, block_q, block_k)
        n_q, n_k = -(-T // block_q), -(-S // block_k)
        variants = {
            "the number of tiles computed (not skipped)": n_q * n_k - expected,
            "the count with the diagonal aligned to the start (S - T ignored)": _skipped(
                T, S, block_q, block_k, offset=0
            ),
            "n(n-1)/2 with n = ceil(T / block_q), which holds only for T = S and equal blocks": n_q
            * (n_q - 1)
            // 2,
            "the tiles strictly above the diagonal of a square grid (n_q * n_k - ...)": n_q * n_k
            - n_q * (n_q + 1) // 2,
        }

        def judge(got, expected, variants=variants, T=T, S=S):
            if isinstance(got, bool) or not isinstance(got, (int, torch.Tensor)):
                raise Mismatch(f"return the count as an int, got {got!r}")
            compare_number(
                got,
                expected,
                f"skipped tiles for T={T}, S={S}",
                integer=True,
                variants={k: v for k, v in variants.items() if v != expected},
            )

        yield Case(
            f"{name}: T={T}, S={S}, blocks {block_q}x{block_k}",
            (T, S, block_q, block_k),
            expected=expected,
            compare=judge,
            inputs=["T", "S", "block_q", "block_k"],
        )


# --- predict and explain ---------------------------------------------------------------------------

declare("3.5", kind="predict", title="tiling vs standard attention at 16 KiB of SRAM")
declare("3.6", kind="predict", title="tiles causal attention skips at T = 1024, blocks of 128")
declare("3.9", kind="explain", title="why the backward pass recomputes P", points=2)


# --- 3.7: the FA2 forward pass with causal tile skipping and the logsumexp ---------------------------

SOFTMAX_SHORTCUTS = ("softmax", "log_softmax", "_softmax", "_log_softmax", "_safe_softmax", "logsumexp")


def _dense_attention(q, k, v, allowed, scale):
    """Attention and logsumexp from the definition, on whole rows: zeros and -inf for a row with no key."""
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, NEG_INF)
    lse = torch.logsumexp(scores, -1)
    weights = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return weights @ v, lse


def _causal_allowed(T: int, S: int, offset: int | None = None) -> torch.Tensor:
    offset = S - T if offset is None else offset
    return torch.arange(S)[None, :] <= torch.arange(T)[:, None] + offset


def _fa2_tiles(T: int, S: int, block_q: int, block_k: int, causal: bool, offset: int | None = None):
    """The (Q block, K block) tiles FA2 computes, in its order: Q blocks outside, K blocks inside,
    a K block skipped when its first key comes after the Q block's last query."""
    offset = S - T if offset is None else offset
    tiles = []
    for i, q_start in enumerate(range(0, T, block_q)):
        last_query = min(q_start + block_q, T) - 1
        for j, k_start in enumerate(range(0, S, block_k)):
            if causal and k_start > last_query + offset:
                break
            tiles.append((i, j))
    return tiles


def _tile_list(got: object) -> list[tuple[int, int]]:
    if isinstance(got, torch.Tensor):
        got = got.tolist()
    if not isinstance(got, (list, tuple)):
        raise Mismatch(f"tiles: expected a list of (q_block, k_block) pairs, got {type(got).__name__}")
    pairs = []
    for item in got:
        if isinstance(item, torch.Tensor):
            item = item.tolist()
        if (
            not isinstance(item, (list, tuple))
            or len(item) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)
        ):
            raise Mismatch(f"tiles: each item must be a (q_block, k_block) pair of ints, got {item!r}")
        pairs.append((int(item[0]), int(item[1])))
    return pairs


def _compare_tiles(got: list, expected: list, T: int, S: int, block_q: int, block_k: int, causal: bool):
    if got == expected:
        return
    lines = [f"tiles: you computed {len(got)} tiles, FA2 computes {len(expected)}"]
    if len(got) == len(expected):
        lines = [
            f"tiles: {len(got)} tiles as expected, but not the same list (first expected {expected[:4]}...)"
        ]
    extra, missing = sorted(set(got) - set(expected)), sorted(set(expected) - set(got))
    if set(got) == set(expected) and len(got) == len(expected):
        lines.append(
            "hint: the right tiles in another order: FA2 walks the K/V blocks inside each Q block (Q blocks "
            "outside, as in section 2); K blocks outside is FA1's order"
        )
    elif causal and got == _fa2_tiles(T, S, block_q, block_k, True, offset=0):
        lines.append(
            "hint: these are the tiles of the diagonal aligned to the start: query i sees keys j <= i + S - T"
        )
    elif extra and not missing and causal:
        lines.append(
            f"hint: {len(extra)} of your tiles (e.g. {extra[:3]}) lie entirely above the causal diagonal: no "
            "query of the Q block sees any key of the K block. Skip them without computing their scores: "
            "once a K block starts after the Q block's last query (k_start > q_end - 1 + S - T), all later "
            "ones do too"
        )
    elif missing and not extra:
        lines.append(
            f"hint: you left out {len(missing)} tiles that some query sees (e.g. {missing[:3]}); only a tile "
            "whose first key comes after its last query may be skipped"
        )
    elif len(set(got)) != len(got):
        lines.append("hint: some tiles appear twice: record each tile once, when you compute its scores")
    raise Mismatch("\n".join(lines))


@checker(
    "3.7",
    title="the FA2 forward pass with causal tile skipping and the logsumexp",
    points=2,
    task="the FlashAttention forward pass",
    forbid=SOFTMAX_SHORTCUTS,
)
def check_flash_forward(draw: Draw):
    """``fn(q, k, v, causal=False, block_q=16, block_k=16) -> (out, lse, tiles)`` for q ``(B, H, T, D)``,
    k ``(B, H, S, D)``, v ``(B, H, S, D_v)``, scale ``D ** -0.5``: attention ``(B, H, T, D_v)``, its
    logsumexp ``(B, H, T)`` (zeros and ``-inf`` for a query that sees no key) and the list of
    ``(q_block, k_block)`` tiles whose scores were computed, in FA2's order. Causal: query i sees keys
    ``j <= i + S - T``; tiles above the diagonal are skipped. Never holds a ``T x S`` tensor."""
    bq, bk = draw.choice([8, 16]), draw.choice([8, 16])
    cases = [
        (
            "no mask, T != S, lengths that are not multiples of the blocks",
            draw.not_multiple(20, 45, 8),
            draw.not_multiple(30, 60, 8),
            False,
            bq,
            bk,
            1.0,
        ),
        ("causal, T = S", (n := draw.not_multiple(50, 80, 16)), n, True, bq, bq, 1.0),
        ("causal, blocks of different sizes", (n := draw.int(50, 80)), n, True, 8, 16, 1.0),
        (
            "causal, T < S (a chunk after a cached prefix)",
            draw.int(20, 40),
            draw.int(60, 90),
            True,
            bq,
            bk,
            1.0,
        ),
        (
            "causal, T > S: the first queries see no key",
            draw.int(50, 70),
            draw.int(20, 35),
            True,
            draw.choice([4, 8]),
            bk,
            1.0,
        ),
        ("decoding: one query, causal", 1, draw.int(40, 90), True, 16, bk, 1.0),
        ("causal, scores up to ~1000", (n := draw.int(40, 60)), n, True, bq, bk, 16.0),
        ("blocks larger than the sequence", (n := draw.int(5, 15)), n + draw.int(0, 5), True, 32, 32, 1.0),
    ]
    for name, T, S, causal, block_q, block_k, spread in cases:
        B, H = draw.int(1, 2), draw.int(1, 3)
        D, D_v = draw.choice([4, 8]), draw.choice([3, 5, 8])
        q = draw.randn(B, H, T, D, scale=spread)
        k = draw.randn(B, H, S, D, scale=spread)
        v = draw.randn(B, H, S, D_v)
        scale = D**-0.5
        allowed = _causal_allowed(T, S) if causal else torch.ones(T, S, dtype=torch.bool)
        tiles = _fa2_tiles(T, S, block_q, block_k, causal)
        nothing = (~allowed.any(-1)).expand(B, H, T)
        scores_max = (q @ k.transpose(-1, -2) * scale).abs().amax(-1)
        regions = {
            "in queries that see no key at all": nothing,
            "in queries whose scores exceed 700 in size": (scores_max > 700) & ~nothing,
        }
        advice = {
            list(regions)[0]: "their running max stays -inf: guard exp(m - m_new) and the final division "
            "(l = 0): the output is 0 and the logsumexp -inf, not NaN",
            list(regions)[1]: "subtract the running max before exp; keep the logsumexp as m + log(l)",
        }
        variants = {
            "attention without the 1/sqrt(D) scale": lambda q=q, k=k, v=v, allowed=allowed: _dense_attention(
                q, k, v, allowed, 1.0
            )[0],
        }
        if causal and T != S:
            variants["attention with the causal diagonal aligned to the start (S - T ignored)"] = (
                lambda q=q, k=k, v=v, T=T, S=S, s=scale: _dense_attention(
                    q, k, v, _causal_allowed(T, S, 0), s
                )[0]
            )
        limit = max(q.numel(), k.numel(), v.numel(), B * H * T * D_v, B * H * block_q * max(block_k, D, D_v))

        def judge(
            got,
            expected,
            regions=regions,
            advice=advice,
            variants=variants,
            T=T,
            S=S,
            block_q=block_q,
            block_k=block_k,
            causal=causal,
        ):
            out, lse, visited = _tuple(got, 3, "(out, lse, tiles)")
            _compare_tiles(_tile_list(visited), expected[3], T, S, block_q, block_k, causal)
            compare(
                out,
                expected[0],
                "out",
                atol=1e-10,
                rtol=1e-9,
                regions=regions,
                advice=advice,
                variants=variants,
            )
            compare(
                lse,
                expected[1],
                "lse",
                atol=1e-10,
                rtol=1e-10,
                regions=regions,
                advice=advice,
                variants={"the running max alone (m, without log(l))": lambda: expected[2]},
            )

        def expected(q=q, k=k, v=v, allowed=allowed, scale=scale, tiles=tiles):
            out, lse = _dense_attention(q, k, v, allowed, scale)
            running_max = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, NEG_INF).amax(-1)
            return out, lse, running_max, tiles

        yield Case(
            f"{name}: T={T}, S={S}, blocks {block_q}x{block_k}",
            (q, k, v),
            {"causal": causal, "block_q": block_q, "block_k": block_k},
            expected=expected,
            compare=judge,
            inputs=["q", "k", "v"],
            max_elements=limit,
            too_large="FlashAttention never holds a head's T x S scores (or a T x S mask): compute each "
            "tile's scores, and its mask, from the tile's own rows and columns",
        )


# --- 3.8: the backward pass of one tile --------------------------------------------------------------

GRADIENT_SHORTCUTS = ("grad", "backward", "vjp", "jacobian", "jacrev", "jvp")


def _tile_gradients_reference(q, k, v, grad_out, allowed, scale, rows, cols):
    """One tile's share of dQ, dK, dV, from autograd of dense attention with respect to the scores."""
    scores = (q @ k.T * scale).masked_fill(~allowed, NEG_INF).requires_grad_()
    with torch.enable_grad():
        lse = torch.logsumexp(scores, -1)
        weights = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[:, None]).nan_to_num(0.0)
        (grad_scores,) = torch.autograd.grad(weights @ v, scores, grad_out)
    grad_scores = grad_scores.nan_to_num(0.0)[rows, cols]
    weights = weights.detach()[rows, cols]
    return scale * grad_scores @ k[cols], scale * grad_scores.T @ q[rows], weights.T @ grad_out[rows]


@checker(
    "3.8",
    title="the backward pass of one tile",
    points=2,
    task="the tile's gradients",
    forbid=GRADIENT_SHORTCUTS,
)
def check_tile_backward(draw: Draw):
    """``fn(q_i, k_j, v_j, grad_out_i, lse_i, delta_i, scale, allowed=None) -> (dq_i, dk_j, dv_j)``: one
    tile's additions to dQ, dK and dV with P recomputed from the rows' final logsumexp ``lse_i``
    (``-inf`` for a row that sees no key at all) and ``delta_i = rowsum(dO_i * O_i)``. ``allowed``
    ``(B_r, B_c)`` says which keys of the tile each query may see (all when None)."""
    for name, T, S, tile_kind, spread, own_scale, causal in [
        ("a tile inside the rows, no mask", draw.int(12, 20), draw.int(14, 24), "middle", 1, False, False),
        ("a tile on the causal diagonal", (n := draw.int(14, 22)), n, "diagonal", 1, False, True),
        (
            "causal with T > S: rows that see no key (lse = -inf)",
            draw.int(14, 20),
            draw.int(5, 9),
            "first",
            1,
            False,
            True,
        ),
        ("the whole matrix as one tile", draw.int(3, 9), draw.int(3, 9), "all", 1, False, False),
        ("a scale of your own, not D ** -0.5", draw.int(8, 14), draw.int(8, 14), "middle", 1, True, True),
        (
            "scores up to ~1000 (the logsumexp too)",
            draw.int(8, 12),
            draw.int(8, 12),
            "middle",
            20,
            False,
            False,
        ),
        ("one query and one key", draw.int(4, 9), draw.int(4, 9), "single", 1, False, False),
    ]:
        D, D_v = draw.choice([3, 4, 6]), draw.choice([2, 5])
        q, k = draw.randn(T, D, scale=spread), draw.randn(S, D, scale=spread)
        v, grad_out = draw.randn(S, D_v), draw.randn(T, D_v)
        scale = draw.choice([0.37, -0.8, 1.3]) if own_scale else D**-0.5
        allowed = _causal_allowed(T, S) if causal else torch.ones(T, S, dtype=torch.bool)
        if tile_kind == "all":
            r0, r1, c0, c1 = 0, T, 0, S
        elif tile_kind == "single":
            r0, c0 = draw.int(0, T - 1), draw.int(0, S - 1)
            r1, c1 = r0 + 1, c0 + 1
        elif tile_kind == "diagonal":  # rows r0..r1 see keys up to their own position
            r0 = draw.int(3, T - 8)
            r1, c0 = r0 + draw.int(4, 6), r0 - draw.int(0, 2)
            c1 = c0 + draw.int(5, 7)
        elif tile_kind == "first":  # S - T < 0: the first T - S rows see nothing
            r0, r1, c0, c1 = 0, T - S + draw.int(2, 4), 0, S
        else:
            r0 = draw.int(1, T - 6)
            r1 = r0 + draw.int(3, 5)
            c0 = draw.int(1, S - 6)
            c1 = c0 + draw.int(3, 5)
        rows, cols = slice(r0, r1), slice(c0, c1)
        scores = (q @ k.T * scale).masked_fill(~allowed, NEG_INF)
        lse = torch.logsumexp(scores, -1)
        finite_lse = torch.where(torch.isfinite(lse), lse, 0.0)
        out = torch.exp(scores - finite_lse[:, None]) @ v
        delta = (grad_out * out).sum(-1)
        args = (q[rows], k[cols], v[cols], grad_out[rows], lse[rows], delta[rows], scale)
        tile_scores, tile_p = scores[rows, cols], torch.exp(scores[rows, cols] - finite_lse[rows, None])

        def wrong(p, ds_delta=None, args=args, scale=scale):
            """The three gradients from a (wrong) P and, if given, a (wrong) D."""
            q_i, k_j, v_j, do_i, _, delta_i, _ = args
            dp = do_i @ v_j.T
            ds = p * (dp - (delta_i[:, None] if ds_delta is None else ds_delta))
            return scale * ds @ k_j, scale * ds.T @ q_i, p.T @ do_i

        unmasked_p = torch.exp(scale * args[0] @ args[1].T - finite_lse[rows, None])
        wrong_answers = {
            "the gradients with P taken as the softmax of this tile's keys alone (P is exp(s - lse) with the "
            "row's final logsumexp: the row goes on beyond this tile)": wrong(
                torch.softmax(tile_scores, -1).nan_to_num(0.0)
            ),
            "the gradients with D computed from this tile alone (D = rowsum(dO * O) belongs to the whole "
            "row: use delta_i)": wrong(tile_p, (tile_p * (args[3] @ args[2].T)).sum(-1, keepdim=True)),
        }
        if causal:
            wrong_answers["the gradients with allowed ignored (masked keys get weight too)"] = wrong(
                unmasked_p.masked_fill(~allowed[rows].any(-1, keepdim=True), 0.0)
            )
        nothing = ~allowed[rows].any(-1)
        regions = {"in rows that see no key at all (lse = -inf)": nothing}
        advice = {
            list(regions)[
                0
            ]: "exp(s - lse) is exp(-inf - (-inf)) = NaN there: their P must be 0 (put +inf, or "
            "any finite number, in place of their lse)",
        }
        if spread > 1:
            regions["in rows whose scores exceed 700"] = tile_scores.abs().amax(-1) > 700
            advice[list(regions)[1]] = "exp(s) or exp(lse) alone overflows: compute exp(s - lse) in one step"

        def judge(
            got,
            expected,
            regions=regions,
            advice=advice,
            wrong_answers=wrong_answers,
            scale=scale,
        ):
            dq, dk, dv = _tuple(got, 3, "(dq_i, dk_j, dv_j)")
            for index, (what, mine, answer) in enumerate(
                zip(("dq_i", "dk_j", "dv_j"), (dq, dk, dv), expected)
            ):
                variants = {
                    label: (lambda answers=answers, index=index: answers[index])
                    for label, answers in wrong_answers.items()
                }
                compare(
                    mine,
                    answer,
                    what,
                    atol=1e-9,
                    rtol=1e-8,
                    regions=regions if what == "dq_i" else None,
                    advice=advice,
                    variants=variants,
                    factors=None if what == "dv_j" else {"1/scale: the scale is missing": 1 / scale},
                )

        yield Case(
            f"{name}: T={T}, S={S}, the tile of rows {r0}:{r1} and keys {c0}:{c1}, D={D}, D_v={D_v}",
            args,
            {"allowed": allowed[rows, cols] if causal else None},
            expected=lambda q=q, k=k, v=v, g=grad_out, allowed=allowed, scale=scale, rows=rows, cols=cols: (
                _tile_gradients_reference(q, k, v, g, allowed, scale, rows, cols)
            ),
            compare=judge,
            inputs=["q_i", "k_j", "v_j", "grad_out_i", "lse_i", "delta_i", "scale"],
        )
