"""Checkers for notebook 03: merging softmax statistics, one masked FA2 tile update, combining split-KV
partials, and counting the tiles causal attention skips.

Expected values are computed from their definitions on whole rows (dense softmax, logsumexp), not from
the library's tiled code.
"""

from __future__ import annotations

import torch

from .common import Case, Draw, Mismatch, checker, compare, compare_number

__all__ = ["check_merge_softmax_stats", "check_fa2_step", "check_combine_partials", "check_causal_skips"]

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
