"""Wrong solutions of notebook 04b's exercises 4.14-4.16, one per misconception (see exercise_mistakes.py).

Each entry: exercise id -> list of (description, expected fragment of the message, function(s)).
"""

import torch

import course_lib
from course_lib.serving import block_hash


def _schedule(running, waiting, budget, free, block_size, max_running=None, *, kind=None):
    """Exercise 4.14's scheduling step with one thing done wrong at a time."""

    def blocks(tokens):
        return -(-tokens // block_size)

    taken, scheduled = 0, {}
    decoding = [r for r in running if r["behind"] == 1]
    filling = [r for r in running if r["behind"] > 1]
    for request in (filling + decoding) if kind == "fillers first" else (decoding + filling):
        if budget == 0:
            break
        count = min(request["behind"], budget)
        scheduled[request["id"]] = count
        taken += blocks(request["stored"] + count) - blocks(request["stored"])
        budget -= count
    in_flight = len(running)
    for request in waiting:
        if budget <= 0 and kind != "whole prompts":
            break
        if max_running is not None and in_flight >= max_running and kind != "no max_running":
            break
        count = request["tokens"] if kind == "whole prompts" else min(request["tokens"], budget)
        if blocks(count) > free - (0 if kind == "blocks not reserved" else taken):
            if kind == "overtake":
                continue
            break
        scheduled[request["id"]] = count
        taken += blocks(count)
        budget -= count
        in_flight += 1
    return scheduled


def _verify(draft_tokens, draft_probs, target_probs, u, *, kind=None):
    """Exercise 4.15's rule with one thing done wrong at a time."""
    B, k = draft_tokens.shape
    p = target_probs[:, :k].gather(-1, draft_tokens[..., None])[..., 0]
    q = draft_probs.gather(-1, draft_tokens[..., None])[..., 0]
    keep = u < p if kind == "p alone" else u * q < p
    accepted = keep.long().sum(-1) if kind == "every acceptance" else keep.long().cumprod(-1).sum(-1)
    rows = torch.arange(B)
    at = accepted.clamp(max=k - 1)
    residual = (target_probs[rows, at] - draft_probs[rows, at]).clamp_min(0)
    if kind == "resample from p":
        residual = target_probs[rows, at]
    elif kind != "unnormalised":
        residual = residual / residual.sum(-1, keepdim=True).clamp_min(1e-300)
    bonus = target_probs[:, k - 1 if kind == "bonus at k - 1" else k]
    return accepted, torch.where((accepted == k)[:, None], bonus, residual)


def _prefix(tokens, block_size, cached, *, kind=None):
    """Exercise 4.16's lookup with one thing done wrong at a time."""
    hits, name = [], b""
    last = len(tokens) if kind == "last token too" else len(tokens) - 1
    for start in range(0, last if kind == "partial blocks" else last - block_size + 1, block_size):
        block = tokens[start : min(start + block_size, last)]
        name = block_hash(b"" if kind == "unchained" else name, block)
        if name not in cached:
            if kind == "continue after a miss":
                continue
            break
        hits.append(cached[name])
    return hits


MISTAKES = {
    "4.14": [
        (
            "prompt chunks before decodes",
            "decodes come first",
            lambda *a, **kw: _schedule(*a, **kw, kind="fillers first"),
        ),
        (
            "a later request overtakes the head",
            "first come, first served",
            lambda *a, **kw: _schedule(*a, **kw, kind="overtake"),
        ),
        (
            "this step's blocks counted as free",
            "no longer free",
            lambda *a, **kw: _schedule(*a, **kw, kind="blocks not reserved"),
        ),
        (
            "max_running ignored",
            "max_running ignored",
            lambda *a, **kw: _schedule(*a, **kw, kind="no max_running"),
        ),
        (
            "whole prompts admitted past the budget",
            "more than the budget",
            lambda *a, **kw: _schedule(*a, **kw, kind="whole prompts"),
        ),
        (
            "the library's Scheduler",
            "course's own code",
            lambda *a, **kw: (
                course_lib.serving.Scheduler(None, num_blocks=4, block_size=4, token_budget=4) or {}
            ),
        ),
    ],
    "4.15": [
        ("resampling from p", "resampling from p", lambda *a: _verify(*a, kind="resample from p")),
        ("every acceptance counted", "every accepted draft", lambda *a: _verify(*a, kind="every acceptance")),
        ("accepted when u < p", "u < p(x)", lambda *a: _verify(*a, kind="p alone")),
        ("the residual not normalised", "not normalised", lambda *a: _verify(*a, kind="unnormalised")),
        (
            "the bonus from the last draft's position",
            "bonus distribution",
            lambda *a: _verify(*a, kind="bonus at k - 1"),
        ),
        (
            "the library's verify_draft",
            "course's own code",
            lambda tokens, q, p, u: course_lib.serving.verify_draft(
                tokens, q, p, generator=torch.Generator()
            ),
        ),
    ],
    "4.16": [
        ("names not chained", "not chained", lambda *a: _prefix(*a, kind="unchained")),
        ("blocks after a miss", "after a miss", lambda *a: _prefix(*a, kind="continue after a miss")),
        (
            "a partly filled block matched",
            "partly filled last block",
            lambda *a: _prefix(*a, kind="partial blocks"),
        ),
        ("the last token from the cache", "len(tokens) - 1", lambda *a: _prefix(*a, kind="last token too")),
        (
            "the library's PagedModelCache",
            "course's own code",
            lambda tokens, bs, cached: (
                course_lib.serving.PagedModelCache(
                    1, 1, 1, num_blocks=4, block_size=bs, prefix_caching=True
                ).cached_prefix_length(tokens)
                and []
            ),
        ),
    ],
}
