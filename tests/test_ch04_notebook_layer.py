"""Chapter 04's notebook layer: widgets driven headlessly, figures, benchmark suites."""

import math

import ipywidgets
import pytest
import torch

from course_lib.bench import sweep
from course_lib.benchmarks.ch04 import SUITES, decode_suite, kv_cache_suite
from course_lib.figures import FIGURES
from course_lib.hardware import ACCELERATORS
from course_lib.kv_cache import MODEL_CONFIGS
from course_lib.widgets import ch04 as w


def controls(widget):
    return {c.description: c for c in widget.children if isinstance(c, ipywidgets.ValueWidget)}


# --- (a) KV-cache calculator ----------------------------------------------------------------------


def test_calculator_reproduces_llama_2_70b_at_128k():
    view = w.kv_calculator_view("Llama-2-70B", 131072, 1, "float16", "as published", "RTX-4090")
    assert view["bytes_per_token"] == 80 * 8 * 128 * 2 * 2  # 320 KiB, by hand
    assert view["bytes"] == 40 * 2**30
    assert view["fits_requests"] == 0 and not view["fits"]
    assert "do not fit" in view["html"]


def test_calculator_overrides_and_dtypes():
    mha = w.kv_calculator_view("Llama-2-70B", 1024, 1, "float16", "MHA (kv heads = heads)")
    mqa = w.kv_calculator_view("Llama-2-70B", 1024, 1, "float16", "MQA (1 kv head)")
    assert mha["bytes"] == 8 * w.kv_calculator_view("Llama-2-70B", 1024)["bytes"]
    assert mha["bytes"] == 64 * mqa["bytes"]
    int4 = w.kv_calculator_view("Llama-3-8B", 4096, 2, "int4")
    assert int4["bytes"] == 32 * 8 * 128 * 2 * 4096 * 2 * 0.5
    # Without the weights, an H200 holds floor(141e9 / one sequence) sequences.
    view = w.kv_calculator_view("Llama-3-8B", 4096, 1, "float16", accelerator="H200-SXM", count_weights=False)
    assert view["fits_requests"] == int(141e9 // (128 * 1024 * 4096))


def test_calculator_reacts_to_every_control():
    box = w.kv_calculator()
    widget = box.interactive
    c = controls(widget)
    assert set(c) >= {"model", "context", "batch", "cache dtype", "attention", "device", "count the weights"}
    for model in c["model"].options:
        c["model"].value = model
        assert widget.result["bytes_per_token"] > 0
        assert box.children[1].value == widget.result["html"]
    c["model"].value = "Llama-2-7B"
    previous = 0
    for context in c["context"].options:
        c["context"].value = context
        assert widget.result["bytes"] > previous
        previous = widget.result["bytes"]
    for batch in (c["batch"].min, c["batch"].max):
        c["batch"].value = batch
        assert widget.result["bytes"] == batch * widget.result["bytes_per_sequence"]
    for dtype in c["cache dtype"].options:
        c["cache dtype"].value = dtype
        assert widget.result["bytes_per_token"] == 32 * 32 * 128 * 2 * w.KV_DTYPE_BYTES[dtype]
    for attention in c["attention"].options:
        c["attention"].value = attention
        assert widget.result["bytes"] > 0
    for device in c["device"].options:
        c["device"].value = device
        assert widget.result["capacity"] == ACCELERATORS[device].memory_bytes
    c["count the weights"].value = False
    assert widget.result["weights_bytes"] == 0
    c["count the weights"].value = True
    assert widget.result["weights_bytes"] == 2 * w.PUBLISHED_PARAMETERS["Llama-2-7B"]


def test_calculator_respects_mistral_window():
    view = w.kv_calculator_view("Mistral-7B", 131072)
    assert view["bytes"] == 4096 * 32 * 8 * 128 * 2 * 2
    assert "sliding-window" in view["html"]


# --- (b) paged-cache viewer -----------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [2, 4, 8])
def test_paged_replay_is_consistent_at_every_step(block_size):
    for step in range(len(w.PAGED_TRACE) + 1):
        view = w.paged_explorer_view(step, block_size, draw=False)
        cache = w.replay_paged_trace(step, block_size)
        # Every block is either free or referenced; counts match the tables.
        referenced = [b for table in view["block_tables"].values() for b in table]
        assert sorted(set(referenced) | set(view["free_blocks"])) == list(range(cache.num_blocks))
        assert not set(referenced) & set(view["free_blocks"])
        for block in set(referenced):
            assert cache.ref_counts[block] == referenced.count(block)
        for seq, table in view["block_tables"].items():
            assert len(table) == math.ceil(view["lengths"][seq] / block_size)
            # Every sequence reads back positions 0 .. length-1 (copy-on-write kept forks intact).
            keys, _ = cache.gather(seq)
            torch.testing.assert_close(keys[0, :, 0], torch.arange(view["lengths"][seq], dtype=torch.float32))
        assert view["report"]["logical_tokens"] == sum(view["lengths"].values())


def test_paged_trace_shows_sharing_and_copy_on_write():
    after_fork = w.paged_explorer_view(3, 4, draw=False)
    assert after_fork["block_tables"]["A"] == after_fork["block_tables"]["B"]
    assert after_fork["report"]["shared_blocks"] == 3
    after_write = w.paged_explorer_view(4, 4, draw=False)
    a, b = after_write["block_tables"]["A"], after_write["block_tables"]["B"]
    assert a[:2] == b[:2] and a[2] != b[2]  # the partly filled last block was copied
    end = w.paged_explorer_view(len(w.PAGED_TRACE), 4, draw=False)
    assert list(end["block_tables"]) == ["D"]


def test_paged_explorer_reacts_to_every_control():
    widget = w.paged_explorer()
    c = controls(widget)
    for block_size in c["block size"].options:
        c["block size"].value = block_size
        for step in range(c["step"].min, c["step"].max + 1):
            c["step"].value = step
            assert widget.result["step"] == step
            assert f"step {step}/" in widget.result["text"]


# --- (c) sampling explorer ------------------------------------------------------------------------


def test_sampling_view_keeps_exactly_the_right_words():
    words = w.SAMPLING_WORDS
    assert w.sampling_explorer_view(1.0, 3, 1.0, draw=False)["kept"] == list(words[:3])
    probabilities = torch.softmax(w.SAMPLING_LOGITS, -1)
    cumulative = probabilities.cumsum(-1) - probabilities
    expected = [word for word, before in zip(words, cumulative.tolist()) if before < 0.6]
    assert w.sampling_explorer_view(1.0, len(words), 0.6, draw=False)["kept"] == expected
    view = w.sampling_explorer_view(1.0, 1, 1.0, draw=False)
    assert set(view["samples"]) == {words[0]}


def test_sampling_explorer_reacts_to_every_control():
    widget = w.sampling_explorer()
    c = controls(widget)
    entropies = []
    for exponent in (c["temperature"].min, 0.0, c["temperature"].max):
        c["temperature"].value = 10**exponent
        p = widget.result["filtered"]
        entropies.append(-(p * p.clamp_min(1e-12).log()).sum().item())
    assert entropies[0] < entropies[1] < entropies[2]
    c["temperature"].value = 1.0
    for k in range(c["top-k"].min, c["top-k"].max + 1):
        c["top-k"].value = k
        assert len(widget.result["kept"]) == k
    for p in (c["top-p"].min, 0.5, c["top-p"].max):
        c["top-p"].value = p
        assert 1 <= len(widget.result["kept"]) <= c["top-k"].value
        torch.testing.assert_close(widget.result["filtered"].sum(), torch.tensor(1.0))
    samples = set()
    for seed in (c["seed"].min, c["seed"].max):
        c["seed"].value = seed
        assert len(widget.result["samples"]) == 20
        samples.add(tuple(widget.result["samples"]))
    assert len(samples) == 2


@pytest.mark.parametrize(
    "call,error,name",
    [
        (lambda: w.kv_calculator_view(model="GPT-5"), ValueError, "model"),
        (lambda: w.kv_calculator_view(seq_len=0), ValueError, "seq_len"),
        (lambda: w.kv_calculator_view(dtype="int3"), ValueError, "dtype"),
        (lambda: w.kv_calculator_view(attention="linear"), ValueError, "attention"),
        (lambda: w.kv_calculator_view(accelerator="TPU"), ValueError, "accelerator"),
        (lambda: w.paged_explorer_view(99, draw=False), ValueError, "step"),
        (lambda: w.paged_explorer_view(1, 0, draw=False), ValueError, "block_size"),
        (lambda: w.sampling_explorer_view(0.0, draw=False), ValueError, "temperature"),
        (lambda: w.sampling_explorer_view(top_k=13, draw=False), ValueError, "top_k"),
        (lambda: w.sampling_explorer_view(top_p=0.0, draw=False), ValueError, "top_p"),
    ],
)
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


def test_paged_explorer_text_breaks_between_numbers():
    # The browser wraps a long printed line at any character, in the middle of a block number.
    from course_lib.widgets._display import TEXT_WIDTH

    for block_size in (2, 4, 8):
        for step in range(len(w.PAGED_TRACE) + 1):
            view = w.paged_explorer_view(step, block_size, draw=False)
            lines = view["text"].splitlines()
            assert max(len(line) for line in lines) <= TEXT_WIDTH
            # the free list, once joined again, is the whole free list
            start = next(i for i, line in enumerate(lines) if "free list" in line)
            end = next(i for i in range(start, len(lines)) if lines[i].rstrip().endswith("]"))
            listed = " ".join(lines[start : end + 1]).split(": ", 1)[1]
            assert [int(n) for n in listed.strip("[]").split(",") if n.strip()] == list(
                reversed(view["free_blocks"])
            )


def test_sampling_explorer_line_fits(capsys):
    from course_lib.widgets._display import TEXT_WIDTH

    for seed in range(5):
        w.sampling_explorer_view(2.0, len(w.SAMPLING_WORDS), 1.0, seed)
    printed = capsys.readouterr().out.splitlines()
    assert printed and max(len(line) for line in printed) <= TEXT_WIDTH


def test_views_draw():
    assert w.paged_explorer_view(5, 4)["figure"] is not None
    assert w.sampling_explorer_view(0.7, 5, 0.9)["figure"] is not None


# --- figures and benchmark suites -----------------------------------------------------------------


def test_figures_are_registered():
    assert {"04_kv_compression", "04_paged_block_table"} <= set(FIGURES)


def test_kv_cache_suite_runs_and_layers_agree_on_width():
    methods, reference, lengths = kv_cache_suite("cpu")
    assert SUITES["kv_cache"] is kv_cache_suite
    assert reference == "mha" and set(methods) == {"mha", "gqa", "mqa", "mla", "prefill", "chunked"}
    assert lengths == sorted(lengths)
    for build in methods.values():
        call = build(48)
        first, second = call(), call()  # the cache is rewound, so a step repeats exactly
        torch.testing.assert_close(first, second)
        assert first.shape[-1] == 512
    torch.testing.assert_close(methods["prefill"](100)(), methods["chunked"](100)(), atol=1e-5, rtol=1e-4)
    results = sweep({"mqa": methods["mqa"]}, [16], min_run_time=0.01, progress=False)
    assert results[0].seconds > 0


def test_decode_suite_cached_step_equals_full_forward():
    methods, reference, _ = decode_suite("cpu")
    assert SUITES["decode"] is decode_suite and reference == "without cache"
    torch.testing.assert_close(
        methods["with cache"](40)(), methods["without cache"](40)(), atol=1e-5, rtol=1e-4
    )


def test_model_configs_cover_the_figure():
    assert set(MODEL_CONFIGS) <= set(w.PUBLISHED_PARAMETERS)
