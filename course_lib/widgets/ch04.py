"""Chapter 04's explorers: a KV-cache calculator, a paged-cache viewer and a sampling explorer."""

from __future__ import annotations

import math

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Rectangle

from ..bench import format_bytes
from ..checks import check_choice, check_float, check_int
from ..decoding import filter_logits
from ..hardware import ACCELERATORS
from ..kv_cache import MODEL_CONFIGS, PagedKVCache, kv_cache_bytes
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

# A small serving trace: (operation, sequence, argument). "add" starts a request with a prompt of
# n tokens, "grow" decodes n more tokens, "fork" starts a sequence sharing the parent's blocks
# (parallel sampling / beams), "free" ends a request.
PAGED_TRACE: tuple[tuple[str, str, object], ...] = (
    ("add", "A", 6),
    ("grow", "A", 3),
    ("fork", "A", "B"),
    ("grow", "B", 1),
    ("grow", "A", 2),
    ("add", "C", 10),
    ("free", "A", None),
    ("grow", "B", 4),
    ("grow", "C", 3),
    ("add", "D", 5),
    ("free", "B", None),
    ("grow", "D", 6),
    ("free", "C", None),
)
_COLOURS = {"A": "#0072B2", "B": "#D55E00", "C": "#009E73", "D": "#CC79A7"}


def _describe(operation: tuple) -> str:
    kind, seq, argument = operation
    return {
        "add": f"add request {seq} with a {argument}-token prompt",
        "grow": f"decode {argument} more token(s) of {seq}",
        "fork": f"fork {seq} -> {argument} (shares every block)",
        "free": f"free {seq}",
    }[kind]


def replay_paged_trace(step: int, block_size: int = 4, num_blocks: int | None = None) -> PagedKVCache:
    """A ``PagedKVCache`` after the first ``step`` operations of :data:`PAGED_TRACE`.

    Every token's key and value hold its position, so copies are visible in the storage. The
    default pool holds 64 token slots.
    """
    step = check_int(step, "step", min=0, max=len(PAGED_TRACE))
    block_size = check_int(block_size, "block_size", min=1)
    num_blocks = (
        math.ceil(64 / block_size) if num_blocks is None else check_int(num_blocks, "num_blocks", min=1)
    )
    cache = PagedKVCache(num_blocks, block_size, 1, 1)
    for kind, seq, argument in PAGED_TRACE[:step]:
        if kind == "add":
            cache.add_sequence(seq)
        if kind in ("add", "grow"):
            start = cache.length(seq)
            tokens = torch.arange(start, start + argument, dtype=torch.float32).view(1, argument, 1)
            cache.append(seq, tokens, tokens)
        elif kind == "fork":
            cache.fork(seq, argument)
        elif kind == "free":
            cache.free(seq)
    return cache


def draw_paged_cache(cache: PagedKVCache, ax=None, title: str | None = None):
    """Physical blocks as rows of slots, coloured by owner; shared blocks hatched; free blocks empty."""
    owners: dict[int, list[str]] = {}
    for seq, table in cache.block_tables.items():
        for block in table:
            owners.setdefault(block, []).append(str(seq))
    with plt.rc_context(STYLE):
        if ax is None:
            ax = new_figure((9, 2.8)).add_subplot()
        per_row = 8
        for block in range(cache.num_blocks):
            row, column = divmod(block, per_row)
            x0, y0 = column * (cache.block_size + 1), -row * 1.6
            names = owners.get(block, [])
            colour = _COLOURS.get(names[0], "#999999") if names else "white"
            for slot in range(cache.block_size):
                filled = names and slot < cache.block_fill[block]
                ax.add_patch(
                    Rectangle(
                        (x0 + slot, y0),
                        1,
                        1,
                        facecolor=colour if filled else "white",
                        edgecolor="black",
                        linewidth=0.6,
                        hatch="///" if len(names) > 1 and filled else None,
                    )
                )
            label = f"{block}" + (f": {'+'.join(names)}" if names else " free")
            ax.text(x0, y0 + 1.15, label, fontsize=7)
        rows = math.ceil(cache.num_blocks / per_row)
        ax.set_xlim(-0.5, per_row * (cache.block_size + 1))
        ax.set_ylim(-(rows - 1) * 1.6 - 0.3, 1.7)
        ax.set_aspect("equal")
        ax.axis("off")
        if title:
            ax.set_title(title)
    return ax


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
