"""Chapter 04b's serving experiments: the engine of :mod:`course_lib.serving` on the trained tiny model.

Each function runs the real engine and returns plain numbers, which the notebook, the widget, the
figure and the benchmark suites show; nothing here draws except :func:`draw_batching`.

- :func:`mixed_trace`: requests with prompts from the held-out corpus, three in four short answers
  and one in four long ones, arriving as a Poisson process;
- :func:`compare_batching`: the same trace served by static and by continuous batching: exact
  step counts, time to first token and per output token (in engine steps and measured seconds),
  and the cache's reserved and stored slots over time;
- :func:`rate_sweep`: that comparison at several arrival rates;
- :func:`prefix_caching_comparison`: a trace whose prompts share system prompts, served with and
  without prefix caching;
- :func:`speculative_sweep`: greedy speculative decoding with ``k`` drafted tokens per round;
  :func:`expected_tokens_per_round` is its closed form for an acceptance rate,
  :func:`verification_roofline` asks chapter 02's roofline what verifying ``k + 1`` tokens costs
  on an accelerator, and :func:`speculative_speedup` puts the two together.

The model is chapter 05's trained one (:func:`course_lib.models.load_eviction_model`: 2 layers,
4 query heads sharing 2 key/value heads, RoPE). Step counts are exact and the same on every
machine; seconds are measured and noisy.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from ..checks import check_choice, check_float, check_int
from ..hardware import ACCELERATORS, attention_flops, gemm_intensity, time_bound
from ..kv_cache import MODEL_CONFIGS, kv_cache_bytes
from ..models import VOCAB, corpus_split, load_eviction_model
from ..serving import load_draft_model, make_trace, serve, speculative_decode, truncated_model
from ..viz import STYLE, new_figure

__all__ = [
    "serving_model",
    "held_out_tokens",
    "mixed_trace",
    "compare_batching",
    "rate_sweep",
    "draw_batching",
    "prefix_caching_comparison",
    "speculative_sweep",
    "expected_tokens_per_round",
    "speculative_speedup",
    "verification_roofline",
    "PUBLISHED_PARAMETERS_7B",
]


@functools.cache
def held_out_tokens() -> torch.Tensor:
    """The held-out part of the course corpus, encoded: where the traces' prompts come from."""
    return corpus_split()[1]


def serving_model() -> torch.nn.Module:
    """The model every experiment serves: chapter 05's trained tiny GQA model (shared, read-only)."""
    return load_eviction_model()


def mixed_trace(
    num_requests: int = 24,
    *,
    rate: float = 0.5,
    prompt_lengths: tuple[int, int] = (8, 32),
    output_lengths: tuple[int, int] = (4, 16),
    long_fraction: float = 0.25,
    long_output_lengths: tuple[int, int] = (48, 96),
    seed: int = 0,
) -> list[dict]:
    """A seeded trace of ``num_requests`` requests at ``rate`` per engine step, with mixed output lengths.

    Prompts are windows of the held-out corpus; output lengths are short (``output_lengths``) or,
    with probability ``long_fraction``, long (``long_output_lengths``) — the mix that makes a
    static batch wait for its longest member.
    """
    return make_trace(
        num_requests,
        rate=rate,
        vocab_size=len(VOCAB),
        prompt_lengths=prompt_lengths,
        output_lengths=output_lengths,
        long_fraction=long_fraction,
        long_output_lengths=long_output_lengths,
        source=held_out_tokens(),
        seed=seed,
    )


_SUMMARY = (
    "steps",
    "seconds",
    "generated_tokens",
    "tokens_per_step",
    "tokens_per_second",
    "mean_ttft",
    "max_ttft",
    "mean_tpot",
    "mean_ttft_seconds",
    "mean_tpot_seconds",
    "mean_utilisation",
    "mean_reserved_fraction",
    "preemptions",
)


def _timeline(engine) -> dict[str, list]:
    block_size = engine.cache.block_size
    history = engine.history
    return {
        "time": [h["time"] for h in history],
        "reserved_slots": [h["reserved_blocks"] * block_size for h in history],
        "stored_tokens": [h["stored_tokens"] for h in history],
        "running": [h["running"] for h in history],
        "waiting": [h["waiting"] for h in history],
        "tokens": [h["tokens"] for h in history],
    }


def compare_batching(
    rate: float = 0.5,
    *,
    block_size: int = 16,
    cache_tokens: int = 1024,
    token_budget: int = 64,
    num_requests: int = 24,
    max_running: int | None = 16,
    seed: int = 0,
    model: torch.nn.Module | None = None,
) -> dict:
    """Serve one :func:`mixed_trace` with static and with continuous batching.

    The pool holds ``cache_tokens // block_size`` blocks of ``block_size`` tokens; continuous
    batching feeds at most ``token_budget`` tokens per step (static batching prefills whole prompts).
    Returns ``settings``, per policy its metrics (``static``, ``continuous``: the keys of
    :meth:`Scheduler.metrics <course_lib.serving.Scheduler.metrics>` listed in ``_SUMMARY``) and
    ``timeline`` (per step: reserved slots, stored tokens, running and waiting requests), and
    ``same_outputs``: whether both gave every request the same tokens (they must).
    """
    rate = check_float(rate, "rate", min=0.0, min_open=True)
    block_size = check_int(block_size, "block_size", min=1)
    cache_tokens = check_int(cache_tokens, "cache_tokens", min=block_size)
    token_budget = check_int(token_budget, "token_budget", min=1)
    model = serving_model() if model is None else model
    trace = mixed_trace(num_requests, rate=rate, seed=seed)
    engine_settings = dict(
        num_blocks=cache_tokens // block_size,
        block_size=block_size,
        token_budget=token_budget,
        max_running=max_running,
    )
    engines = {
        policy: serve(model, trace, policy=policy, **engine_settings) for policy in ("static", "continuous")
    }
    result: dict = {
        "settings": dict(engine_settings, rate=rate, num_requests=num_requests, seed=seed),
        "timeline": {policy: _timeline(engine) for policy, engine in engines.items()},
        "same_outputs": engines["static"].outputs() == engines["continuous"].outputs(),
    }
    for policy, engine in engines.items():
        metrics = engine.metrics()
        result[policy] = {key: metrics[key] for key in _SUMMARY}
    return result


def rate_sweep(rates: Sequence[float] = (0.1, 0.5, 4.0), **settings) -> list[dict]:
    """:func:`compare_batching` at each arrival rate: one row per (rate, policy) with its metrics."""
    rows = []
    for rate in rates:
        result = compare_batching(rate, **settings)
        for policy in ("static", "continuous"):
            rows.append({"rate": rate, "policy": policy, **result[policy]})
    return rows


def draw_batching(result: dict, axes=None) -> Figure:
    """Left: reserved slots and stored tokens over time, per policy. Right: requests in flight."""
    colours = {"static": "#D55E00", "continuous": "#0072B2"}
    with plt.rc_context(STYLE):
        if axes is None:
            figure = new_figure((11, 3.4))
            axes = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
        else:
            figure = axes[0].figure
        cache_slots = result["settings"]["num_blocks"] * result["settings"]["block_size"]
        for policy, line in result["timeline"].items():
            metrics = result[policy]
            axes[0].step(
                line["time"], line["reserved_slots"], where="post", color=colours[policy], lw=1, ls="--"
            )
            axes[0].step(
                line["time"],
                line["stored_tokens"],
                where="post",
                color=colours[policy],
                lw=1.5,
                label=f"{policy}: {metrics['steps']} steps, "
                f"{metrics['mean_utilisation']:.0%} of reserved slots used",
            )
            axes[1].step(line["time"], line["running"], where="post", color=colours[policy], label=policy)
        axes[0].axhline(cache_slots, color="grey", lw=0.8)
        axes[0].text(0, cache_slots * 1.01, "the pool", fontsize=7, va="bottom", color="grey")
        axes[0].set_xlabel("engine step")
        axes[0].set_ylabel("cache slots")
        axes[0].set_title("stored tokens (solid) and reserved slots (dashed)", fontsize=9)
        axes[0].legend(frameon=False, fontsize=7, loc="upper right")
        axes[1].set_xlabel("engine step")
        axes[1].set_ylabel("requests in flight")
        settings = result["settings"]
        axes[1].set_title(
            f"rate {settings['rate']:g}/step, blocks of {settings['block_size']}, "
            f"budget {settings['token_budget']}",
            fontsize=9,
        )
        axes[1].legend(frameon=False, fontsize=7)
        figure.tight_layout()
    return figure


def prefix_caching_comparison(
    system_prompt_length: int = 64,
    *,
    num_requests: int = 24,
    system_prompts: int = 3,
    block_size: int = 16,
    cache_tokens: int = 4096,
    token_budget: int = 64,
    seed: int = 1,
    model: torch.nn.Module | None = None,
) -> dict:
    """Continuous batching with and without prefix caching, on prompts that share system prompts.

    Every prompt starts with one of ``system_prompts`` prefixes of ``system_prompt_length`` tokens,
    then 8-16 tokens of its own; all requests arrive at once. Returns, for ``off`` and ``on``:
    steps, ``processed_tokens`` (tokens fed to the model), ``prompt_tokens``, the hit rate,
    ``prefill_tokens_saved`` and measured seconds; and ``same_outputs`` (they must be equal).
    """
    system_prompt_length = check_int(system_prompt_length, "system_prompt_length", min=0)
    model = serving_model() if model is None else model
    trace = make_trace(
        num_requests,
        rate=math.inf,
        vocab_size=len(VOCAB),
        prompt_lengths=(8, 16),
        output_lengths=(4, 12),
        system_prompts=system_prompts,
        system_prompt_length=system_prompt_length,
        source=held_out_tokens(),
        seed=seed,
    )
    settings = dict(num_blocks=cache_tokens // block_size, block_size=block_size, token_budget=token_budget)
    result: dict = {"settings": dict(settings, system_prompt_length=system_prompt_length)}
    engines = {}
    for name, prefix_caching in (("off", False), ("on", True)):
        engine = serve(model, trace, prefix_caching=prefix_caching, **settings)
        metrics = engine.metrics()
        engines[name] = engine
        result[name] = {
            "steps": metrics["steps"],
            "seconds": metrics["seconds"],
            "processed_tokens": metrics["processed_tokens"],
            "prompt_tokens": sum(len(r["prompt"]) for r in trace),
            "prefix_hit_rate": metrics["prefix_hit_rate"],
            "prefill_tokens_saved": metrics["prefill_tokens_saved"],
            "mean_ttft": metrics["mean_ttft"],
        }
    result["same_outputs"] = engines["off"].outputs() == engines["on"].outputs()
    return result


def speculative_sweep(
    ks: Sequence[int] = (0, 1, 2, 4, 8),
    *,
    draft: str = "trained",
    num_prompts: int = 4,
    new_tokens: int = 48,
    prompt_length: int = 32,
    model: torch.nn.Module | None = None,
) -> list[dict]:
    """Greedy speculative decoding of held-out prompts with ``k`` drafted tokens per round.

    ``draft`` is "trained" (the shipped one-layer draft, :func:`course_lib.serving.load_draft_model`)
    or "first layer" (the target's first block, :func:`course_lib.serving.truncated_model`).
    ``k = 0`` is the target alone. One row per ``k``: ``acceptance_rate``, ``tokens_per_round``
    (tokens per target forward of a row), target and draft forwards, measured ``seconds`` and
    ``speedup`` over ``k = 0`` (measured once: noisy), and ``same_as_target`` (greedy output equal
    to the target's own, as it must be).
    """
    check_choice(draft, "draft", ("trained", "first layer"))
    target = serving_model() if model is None else model
    drafter = load_draft_model() if draft == "trained" else truncated_model(target, 1)
    held_out = held_out_tokens()
    prompts = [held_out[i * 997 : i * 997 + prompt_length].tolist() for i in range(num_prompts)]
    rows, reference = [], None
    for k in ks:
        k = check_int(k, "ks", min=0)
        started = time.perf_counter()
        outputs, stats = speculative_decode(target, drafter, prompts, new_tokens, k=k)
        seconds = time.perf_counter() - started
        reference = outputs if reference is None and k == 0 else reference
        rows.append(
            {
                "k": k,
                "acceptance_rate": stats["acceptance_rate"],
                "tokens_per_round": stats["tokens_per_round"],
                "target_forwards": stats["target_forwards"],
                "draft_forwards": stats["draft_forwards"],
                "seconds": seconds,
                "same_as_target": reference is None or outputs == reference,
            }
        )
    base = next((r["seconds"] for r in rows if r["k"] == 0), None)
    for row in rows:
        row["speedup"] = base / row["seconds"] if base else float("nan")
    return rows


def expected_tokens_per_round(acceptance: float, k: int) -> float:
    """Tokens one round emits when each draft is accepted independently with probability ``acceptance``.

    ``1 + a + a^2 + ... + a^k = (1 - a^(k+1)) / (1 - a)`` (Leviathan et al., 2023): the accepted
    run, plus the token the target adds (a correction or the bonus).
    """
    acceptance = check_float(acceptance, "acceptance", min=0.0, max=1.0)
    k = check_int(k, "k", min=0)
    if acceptance == 1.0:
        return float(k + 1)
    return (1 - acceptance ** (k + 1)) / (1 - acceptance)


def speculative_speedup(acceptance: float, k: int, *, draft_cost: float, verify_time: float = 1.0) -> float:
    """Modelled speed-up of speculative decoding over plain decoding.

    A round costs ``k`` draft steps (``draft_cost`` of a target decode step each) and one
    verification (``verify_time`` decode steps: about 1 while verification is memory-bound, see
    :func:`verification_roofline`), and emits :func:`expected_tokens_per_round` tokens; plain decoding
    emits one token per decode step.
    """
    draft_cost = check_float(draft_cost, "draft_cost", min=0.0)
    verify_time = check_float(verify_time, "verify_time", min=0.0, min_open=True)
    return expected_tokens_per_round(acceptance, k) / (verify_time + k * draft_cost)


# Llama-2-7B's parameters (Touvron et al., 2023), for the roofline of one verification step.
PUBLISHED_PARAMETERS_7B = 6.74e9


def verification_roofline(
    ks: Sequence[int] = (0, 1, 4, 16, 64, 256, 1024),
    *,
    accelerator: str = "H100-SXM",
    model: str = "Llama-2-7B",
    parameters: float = PUBLISHED_PARAMETERS_7B,
    context: int = 4096,
) -> list[dict]:
    """Chapter 02's roofline for one target step that scores ``k + 1`` tokens (batch 1, fp16).

    The step reads every weight and the whole KV cache once, whatever ``k``; its FLOPs grow with
    ``k + 1`` (two per weight per token, plus attention). One row per ``k``: ``intensity`` of the
    weight matrices (:func:`course_lib.hardware.gemm_intensity` with ``M = k + 1``),
    ``flops_per_byte`` of the whole step, the time bound and its roof, and ``relative_time``
    against ``k = 0`` (one plain decode step): about 1 while the step stays memory-bound, which is
    why ``k`` drafted tokens are verified for the price of one decode step.
    """
    device = ACCELERATORS[check_choice(accelerator, "accelerator", ACCELERATORS)]
    config = MODEL_CONFIGS[check_choice(model, "model", MODEL_CONFIGS)]
    parameters = check_float(parameters, "parameters", min=0.0, min_open=True)
    context = check_int(context, "context", min=1)
    weight_bytes = 2 * parameters

    def step(tokens: int) -> tuple[float, float, float, str]:
        bytes_moved = weight_bytes + kv_cache_bytes(config, context + tokens)
        attention = config["num_layers"] * attention_flops(
            tokens, context + tokens, config["head_dim"], num_heads=config["num_heads"], causal=True
        )
        flops = 2 * parameters * tokens + attention
        seconds, bound = time_bound(flops, bytes_moved, device.peak_flops_16bit, device.memory_bandwidth)
        return flops, bytes_moved, seconds, bound

    base = step(1)[2]
    rows = []
    for k in ks:
        tokens = check_int(k, "ks", min=0) + 1
        flops, bytes_moved, seconds, bound = step(tokens)
        rows.append(
            {
                "k": k,
                "tokens": tokens,
                "intensity": gemm_intensity(tokens, config["hidden_size"], config["hidden_size"]),
                "flops_per_byte": flops / bytes_moved,
                "seconds": seconds,
                "bound": bound,
                "relative_time": seconds / base,
            }
        )
    return rows
