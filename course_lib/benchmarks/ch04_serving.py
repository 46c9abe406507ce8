"""Chapter 04's serving benchmarks: the engine of :mod:`course_lib.serving` on the trained tiny model.

    python -m course_lib.bench serving --threads 1        # static vs continuous batching
    python -m course_lib.bench prefix_caching --threads 1  # shared system prompts, cache on and off
    python -m course_lib.bench speculative --threads 1     # draft k tokens, k = 1 .. 8

The model is chapter 05's trained one (:func:`course_lib.models.load_eviction_model`: 2 layers,
4 query heads sharing 2 key/value heads, RoPE, float32). Prompts are windows of the held-out
corpus. Each timed call replays a whole trace, so "time" is the time to serve it and tokens per
second is generated tokens / time. Steps, tokens per step, time to first token and time per
output token are counted in engine steps: they are the same on every machine.

- ``serving``: :data:`TRACE_REQUESTS` requests with mixed output lengths (three in four short,
  4-16 tokens; one in four long, 48-96) arriving as a Poisson process at ``T / 100`` requests per
  step, served by static batching and by continuous batching (:data:`ENGINE`: blocks of 16,
  at most 16 requests in flight, a budget of 64 tokens per step). Reference: static.
- ``prefix_caching``: 32 requests whose prompts start with one of 4 shared system prompts of
  ``T`` tokens, continuous batching with and without prefix caching. Reference: without.
- ``speculative``: 4 prompts, 48 new tokens each, greedy; the target alone and with a draft
  proposing ``k = T`` tokens: the shipped one-layer draft or the target's first layer.
  Reference: the target alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..measure import Measurement
from ..models import VOCAB, load_eviction_model
from ..serving import load_draft_model, make_trace, serve, speculative_decode, truncated_model
from ..studies.serving import held_out_tokens, mixed_trace

__all__ = [
    "SUITES",
    "ENGINE",
    "TRACE_REQUESTS",
    "serving_trace",
    "serving_suite",
    "serving_table",
    "serving_report",
    "prefix_caching_suite",
    "speculative_suite",
]

TRACE_REQUESTS = 32
ENGINE = {"num_blocks": 64, "block_size": 16, "token_budget": 64, "max_running": 16}


def _held_out() -> torch.Tensor:
    return held_out_tokens()


def _model(device) -> torch.nn.Module:
    return load_eviction_model().to(device)


def serving_trace(rate: float, *, seed: int = 0) -> list[dict]:
    """The ``serving`` suite's trace at ``rate`` requests per step (mixed output lengths): chapter
    04b's :func:`~course_lib.studies.serving.mixed_trace` of :data:`TRACE_REQUESTS` requests."""
    return mixed_trace(TRACE_REQUESTS, rate=rate, seed=seed)


def _replay(model, trace, **engine):
    """A zero-argument call that serves ``trace`` and keeps the engine's metrics in ``call.extra``."""

    def call():
        metrics = serve(model, trace, **engine).metrics()
        call.extra.update({key: value for key, value in metrics.items() if key != "policy"})

    call.extra = {}
    return call


def serving_suite(device: torch.device | str = "cpu"):
    """Static vs continuous batching on the same trace at arrival rates ``T / 100`` requests per step."""

    def method(policy: str):
        def build(T: int):
            return _replay(_model(device), serving_trace(T / 100), policy=policy, **ENGINE)

        return build

    methods = {"static": method("static"), "continuous": method("continuous")}
    return methods, "static", [10, 25, 50, 100, 400]


def serving_table(results: Sequence[Measurement]) -> str:
    """Per rate and policy: tokens/s (from the timed replay), tokens/step, TTFT, TPOT, cache use."""
    lines = [
        f"{'rate/step':>9} {'policy':>10} {'tokens/s':>9} {'vs ref':>6} {'tok/step':>8} {'steps':>6} "
        f"{'TTFT':>7} {'TPOT':>5} {'util':>5} {'reserved':>8} {'preempt':>7}"
    ]
    by_rate: dict[int, dict[str, Measurement]] = {}
    for r in results:
        by_rate.setdefault(r.T, {})[r.method] = r
    for T in sorted(by_rate):
        rows = by_rate[T]
        reference = next(iter(rows.values()))
        for name, r in rows.items():
            e = r.extra
            speed = e["generated_tokens"] / r.seconds
            base = reference.extra["generated_tokens"] / reference.seconds
            lines.append(
                f"{T / 100:>9.2f} {name:>10} {speed:>9.0f} {speed / base:>5.2f}x "
                f"{e['tokens_per_step']:>8.2f} {e['steps']:>6} {e['mean_ttft']:>7.1f} {e['mean_tpot']:>5.2f} "
                f"{e['mean_utilisation']:>5.2f} {e['mean_reserved_fraction']:>8.2f} {e['preemptions']:>7}"
            )
    lines.append("TTFT, TPOT: mean time to first token and per later token, in engine steps;")
    lines.append("util: stored tokens / slots of reserved blocks; reserved: reserved blocks / the pool")
    return "\n".join(lines)


def serving_report(results: Sequence[Measurement]) -> str:
    """One line per rate: continuous over static, in tokens per second and in steps."""
    by_rate: dict[int, dict[str, Measurement]] = {}
    for r in results:
        by_rate.setdefault(r.T, {})[r.method] = r
    lines = []
    for T in sorted(by_rate):
        rows = by_rate[T]
        if {"static", "continuous"} <= rows.keys():
            static, continuous = rows["static"], rows["continuous"]
            lines.append(
                f"rate {T / 100:.2f}/step: continuous serves the trace "
                f"{static.seconds / continuous.seconds:.2f}x faster than static "
                f"({static.extra['steps']} -> {continuous.extra['steps']} steps)"
            )
    return "\n".join(lines)


serving_suite.table, serving_suite.report = serving_table, serving_report


def prefix_caching_suite(device: torch.device | str = "cpu"):
    """Continuous batching with and without prefix caching; T is the shared system prompt's length."""

    def method(prefix_caching: bool):
        def build(T: int):
            trace = make_trace(
                TRACE_REQUESTS,
                rate=math.inf,
                vocab_size=len(VOCAB),
                prompt_lengths=(8, 16),
                output_lengths=(8, 16),
                system_prompts=4,
                system_prompt_length=T,
                source=_held_out(),
                seed=1,
            )
            engine = {**ENGINE, "num_blocks": 256}
            return _replay(_model(device), trace, prefix_caching=prefix_caching, **engine)

        return build

    return {"no prefix cache": method(False), "prefix cache": method(True)}, "no prefix cache", [32, 64, 128]


def _prefix_table(results: Sequence[Measurement]) -> str:
    lines = [
        f"{'T':>5} {'method':>16} {'ms':>8} {'steps':>6} {'prefill tokens':>14} {'saved':>6} {'hit rate':>8}"
    ]
    for r in results:
        e = r.extra
        lines.append(
            f"{r.T:>5} {r.method:>16} {r.seconds * 1e3:>8.1f} {e['steps']:>6} {e['processed_tokens']:>14} "
            f"{e['prefill_tokens_saved']:>6} {e['prefix_hit_rate']:>8.2f}"
        )
    lines.append(
        "prefill tokens: tokens fed to the model (prompts and decodes); saved: prompt tokens found cached"
    )
    return "\n".join(lines)


prefix_caching_suite.table = _prefix_table

SPECULATIVE_PROMPTS, SPECULATIVE_TOKENS = 4, 48


def speculative_suite(device: torch.device | str = "cpu"):
    """Greedy speculative decoding with k = T drafted tokens per round, against the target alone."""

    def prompts() -> list[list[int]]:
        held_out = _held_out()
        return [held_out[i * 997 : i * 997 + 32].tolist() for i in range(SPECULATIVE_PROMPTS)]

    def method(draft_name: str | None):
        def build(T: int):
            target = _model(device)
            if draft_name == "trained draft":
                draft = load_draft_model().to(device)
            elif draft_name == "first layer":
                draft = truncated_model(target, 1)
            else:
                draft = target
            k = T if draft_name else 0

            def call():
                _, stats = speculative_decode(target, draft, prompts(), SPECULATIVE_TOKENS, k=k)
                call.extra.update(stats)

            call.extra = {}
            return call

        return build

    methods = {"target alone": method(None), "trained draft": method("trained draft")}
    methods["first layer"] = method("first layer")
    return methods, "target alone", [1, 2, 4, 8]


def _speculative_table(results: Sequence[Measurement]) -> str:
    lines = [f"{'k':>3} {'method':>13} {'ms':>8} {'speed-up':>8} {'accept':>6} {'tokens/round':>12}"]
    alone = {r.T: r for r in results if r.method == "target alone"}
    for r in results:
        e = r.extra
        speedup = alone[r.T].seconds / r.seconds if r.T in alone else float("nan")
        accept = e["acceptance_rate"]
        lines.append(
            f"{r.T:>3} {r.method:>13} {r.seconds * 1e3:>8.1f} {speedup:>7.2f}x "
            f"{'-' if math.isnan(accept) else f'{accept:.2f}':>6} {e['tokens_per_round']:>12.2f}"
        )
    lines.append(
        "tokens/round: tokens emitted per target forward of a row (the speed-up where decode is memory-bound)"
    )
    return "\n".join(lines)


speculative_suite.table = _speculative_table

# The model every suite serves: chapter 05's trained tiny GQA model (4 query heads of 16, 2 KV heads).
_SHAPE = {"B": "requests of the trace", "H": 4, "D": 16, "H_kv": 2}
for _suite in (serving_suite, prefix_caching_suite, speculative_suite):
    _suite.shape = _SHAPE

SUITES = {"serving": serving_suite, "prefix_caching": prefix_caching_suite, "speculative": speculative_suite}
