"""The definitions behind notebook 04b's checkers agree with the serving engine they teach: the scheduling
step with ``Scheduler``, the verification rule with ``verify_draft``, the prefix lookup with
``PagedModelCache`` (on random states, so a change to either side shows here)."""

from collections import deque

import pytest
import torch

from course_lib import models
from course_lib.exercises import Draw
from course_lib.exercises.ch04b import (
    _random_state,
    cached_prefix_reference,
    schedule_reference,
    verify_reference,
)
from course_lib.serving import PagedModelCache, Request, Scheduler, residual_distribution, verify_draft

KINDS = [
    "decodes",
    "tight budget",
    "chunked prompt",
    "admissions",
    "blocked head",
    "blocks taken",
    "max running",
]


def _engine(running, waiting, budget, free, block_size, max_running):
    """A Scheduler in the given state: its running requests' tokens stored, the others waiting."""
    config = models.ModelConfig(vocab_size=8, d_model=8, num_layers=1, num_heads=1, max_len=4096)
    model = models.TinyTransformer(config, seed=0)
    stored = sum(-(-r["stored"] // block_size) for r in running)
    engine = Scheduler(
        model, num_blocks=stored + free, block_size=block_size, token_budget=budget, max_running=max_running
    )
    for state in running:
        known = state["stored"] + state["behind"]
        request = Request(state["id"], [1] * known, max_new_tokens=1, status="running")
        engine.requests[state["id"]] = request
        engine.cache.add_sequence(state["id"])
        if state["stored"]:
            engine.cache.reserve(state["id"], [1] * state["stored"])
        request.num_computed = state["stored"]
        engine.running.append(request)
    engine.waiting = deque()
    for state in waiting:
        request = Request(state["id"], [1] * state["tokens"], max_new_tokens=1, status="waiting")
        engine.requests[state["id"]] = request
        engine.waiting.append(request)
    assert engine.cache.num_free_blocks == free
    return engine


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("kind", KINDS + ["mixed"])
def test_the_scheduling_step_is_the_schedulers(kind, seed):
    state = _random_state(Draw(seed), kind)
    scheduled, preempted = _engine(*state)._schedule()
    assert preempted == 0, "the checker's states never need a preemption"
    assert {r.request_id: n for r, n in scheduled.items()} == schedule_reference(*state)


@pytest.mark.parametrize("seed", range(8))
def test_the_verification_rule_is_verify_drafts(seed):
    generator = torch.Generator().manual_seed(seed)
    B, k, V = 50, 3, 5
    q = torch.softmax(0.5 * torch.randn(B, k, V, generator=generator, dtype=torch.float64), -1)
    p = torch.softmax(0.5 * torch.randn(B, k + 1, V, generator=generator, dtype=torch.float64), -1)
    tokens = torch.stack([torch.multinomial(q[b], 1, generator=generator)[:, 0] for b in range(B)])
    u = torch.rand(B, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    accepted, _ = verify_draft(
        tokens, q, p, generator=torch.Generator().manual_seed(seed)
    )  # draws the same u
    mine, next_probs = verify_reference(tokens, q, p, u)
    assert torch.equal(accepted, mine) and 0 < int((accepted < k).sum()) < B
    rows = torch.arange(B)
    at = accepted.clamp(max=k - 1)
    library = torch.where(
        (accepted < k)[:, None], residual_distribution(p[rows, accepted], q[rows, at]), p[rows, k]
    )
    torch.testing.assert_close(next_probs, library)


@pytest.mark.parametrize("seed", range(20))
def test_the_prefix_lookup_is_the_caches(seed):
    draw = Draw(seed)
    block_size = draw.choice([2, 3, 4])
    cache = PagedModelCache(1, 1, 1, num_blocks=200, block_size=block_size, prefix_caching=True)
    prompts = []
    for index in range(6):  # requests that share prefixes of several lengths, stored and committed
        base = prompts[draw.int(0, len(prompts) - 1)] if prompts and draw.int(0, 2) else []
        tokens = base[: draw.int(0, len(base))] + [draw.int(0, 3) for _ in range(draw.int(1, 12))]
        prompts.append(tokens)
        cache.add_sequence(index)
        cache.reserve(index, tokens)
        cache.commit(index)
    for tokens in prompts + [p[: draw.int(1, len(p))] + [draw.int(0, 3)] for p in prompts]:
        assert cached_prefix_reference(tokens, block_size, cache.cached_blocks) == cache._prefix_hits(tokens)
