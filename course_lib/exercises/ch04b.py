"""Checkers for notebook 04b (serving): one continuous-batching scheduling step, speculative decoding's
accept-or-resample rule, and the longest cached prefix by chained block names; and the chapter's predict and
explain exercises. Exercise ids continue chapter 04's (4.10 on), since 04b is its second notebook.

Expected values come from each rule's definition, written here on plain lists and tensors; the tests check
these definitions against :mod:`course_lib.serving` (its ``Scheduler``, ``verify_draft`` and prefix lookup).
"""

from __future__ import annotations

import math

import torch

from .common import Case, Draw, Mismatch, checker, compare, compare_exact, declare

__all__ = ["check_schedule_step", "check_verify_draft", "check_cached_prefix"]

declare("4.10", kind="predict", title="steps and time to first token of a three-request trace")
declare("4.11", kind="explain", title="why prefix caching shares only full blocks", points=1)
declare("4.12", kind="explain", title="why drafting slows the tiny model down on a CPU", points=2)
declare("4.13", kind="predict", title="tokens per round at acceptance 0.8 and k = 4")


# --- 4.14: one continuous-batching scheduling step ----------------------------------------------------


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def schedule_reference(
    running: list[dict],
    waiting: list[dict],
    token_budget: int,
    free_blocks: int,
    block_size: int,
    max_running: int | None = None,
    *,
    variant: str | None = None,
) -> dict:
    """The rule of :class:`course_lib.serving.Scheduler` for a step that needs no preemption, from its
    definition: decodes first, then running requests still filling, then admissions under the budget.

    ``variant`` names a wrong rule (for the checker's hints): "fillers first", "overtake", "blocks not
    reserved", "no max_running".
    """
    budget, planned, scheduled = token_budget, 0, {}
    decodes = [r for r in running if r["behind"] == 1]
    fillers = [r for r in running if r["behind"] > 1]
    for request in (fillers + decodes) if variant == "fillers first" else (decodes + fillers):
        if budget == 0:
            break
        count = min(request["behind"], budget)
        scheduled[request["id"]] = count
        planned += _blocks(request["stored"] + count, block_size) - _blocks(request["stored"], block_size)
        budget -= count
    admitted = len(running)
    for request in waiting:
        if budget == 0:
            break
        if max_running is not None and admitted >= max_running and variant != "no max_running":
            break
        count = min(request["tokens"], budget)
        need = _blocks(count, block_size)
        if need > free_blocks - (0 if variant == "blocks not reserved" else planned):
            if variant == "overtake":
                continue
            break
        scheduled[request["id"]] = count
        planned += need
        budget -= count
        admitted += 1
    return scheduled


def _random_state(draw: Draw, kind: str):
    """A scheduler state that needs no preemption: the free blocks cover every running request's need."""
    block_size = draw.choice([2, 4, 8])
    running, waiting = [], []
    names = iter(f"r{i}" for i in draw.permutation(40))
    # (decoding requests, requests filling their prompt, waiting requests) of each kind of state
    decoding, filling, queued = {
        "decodes": (4, 0, 0),
        "tight budget": (5, 0, 2),
        "chunked prompt": (2, 1, 1),
        "admissions": (2, 0, 4),
        "blocked head": (1, 0, 3),
        "max running": (2, 1, 3),
        "blocks taken": (1, 1, 2),
        "mixed": (None, None, None),
    }[kind]
    if kind == "mixed":
        decoding, filling, queued = draw.int(0, 4), draw.int(0, 2), draw.int(0, 4)
    for _ in range(decoding):
        running.append({"id": next(names), "stored": draw.int(3, 40), "behind": 1})
    for _ in range(filling):
        running.append({"id": next(names), "stored": draw.int(0, 12), "behind": draw.int(20, 60)})
    order = draw.permutation(len(running))
    running = [running[i] for i in order]  # admission order: decoders and fillers interleaved
    for _ in range(queued):
        waiting.append({"id": next(names), "tokens": draw.int(2, 30)})
    need_running = sum(
        _blocks(r["stored"] + r["behind"], block_size) - _blocks(r["stored"], block_size) for r in running
    )
    if kind == "decodes":
        budget = draw.int(decoding + 1, 40)
    elif kind == "tight budget":
        budget = draw.int(1, decoding - 1)
    elif kind == "chunked prompt":
        budget = draw.int(decoding + 3, decoding + 15)
    elif kind == "admissions":
        budget = draw.int(decoding + 8, 60)
    elif kind == "mixed":
        budget = draw.int(1, 64)
    else:
        budget = 64
    free = need_running + draw.int(0, 6)
    if kind == "blocked head":  # the head of the queue needs more blocks than are left; the next one fits
        waiting[0]["tokens"] = 40
        waiting[1]["tokens"] = draw.int(1, block_size)
        free = need_running + _blocks(40, block_size) - 1
    if (
        kind == "blocks taken"
    ):  # the head fits in the free blocks only if this step's chunk had not taken some
        filler = next(r for r in running if r["behind"] > 1)
        filler["stored"] = block_size * draw.int(0, 2)
        waiting[0]["tokens"] = draw.int(block_size + 1, 3 * block_size)
        need_running = sum(
            _blocks(r["stored"] + r["behind"], block_size) - _blocks(r["stored"], block_size) for r in running
        )
        free = need_running + _blocks(waiting[0]["tokens"], block_size) - 1
    max_running = None
    if kind == "max running":  # room in the budget and the blocks, none in the running set
        max_running = len(running) + draw.int(0, 1)
        for request in waiting:
            request["tokens"] = draw.int(2, 6)
        free += 3 * _blocks(6, block_size)
    return running, waiting, budget, free, block_size, max_running


@checker("4.14", title="one continuous-batching scheduling step", points=2, task="the scheduling step")
def check_schedule_step(draw: Draw):
    """``fn(running, waiting, token_budget, free_blocks, block_size, max_running=None) -> {id: tokens}``:
    decodes first (one token each, in admission order), then the running requests still filling their
    prompt (as many tokens as the budget allows, oldest first), then waiting requests admitted oldest first
    while the budget lasts, ``max_running`` is not reached and their first chunk's blocks fit in the free
    blocks this step has not taken yet; the first that does not fit stops admission."""
    kinds = ["decodes", "tight budget", "chunked prompt", "admissions", "blocked head", "blocks taken"]
    kinds += ["max running"]
    kinds += ["mixed"] * 3
    descriptions = {
        "decodes": "only decodes, budget to spare",
        "tight budget": "more decoding requests than tokens in the budget",
        "chunked prompt": "a long prompt chunked beside the decodes",
        "admissions": "admissions until the budget runs out",
        "blocked head": "the head of the queue does not fit, the request behind it would",
        "max running": "max_running reached",
        "blocks taken": "the blocks a prompt chunk takes this step are no longer free for admissions",
        "mixed": "a random state",
    }
    for kind in kinds:
        running, waiting, budget, free, block_size, max_running = _random_state(draw, kind)
        state = (running, waiting, budget, free, block_size, max_running)
        expected = schedule_reference(*state)
        variants = {
            "prefill chunks before the decodes (a long prompt would delay every decoding request's next "
            "token: decodes come first)": schedule_reference(*state, variant="fillers first"),
            "a later request admitted past the head of the queue, which did not fit (first come, first "
            "served: admission stops at the first request that does not fit)": schedule_reference(
                *state, variant="overtake"
            ),
            "admission counting all free blocks (the blocks this step's earlier requests take are no "
            "longer free)": schedule_reference(*state, variant="blocks not reserved"),
            "max_running ignored": schedule_reference(*state, variant="no max_running"),
        }

        def judge(got, expected, variants=variants, budget=budget, state=state):
            if not isinstance(got, dict):
                raise Mismatch(f"expected a dict {{request id: tokens}}, got {type(got).__name__}")
            bad = {k: v for k, v in got.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0}
            if bad:
                raise Mismatch(f"token counts must be non-negative ints, got {bad}")
            got = {k: v for k, v in got.items() if v}  # a request that gets no token is not scheduled
            if got == expected:
                return
            lines = [f"scheduled {got}, expected {expected}"]
            if sum(got.values()) > budget:
                lines.append(f"hint: that is {sum(got.values())} tokens, more than the budget of {budget}")
            for name, value in variants.items():
                if value != expected and got == value:
                    lines.append(f"hint: your schedule equals {name}")
                    break
            else:
                known = {r["id"] for r in state[0]} | {r["id"] for r in state[1]}
                if set(got) - known:
                    lines.append(f"hint: {sorted(set(got) - known)} are not requests of this state")
            raise Mismatch("\n".join(lines))

        yield Case(
            f"{descriptions[kind]}: {len(running)} running, {len(waiting)} waiting, budget {budget}, "
            f"{free} free blocks of {block_size}" + (f", max_running={max_running}" if max_running else ""),
            (running, waiting, budget, free, block_size),
            {"max_running": max_running},
            expected=expected,
            compare=judge,
            inputs=["running", "waiting", "token_budget", "free_blocks", "block_size"],
        )


# --- 4.15: speculative decoding's accept-or-resample rule ---------------------------------------------


def verify_reference(draft_tokens, draft_probs, target_probs, u, *, variant: str | None = None):
    """Accepted counts and next-token distributions from the rule's definition, row by row.

    ``variant``: "resample from p", "unnormalised", "every acceptance", "p alone", "bonus at k - 1".
    """
    B, k = draft_tokens.shape
    accepted, next_probs = [], []
    for b in range(B):
        count = 0
        for i in range(k):
            x = int(draft_tokens[b, i])
            p, q = float(target_probs[b, i, x]), float(draft_probs[b, i, x])
            keep = u[b, i] < (p if variant == "p alone" else p / q)
            if keep:
                count += 1
            elif variant != "every acceptance":
                break
        accepted.append(count)
        if count < k:
            position = count if variant != "every acceptance" else min(count, k - 1)
            residual = (target_probs[b, position] - draft_probs[b, position]).clamp_min(0)
            if variant == "resample from p":
                residual = target_probs[b, position]
            elif variant != "unnormalised":
                residual = residual / residual.sum()
            next_probs.append(residual)
        else:
            next_probs.append(target_probs[b, k - 1 if variant == "bonus at k - 1" else k])
    return torch.tensor(accepted), torch.stack(next_probs)


WRONG_RULES = {
    "the count of every accepted draft (only the leading run is kept: the first rejection ends the round)": (
        "every acceptance"
    ),
    "acceptance when u < p(x) (it is u < p(x) / q(x))": "p alone",
}


def _chi_square_p_value_df3(statistic: float) -> float:
    """P(X > statistic) for a chi-square variable with 3 degrees of freedom (closed form)."""
    return math.erfc(math.sqrt(statistic / 2)) + math.sqrt(2 * statistic / math.pi) * math.exp(-statistic / 2)


@checker(
    "4.15", title="speculative decoding's accept-or-resample rule", points=2, task="the verification rule"
)
def check_verify_draft(draw: Draw):
    """``fn(draft_tokens, draft_probs, target_probs, u) -> (accepted, next_probs)`` for B rounds of k
    drafts: draft ``i`` is kept when ``u[:, i] < p(x_i) / q(x_i)`` and every draft before it was kept;
    ``next_probs`` is the normalised residual ``max(0, p - q)`` at the first rejected position, or the
    target's distribution after the last draft when all ``k`` are kept."""
    # First the property that matters: the first emitted token follows the target's distribution.
    base_p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    base_q = torch.tensor([0.2, 0.2, 0.3, 0.3], dtype=torch.float64)
    order = draw.permutation(4)
    p0, q0 = base_p[order], base_q[order]
    B, k = 6000, 2
    rows = torch.Generator().manual_seed(draw.int(0, 2**31 - 1))
    draft_tokens = torch.multinomial(q0, B * k, replacement=True, generator=rows).view(B, k)
    draft_probs = q0.expand(B, k, 4).clone()
    target_probs = p0.expand(B, k + 1, 4).clone()
    u = torch.rand(B, k, generator=rows, dtype=torch.float64)
    sampling_seed = draw.int(0, 2**31 - 1)

    args = (draft_tokens, draft_probs, target_probs, u)

    def emitted_follow_p(
        got, expected, p0=p0, draft_tokens=draft_tokens, seed=sampling_seed, B=B, k=k, args=args
    ):
        accepted, next_probs = _pair(got, B, 4)
        if not torch.isfinite(next_probs).all() or (next_probs < 0).any():
            raise Mismatch("next_probs: NaN, infinite or negative entries; each row must be a distribution")
        if ((accepted < 0) | (accepted > k)).any():
            raise Mismatch(f"accepted: counts must lie between 0 and k = {k}")
        generator = torch.Generator().manual_seed(seed)
        sampled = torch.multinomial(next_probs.double().clamp_min(0) + 1e-300, 1, generator=generator)[:, 0]
        first = torch.where(accepted >= 1, draft_tokens[:, 0], sampled)
        counts = torch.bincount(first, minlength=4).double()
        statistic = float(((counts - B * p0) ** 2 / (B * p0)).sum())
        p_value = _chi_square_p_value_df3(statistic)
        if p_value > 1e-6:
            return
        frequencies = [round(x, 3) for x in (counts / B).tolist()]
        lines = [
            f"the first token your rule emits does not follow the target's distribution: over {B} rounds its "
            f"frequencies are {frequencies}, the target's p is {[round(x, 3) for x in p0.tolist()]} "
            f"(chi-square {statistic:.1f}, p-value {p_value:.1e})"
        ]
        rejected = accepted == 0
        if rejected.any() and torch.allclose(
            next_probs[rejected].double(), p0.expand(int(rejected.sum()), 4)
        ):
            lines.append(
                "hint: after a rejection you draw from p itself (resampling from p): the tokens the draft "
                "proposes and p accepts are then counted twice. Draw from the residual max(0, p - q), "
                "normalised"
            )
        else:
            for label, variant in WRONG_RULES.items():
                if torch.equal(accepted, verify_reference(*args, variant=variant)[0]):
                    lines.append(f"hint: your accepted counts are {label}")
                    break
        raise Mismatch("\n".join(lines))

    yield Case(
        f"the first emitted token of {B} rounds of k={k} drafts follows p (a chi-square test)",
        (draft_tokens, draft_probs, target_probs, u),
        expected=None,
        compare=emitted_follow_p,
        inputs=["draft_tokens", "draft_probs", "target_probs", "u"],
    )
    # Then the rule itself, exactly, on random distributions and edge cases.
    for name, B, k, V, kind in [
        ("random distributions", draw.int(4, 8), 3, draw.int(4, 7), None),
        ("every draft accepted: the bonus token", draw.int(2, 4), draw.int(2, 4), 5, "accept all"),
        ("the first draft rejected", draw.int(2, 4), 3, 5, "reject first"),
        ("a draft the target gives probability 0", draw.int(2, 4), 2, 4, "p zero"),
        ("one draft per round", draw.int(4, 8), 1, 5, None),
        ("a later draft rejected after earlier ones kept", draw.int(3, 6), 4, 6, "reject later"),
    ]:
        q = torch.softmax(draw.randn(B, k, V, scale=1.5), -1)
        p = torch.softmax(draw.randn(B, k + 1, V, scale=1.5), -1)
        tokens = torch.stack([torch.multinomial(q[b], 1, generator=draw.generator)[:, 0] for b in range(B)])
        u = draw.rand(B, k) * 0.98 + 0.01
        rows = torch.arange(B)

        def halve(position, p=p, q=q, tokens=tokens, rows=rows):
            """Make p(x) = q(x) / 2 at this position: a draft rejected whenever u > 1/2."""
            x = tokens[:, position]
            target = 0.5 * q[rows, position, x]
            others = p[:, position].scatter(-1, x[:, None], 0.0)
            others = others / others.sum(-1, keepdim=True) * (1 - target)[:, None]
            p[:, position] = others.scatter(-1, x[:, None], target[:, None])

        if kind == "accept all":
            u = 1e-6 * draw.rand(B, k)
        elif kind == "reject first":
            halve(0)
            u[:, 0] = 0.75
        elif kind == "p zero":
            p[:, 0] = p[:, 0].scatter(-1, tokens[:, :1], 0.0)
            p[:, 0] = p[:, 0] / p[:, 0].sum(-1, keepdim=True)
        elif kind == "reject later":
            u[:, :2] = 1e-6
            halve(2)
            u[:, 2] = 0.75
        args = (tokens, q, p, u)
        expected = verify_reference(*args)
        wrong = {
            "the count of every accepted draft (only the leading run is kept: the first rejection ends "
            "the round)": verify_reference(*args, variant="every acceptance"),
            "acceptance when u < p(x) (it is u < p(x) / q(x))": verify_reference(*args, variant="p alone"),
            "resampling from p after a rejection (draw from the residual max(0, p - q), normalised)": (
                verify_reference(*args, variant="resample from p")
            ),
            "the residual max(0, p - q) not normalised": verify_reference(*args, variant="unnormalised"),
            "the bonus distribution taken at the last draft's position (after k kept drafts, the next token "
            "comes from p at position k)": verify_reference(*args, variant="bonus at k - 1"),
        }

        def judge(got, expected, wrong=wrong, B=B, V=V):
            accepted, next_probs = _pair(got, B, V)
            compare_exact(
                accepted.long() if not accepted.is_floating_point() else accepted,
                expected[0],
                "accepted",
                variants={label: (lambda value=value: value[0]) for label, value in wrong.items()},
            )
            compare(
                next_probs,
                expected[1],
                "next_probs",
                atol=1e-10,
                rtol=1e-9,
                variants={label: (lambda value=value: value[1]) for label, value in wrong.items()},
            )

        yield Case(
            f"{name}: B={B} rounds, k={k} drafts, a vocabulary of {V}",
            args,
            expected=expected,
            compare=judge,
            inputs=["draft_tokens", "draft_probs", "target_probs", "u"],
        )


def _pair(got: object, B: int, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise Mismatch(f"expected a pair (accepted, next_probs), got {type(got).__name__}")
    accepted, next_probs = got
    if not isinstance(accepted, torch.Tensor) or accepted.shape != (B,):
        raise Mismatch(f"accepted: expected a tensor of shape ({B},), got {accepted!r:.80}")
    if accepted.is_floating_point() and not torch.equal(accepted, accepted.round()):
        raise Mismatch("accepted: counts of drafts are whole numbers")
    if not isinstance(next_probs, torch.Tensor) or next_probs.shape != (B, V):
        shape = tuple(next_probs.shape) if isinstance(next_probs, torch.Tensor) else type(next_probs).__name__
        raise Mismatch(f"next_probs: expected a tensor of shape ({B}, {V}), got {shape}")
    return accepted.long(), next_probs


# --- 4.16: chained block names and the longest cached prefix ------------------------------------------


def cached_prefix_reference(tokens, block_size, cached, *, variant: str | None = None) -> list[int]:
    """Physical blocks of the longest run of ``tokens``' leading full blocks whose chained names are in
    ``cached``; at most ``len(tokens) - 1`` tokens. ``variant``: "unchained", "continue after a miss",
    "partial block", "last token too"."""
    from ..serving.paged_cache import block_hash

    hits, name = [], b""
    last = len(tokens) if variant == "last token too" else len(tokens) - 1  # tokens the cache may give
    for start in range(0, last if variant == "partial block" else last - block_size + 1, block_size):
        block = list(tokens[start : min(start + block_size, last)])
        name = block_hash(b"" if variant == "unchained" else name, block)
        if name not in cached:
            if variant == "continue after a miss":
                continue
            break
        hits.append(cached[name])
    return hits


def _names(tokens, block_size, *, partial=False):
    from ..serving.paged_cache import block_hash

    names, name = [], b""
    stop = len(tokens) if partial else len(tokens) - len(tokens) % block_size
    for start in range(0, stop, block_size):
        name = block_hash(name, list(tokens[start : start + block_size]))
        names.append(name)
    return names


@checker(
    "4.16",
    title="chained block names and the longest cached prefix",
    points=1,
    task="the prefix lookup",
    allow=("course_lib.serving.paged_cache.block_hash",),
)
def check_cached_prefix(draw: Draw):
    """``fn(tokens, block_size, cached) -> [physical blocks]``: the blocks holding the longest run of
    ``tokens``' leading full blocks found in ``cached`` (block name -> physical block), where block ``i``'s
    name is ``block_hash(name of block i - 1, its tokens)`` (``b""`` before the first); at most
    ``len(tokens) - 1`` tokens come from the cache."""
    for name, kind in [
        ("the first blocks cached, then a miss", "prefix"),
        ("a block equal to a cached one after a different first block", "unchained"),
        ("a prompt of whole blocks, all cached", "whole"),
        ("a miss in the middle, later blocks cached too", "hole"),
        ("a cached name for the partly filled last block", "partial"),
        ("nothing cached", "empty"),
        ("a prompt shorter than one block", "short"),
    ]:
        block_size = draw.choice([3, 4]) if kind == "partial" else draw.choice([2, 3, 4])
        vocab = 7
        physical = iter(draw.permutation(64))
        other = [draw.int(0, vocab - 1) for _ in range(draw.int(3, 6) * block_size)]
        cached = {n: next(physical) for n in _names(other, block_size)}  # another request's blocks
        if kind == "short":
            tokens = [draw.int(0, vocab - 1) for _ in range(block_size - 1)]
        elif kind == "whole":
            tokens = other[: draw.int(2, 3) * block_size]
        elif kind == "unchained":  # block 1 equals the first block of another cached request
            block = [draw.int(0, vocab - 1) for _ in range(block_size)]
            first = block if block != other[block_size : 2 * block_size] else [(t + 1) % vocab for t in block]
            tokens = other[:block_size] + first + [draw.int(0, vocab - 1)]
            cached.update({n: next(physical) for n in _names(first + other[:block_size], block_size)})
        elif kind == "empty":
            tokens = [draw.int(0, vocab - 1) for _ in range(draw.int(2, 4) * block_size + 1)]
            cached = {}
        else:
            shared = draw.int(1, 2) * block_size
            tokens = other[:shared] + [(t + 1) % vocab for t in other[shared : shared + block_size]]
            tokens += other[shared + block_size : shared + 2 * block_size] + [draw.int(0, vocab - 1)]
            if kind == "hole":  # the blocks after the miss are cached too, under the chain through the miss
                for later in _names(tokens, block_size)[shared // block_size + 1 :]:
                    cached[later] = next(physical)
            if kind == "partial":  # two full blocks, a partial one, the last token; the partial one named
                tokens = other[: 3 * block_size - 1] + [draw.int(0, vocab - 1)]
                cached[_names(tokens[:-1], block_size, partial=True)[-1]] = next(physical)
        state = (tokens, block_size, cached)
        expected = cached_prefix_reference(*state)
        variants = {
            "the blocks matched by their own tokens alone, not chained to the blocks before them (two "
            "requests may share block i only if everything before it is equal too)": cached_prefix_reference(
                *state, variant="unchained"
            ),
            "the blocks found after a miss too (the cached prefix ends at the first block not cached)": (
                cached_prefix_reference(*state, variant="continue after a miss")
            ),
            "a partly filled last block matched (only full blocks are named and shared)": (
                cached_prefix_reference(*state, variant="partial block")
            ),
            "every token cached (at most len(tokens) - 1: the last token must go through the model for its "
            "logits)": cached_prefix_reference(*state, variant="last token too"),
        }

        def judge(got, expected, variants=variants):
            if isinstance(got, tuple):
                got = list(got)
            if not isinstance(got, list) or not all(
                isinstance(b, int) and not isinstance(b, bool) for b in got
            ):
                raise Mismatch(f"expected a list of physical block numbers, got {got!r:.80}")
            if got == expected:
                return
            lines = [f"blocks {got}, expected {expected}"]
            for label, value in variants.items():
                if value != expected and got == value:
                    lines.append(f"hint: yours are {label}")
                    break
            raise Mismatch("\n".join(lines))

        yield Case(
            f"{name}: {len(tokens)} tokens, blocks of {block_size}, {len(cached)} cached blocks",
            state,
            expected=expected,
            compare=judge,
            inputs=["tokens", "block_size", "cached"],
        )
