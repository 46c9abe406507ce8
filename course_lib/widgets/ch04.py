"""Chapter 04's explorers: a KV-cache calculator, a paged-cache viewer, a sampling explorer, and
(chapter 04b) a serving explorer (static vs continuous batching on one trace) and a speculative
decoding explorer (tokens per round and speed-up vs k, from the roofline)."""

from __future__ import annotations

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch

from ..checks import check_choice, check_float, check_int
from ..decoding import filter_logits
from ..hardware import ACCELERATORS
from ..kv_cache import MODEL_CONFIGS, kv_cache_bytes
from ..measure import format_bytes
from ..studies.paged_trace import PAGED_TRACE, draw_paged_cache, replay_paged_trace
from ..studies.serving import (
    compare_batching,
    draw_batching,
    expected_tokens_per_round,
    speculative_speedup,
    verification_roofline,
)
from ..viz import STYLE
from ._display import new_figure, show, widen_labels, wrap_line

__all__ = [
    "KV_DTYPE_BYTES",
    "ATTENTION_OVERRIDES",
    "PUBLISHED_PARAMETERS",
    "kv_calculator_view",
    "kv_calculator",
    "PAGED_TRACE",
    "replay_paged_trace",
    "draw_paged_cache",
    "paged_explorer_view",
    "paged_explorer",
    "SAMPLING_WORDS",
    "SAMPLING_LOGITS",
    "sampling_explorer_view",
    "sampling_explorer",
    "serving_explorer_view",
    "serving_explorer",
    "speculative_explorer_view",
    "speculative_explorer",
]

# --- (a) KV-cache calculator ---------------------------------------------------------------------

# Bytes per cached number. int8 / int4 are KIVI-style codes; their per-group scale and minimum add a
# few percent (chapter 04, section 6), not counted here.
KV_DTYPE_BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "int8": 1.0, "int4": 0.5}
ATTENTION_OVERRIDES = ("as published", "MHA (kv heads = heads)", "GQA (8 kv heads)", "MQA (1 kv head)")

# Total parameter counts from each model's paper or model card (for the weights that share the
# accelerator with the cache, stored in 16 bits). DeepSeek-V2/V3 are mixture-of-experts models:
# all experts must be resident even though only 21B / 37B parameters are active per token.
PUBLISHED_PARAMETERS = {
    "Llama-2-7B": 6.74e9,
    "Llama-2-70B": 68.98e9,
    "Llama-3-8B": 8.03e9,
    "Llama-3-70B": 70.55e9,
    "Mistral-7B": 7.24e9,
    "Qwen2.5-7B": 7.61e9,
    "Gemma-7B": 8.54e9,
    "Gemma-2B": 2.51e9,
    "DeepSeek-V2": 236e9,
    "DeepSeek-V3": 671e9,
}


def _override(config: dict, attention: str) -> dict:
    """The model's config with its attention replaced (MLA models use head_dim for K and V)."""
    check_choice(attention, "attention", ATTENTION_OVERRIDES)
    if attention == "as published":
        return dict(config)
    kv_heads = {"MHA": config["num_heads"], "GQA": min(8, config["num_heads"]), "MQA": 1}[attention[:3]]
    return dict(config, attention=attention[:3].lower(), num_kv_heads=kv_heads)


def kv_calculator_view(
    model: str = "Llama-2-70B",
    seq_len: int = 131072,
    batch: int = 1,
    dtype: str = "float16",
    attention: str = "as published",
    accelerator: str = "RTX-4090",
    count_weights: bool = True,
) -> dict:
    """KV-cache bytes of ``batch`` sequences of ``seq_len`` tokens, and how many fit ``accelerator``.

    ``fits_requests`` is how many sequences of ``seq_len`` tokens fit the accelerator's memory
    after the 16-bit weights (when ``count_weights``); 0 when even the weights do not fit.
    """
    check_choice(model, "model", MODEL_CONFIGS)
    seq_len = check_int(seq_len, "seq_len", min=1)
    batch = check_int(batch, "batch", min=1)
    check_choice(dtype, "dtype", KV_DTYPE_BYTES)
    check_choice(accelerator, "accelerator", ACCELERATORS)
    config = _override(MODEL_CONFIGS[model], attention)
    scale = KV_DTYPE_BYTES[dtype] / 2  # kv_cache_bytes in float16, then rescaled
    total = kv_cache_bytes(config, seq_len, batch, torch.float16) * scale
    per_sequence = kv_cache_bytes(config, seq_len, 1, torch.float16) * scale
    per_token = kv_cache_bytes(config, 1, 1, torch.float16) * scale
    capacity = ACCELERATORS[accelerator].memory_bytes
    weights = 2 * PUBLISHED_PARAMETERS[model] if count_weights else 0.0
    free = max(capacity - weights, 0.0)
    fits_requests = int(free // per_sequence)
    window = config.get("sliding_window")
    note = (
        f"<br><i>{model} keeps at most {window} tokens (sliding-window rolling buffer)</i>"
        if window and seq_len > window
        else ""
    )
    html = (
        f"<b>{model}</b>, {config.get('attention', 'gqa').upper()}, cache in {dtype}: "
        f"{format_bytes(per_token)} per token<br>"
        f"{batch} x {seq_len:,} tokens: <b>{format_bytes(total)}</b> of KV cache{note}<br>"
        f"{accelerator}: {capacity / 1e9:.0f} GB"
        + (f", weights (16-bit) {weights / 1e9:.0f} GB" if count_weights else "")
        + f" &rarr; <b>{fits_requests}</b> sequence(s) of {seq_len:,} tokens fit"
        + (" <b>(the weights alone do not fit)</b>" if count_weights and weights > capacity else "")
    )
    return {
        "bytes": total,
        "bytes_per_sequence": per_sequence,
        "bytes_per_token": per_token,
        "weights_bytes": weights,
        "capacity": capacity,
        "fits_requests": fits_requests,
        "fits": total + weights <= capacity,
        "html": html,
    }


def kv_calculator() -> widgets.Widget:
    """Model, context, batch, dtype, attention type and accelerator -> cache bytes and requests that fit."""
    out = widgets.HTML()

    def update(**controls) -> dict:
        view = kv_calculator_view(**controls)
        out.value = view["html"]
        return view

    controls = widgets.interactive(
        update,
        model=widgets.Dropdown(options=list(MODEL_CONFIGS), value="Llama-2-70B", description="model"),
        seq_len=widgets.SelectionSlider(
            options=[2**p for p in range(9, 21)], value=131072, description="context"
        ),
        batch=widgets.IntSlider(value=1, min=1, max=256, description="batch"),
        dtype=widgets.Dropdown(options=list(KV_DTYPE_BYTES), value="float16", description="cache dtype"),
        attention=widgets.Dropdown(
            options=ATTENTION_OVERRIDES, value="as published", description="attention"
        ),
        accelerator=widgets.Dropdown(options=list(ACCELERATORS), value="RTX-4090", description="device"),
        count_weights=widgets.Checkbox(value=True, description="count the weights"),
    )
    box = widgets.VBox([controls, out])
    box.interactive = controls
    return widen_labels(box)


# --- (b) paged-cache viewer ------------------------------------------------------------------------


def _describe(operation: tuple) -> str:
    kind, seq, argument = operation
    return {
        "add": f"add request {seq} with a {argument}-token prompt",
        "grow": f"decode {argument} more token(s) of {seq}",
        "fork": f"fork {seq} -> {argument} (shares every block)",
        "free": f"free {seq}",
    }[kind]


def paged_explorer_view(step: int = 4, block_size: int = 4, *, draw: bool = True) -> dict:
    """Replay the trace up to ``step``: block tables, free list, shared blocks and fragmentation."""
    cache = replay_paged_trace(step, block_size)
    report = cache.fragmentation_report()
    tables = {seq: cache.block_table(seq) for seq in cache.block_tables}
    lengths = dict(cache.lengths)
    last = _describe(PAGED_TRACE[step - 1]) if step else "empty pool"
    lines = [f"step {step}/{len(PAGED_TRACE)}: {last}"]
    lines += [f"  {seq}: length {lengths[seq]:>2}, block table {tables[seq]}" for seq in tables]
    lines.append(f"  free list ({len(cache.free_blocks)} blocks): {list(reversed(cache.free_blocks))}")
    lines.append(
        f"  allocated {report['allocated_slots']} slots, used {report['used_slots']}, "
        f"wasted {report['wasted_slots']} ({1 - report['utilisation']:.0%}); "
        f"{report['shared_blocks']} shared block(s), {report['logical_tokens']} logical tokens"
    )
    view = {
        "step": step,
        "operation": last,
        "block_tables": tables,
        "lengths": lengths,
        "free_blocks": list(cache.free_blocks),
        "report": report,
        "text": "\n".join(wrap_line(line) for line in lines),
    }
    if draw:
        print(view["text"])
        ax = draw_paged_cache(cache, title=f"physical blocks of {block_size} slots (hatched: shared)")
        show(ax.figure)  # not plt.show(): see course_lib.widgets._display
        view["figure"] = ax.figure
    return view


def paged_explorer() -> widgets.Widget:
    """Step through :data:`PAGED_TRACE` (add, grow, fork, free) with a chosen block size."""
    explorer = widgets.interactive(
        paged_explorer_view,
        step=widgets.IntSlider(value=4, min=0, max=len(PAGED_TRACE), description="step"),
        block_size=widgets.Dropdown(options=[2, 4, 8], value=4, description="block size"),
        draw=widgets.fixed(True),
    )
    return widen_labels(explorer)


# --- (c) sampling explorer ----------------------------------------------------------------------------

# A made-up next-word distribution after "the cat sat on the": a few likely words and a long tail.
SAMPLING_WORDS = (
    "mat",
    "sofa",
    "floor",
    "chair",
    "bed",
    "roof",
    "table",
    "dog",
    "moon",
    "piano",
    "idea",
    "of",
)
SAMPLING_LOGITS = torch.tensor([3.0, 2.2, 2.0, 1.6, 1.4, 0.6, 0.5, -0.2, -0.8, -1.0, -1.5, -2.5])


def sampling_explorer_view(
    temperature: float = 1.0,
    top_k: int = 12,
    top_p: float = 1.0,
    seed: int = 0,
    num_samples: int = 20,
    *,
    draw: bool = True,
) -> dict:
    """Filter :data:`SAMPLING_LOGITS` (temperature, then top-k, then top-p) and draw samples.

    ``top_k = len(SAMPLING_WORDS)`` and ``top_p = 1`` switch those filters off. Returns the
    original and filtered probabilities, the kept words and ``num_samples`` seeded samples.
    """
    temperature = check_float(temperature, "temperature", min=0.0, min_open=True)
    top_k = check_int(top_k, "top_k", min=1, max=len(SAMPLING_WORDS))
    top_p = check_float(top_p, "top_p", min=0.0, max=1.0, min_open=True)
    num_samples = check_int(num_samples, "num_samples", min=1)
    generator = torch.Generator().manual_seed(check_int(seed, "seed"))
    original = torch.softmax(SAMPLING_LOGITS, -1)
    filtered = torch.softmax(
        filter_logits(SAMPLING_LOGITS, temperature=temperature, top_k=top_k, top_p=top_p), -1
    )
    samples = torch.multinomial(filtered, num_samples, replacement=True, generator=generator)
    words = [SAMPLING_WORDS[i] for i in samples.tolist()]
    kept = [w for w, p in zip(SAMPLING_WORDS, filtered.tolist()) if p > 0]
    view = {"original": original, "filtered": filtered, "kept": kept, "samples": words}
    if draw:
        figure = new_figure((9, 3.2))
        with plt.rc_context(STYLE):
            ax = figure.add_subplot()
            positions = list(range(len(SAMPLING_WORDS)))
            ax.bar(
                [x - 0.2 for x in positions],
                original.tolist(),
                width=0.4,
                label="softmax of the logits",
                color="#bbbbbb",
            )
            ax.bar(
                [x + 0.2 for x in positions],
                filtered.tolist(),
                width=0.4,
                label="after temperature / top-k / top-p",
            )
            ax.set_xticks(positions, SAMPLING_WORDS)
            ax.set_ylabel("probability")
            ax.set_title(f"'the cat sat on the ...'  T={temperature:g}, top-k={top_k}, top-p={top_p:g}")
            ax.legend(frameon=False)
            figure.tight_layout()
            show(figure)
        print(wrap_line(f"kept {len(kept)} word(s); {num_samples} samples (seed {seed}): {' '.join(words)}"))
        view["figure"] = figure
    return view


def sampling_explorer() -> widgets.Widget:
    """Temperature, top-k, top-p and seed -> the filtered next-word distribution and samples."""
    explorer = widgets.interactive(
        sampling_explorer_view,
        temperature=widgets.FloatLogSlider(
            value=1.0, base=10, min=-1, max=1, step=0.1, description="temperature"
        ),
        top_k=widgets.IntSlider(
            value=len(SAMPLING_WORDS), min=1, max=len(SAMPLING_WORDS), description="top-k"
        ),
        top_p=widgets.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05, description="top-p"),
        seed=widgets.IntSlider(value=0, min=0, max=20, description="seed"),
        num_samples=widgets.fixed(20),
        draw=widgets.fixed(True),
    )
    return widen_labels(explorer)


# --- (d) serving explorer: static vs continuous batching ------------------------------------------


def serving_explorer_view(
    rate: float = 0.5,
    block_size: int = 16,
    cache_tokens: int = 1024,
    token_budget: int = 64,
    *,
    num_requests: int = 16,
    draw: bool = True,
) -> dict:
    """Serve one trace with static and with continuous batching (the computation is
    :func:`course_lib.studies.serving.compare_batching`).

    Returns that function's result with ``text``, a small table of both policies; with ``draw``,
    prints it and draws the cache's stored and reserved slots over time.
    """
    result = compare_batching(
        rate,
        block_size=block_size,
        cache_tokens=cache_tokens,
        token_budget=token_budget,
        num_requests=num_requests,
    )
    lines = [
        *wrap_line(
            f"{num_requests} requests at {rate:.3g} per step; pool of {cache_tokens // block_size} blocks of "
            f"{block_size} tokens; continuous batching feeds at most {token_budget} tokens per step"
        ).split("\n"),
        f"{'policy':>11} {'steps':>6} {'tokens/step':>11} {'TTFT':>6} {'TPOT':>5} {'used/reserved':>13} "
        f"{'preempted':>9} {'tokens/s':>9}",
    ]
    for policy in ("static", "continuous"):
        m = result[policy]
        lines.append(
            f"{policy:>11} {m['steps']:>6} {m['tokens_per_step']:>11.2f} {m['mean_ttft']:>6.1f} "
            f"{m['mean_tpot']:>5.2f} {m['mean_utilisation']:>13.0%} {m['preemptions']:>9} "
            f"{m['tokens_per_second']:>9.0f}"
        )
    lines.extend(
        wrap_line(
            "TTFT, TPOT: mean time to first token and per later token, in engine steps; "
            "tokens/s is measured (noisy)"
        ).split("\n")
    )
    result["text"] = "\n".join(lines)
    if draw:
        print(result["text"])
        figure = draw_batching(result)
        show(figure)
        result["figure"] = figure
    return result


def serving_explorer() -> widgets.Widget:
    """Arrival rate, block size, cache size and token budget -> static vs continuous batching on one trace."""
    explorer = widgets.interactive(
        serving_explorer_view,
        rate=widgets.FloatLogSlider(
            value=0.5,
            base=10,
            min=-1.3,
            max=1,
            step=0.1,
            description="arrivals/step",
            continuous_update=False,
        ),
        block_size=widgets.Dropdown(options=[4, 8, 16, 32], value=16, description="block size"),
        cache_tokens=widgets.SelectionSlider(
            options=[256, 512, 1024, 2048], value=1024, description="cache tokens", continuous_update=False
        ),
        token_budget=widgets.SelectionSlider(
            options=[8, 16, 32, 64, 128, 256], value=64, description="token budget", continuous_update=False
        ),
        num_requests=widgets.fixed(16),
        draw=widgets.fixed(True),
    )
    return widen_labels(explorer)


# --- (e) speculative decoding explorer -------------------------------------------------------------


def speculative_explorer_view(
    acceptance: float = 0.7,
    draft_cost: float = 0.05,
    accelerator: str = "H100-SXM",
    context: int = 4096,
    *,
    max_k: int = 16,
    draw: bool = True,
) -> dict:
    """Modelled speed-up of speculative decoding vs ``k`` for a Llama-2-7B target on ``accelerator``.

    Each round verifies ``k + 1`` tokens in one target step (its time from chapter 02's roofline,
    :func:`course_lib.studies.serving.verification_roofline`) after ``k`` draft steps of
    ``draft_cost`` target decode steps each, and emits
    :func:`~course_lib.studies.serving.expected_tokens_per_round` tokens. Returns ``ks``,
    ``tokens_per_round``, ``verify_time`` (in decode steps), ``speedup`` and the best ``k``.
    """
    max_k = check_int(max_k, "max_k", min=1)
    ks = list(range(max_k + 1))
    roofline = verification_roofline(ks, accelerator=accelerator, context=context)
    tokens = [expected_tokens_per_round(acceptance, k) for k in ks]
    verify = [row["relative_time"] for row in roofline]
    speedup = [
        speculative_speedup(acceptance, k, draft_cost=draft_cost, verify_time=time)
        for k, time in zip(ks, verify)
    ]
    best = max(ks, key=lambda k: speedup[k])
    view = {
        "ks": ks,
        "tokens_per_round": tokens,
        "verify_time": verify,
        "speedup": speedup,
        "best_k": best,
        "text": wrap_line(
            f"acceptance {acceptance:.2f}, draft step = {draft_cost:.2f} target steps, {accelerator}, "
            f"{context:,} cached tokens: best k = {best}, {tokens[best]:.2f} tokens per round, "
            f"speed-up {speedup[best]:.2f}x (verifying {best + 1} tokens costs {verify[best]:.3f} "
            "decode steps)"
        ),
    }
    if draw:
        with plt.rc_context(STYLE):
            figure = new_figure((8, 3.2))
            ax = figure.subplots()
            ax.plot(ks, tokens, marker="o", ms=3, label="tokens per round (expected)")
            ax.plot(ks, speedup, marker="o", ms=3, label="speed-up over plain decoding")
            ax.axhline(1, color="grey", lw=0.8)
            ax.axvline(best, color="grey", lw=0.8, ls=":")
            ax.set_xlabel("k, tokens drafted per round")
            ax.set_title(f"acceptance {acceptance:.2f}, draft cost {draft_cost:.2f}", fontsize=9)
            ax.legend(frameon=False, fontsize=8)
            figure.tight_layout()
            show(figure)
        print(view["text"])
        view["figure"] = figure
    return view


def speculative_explorer() -> widgets.Widget:
    """Acceptance rate, draft cost, accelerator and context -> tokens per round and speed-up vs k."""
    explorer = widgets.interactive(
        speculative_explorer_view,
        acceptance=widgets.FloatSlider(value=0.7, min=0.0, max=0.99, step=0.01, description="acceptance"),
        draft_cost=widgets.FloatSlider(value=0.05, min=0.0, max=1.0, step=0.01, description="draft cost"),
        accelerator=widgets.Dropdown(options=list(ACCELERATORS), value="H100-SXM", description="device"),
        context=widgets.SelectionSlider(
            options=[2**p for p in range(10, 18)], value=4096, description="context"
        ),
        max_k=widgets.fixed(16),
        draw=widgets.fixed(True),
    )
    return widen_labels(explorer)
