"""Chapter 04b's notebook layer: the serving explorer driven headlessly, its figures, the serving suites."""

import ipywidgets
import pytest

from course_lib.figures import FIGURES
from course_lib.studies.serving import compare_batching
from course_lib.widgets import ch04 as w


def controls(widget):
    return {c.description: c for c in widget.children if isinstance(c, ipywidgets.ValueWidget)}


def test_serving_explorer_view_is_the_studys_comparison():
    view = w.serving_explorer_view(2.0, 8, 512, 32, num_requests=6, draw=False)
    study = compare_batching(2.0, block_size=8, cache_tokens=512, token_budget=32, num_requests=6)
    for policy in ("static", "continuous"):
        assert view[policy]["steps"] == study[policy]["steps"]
        assert view["timeline"][policy] == study["timeline"][policy]
        assert f"{policy:>11} {study[policy]['steps']:>6}" in view["text"]
    assert view["same_outputs"]


def test_serving_explorer_reacts_to_every_control():
    widget = w.serving_explorer()
    c = controls(widget)
    assert set(c) == {"arrivals/step", "block size", "cache tokens", "token budget"}
    first = widget.result
    assert first["settings"] == dict(
        num_blocks=1024 // 16,
        block_size=16,
        token_budget=64,
        max_running=16,
        rate=0.5,
        num_requests=16,
        seed=0,
    )
    changes = {"arrivals/step": 4.0, "block size": 4, "cache tokens": 256, "token budget": 8}
    for name, value in changes.items():
        c[name].value = value
        settings = widget.result["settings"]
        assert widget.result["same_outputs"]
        assert {
            "arrivals/step": settings["rate"],
            "block size": settings["block_size"],
            "cache tokens": settings["num_blocks"] * settings["block_size"],
            "token budget": settings["token_budget"],
        }[name] == pytest.approx(value)
    # A small pool and a small budget: continuous batching takes more steps than with the defaults.
    assert widget.result["continuous"]["steps"] > first["continuous"]["steps"]


def test_chapter_04b_figures_are_registered():
    assert {"04_cross_layer_kv", "04b_serving_timeline"} <= set(FIGURES)
    figure = FIGURES["04b_serving_timeline"]()
    assert len(figure.axes) == 2 and figure.axes[0].get_legend() is not None


def test_speculative_explorer_view_by_hand():
    view = w.speculative_explorer_view(0.5, 0.1, max_k=3, draw=False)
    assert view["ks"] == [0, 1, 2, 3]
    # tokens per round 1, 1.5, 1.75, 1.875 (1 + a + ... + a^k); verifying <= 4 tokens costs one decode step
    assert view["tokens_per_round"] == [1.0, 1.5, 1.75, 1.875]
    assert all(abs(t - 1) < 1e-3 for t in view["verify_time"])
    expected = [t / (1 + k * 0.1) for k, t in enumerate(view["tokens_per_round"])]
    assert view["speedup"] == pytest.approx(expected, rel=1e-3)
    # 1.5 / 1.1 = 1.36, 1.75 / 1.2 = 1.46, 1.875 / 1.3 = 1.44: a third draft costs more than it brings
    assert view["best_k"] == 2
    # A draft as slow as the target never pays.
    assert w.speculative_explorer_view(0.9, 1.0, draw=False)["best_k"] == 0


def test_speculative_explorer_reacts_to_every_control():
    widget = w.speculative_explorer()
    c = controls(widget)
    assert set(c) == {"acceptance", "draft cost", "device", "context"}
    before = widget.result["speedup"]
    for name, value in {
        "acceptance": 0.9,
        "draft cost": 0.2,
        "device": "RTX-4090",
        "context": 131072,
    }.items():
        c[name].value = value
        assert widget.result["speedup"] != before
        before = widget.result["speedup"]
