"""Test setup: headless plotting, deterministic seeds, and hypothesis settings."""

import matplotlib
import matplotlib.pyplot as plt
import pytest
import torch
from hypothesis import settings

matplotlib.use("Agg")

# Small, deadline-free hypothesis runs keep the suite fast and stable on a 2-core CPU.
settings.register_profile("course", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("course")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _recall_record(mixer, seed, accuracy, state, stop="converged", steps=1200, kind="final", d_model=64):
    """One run's record shaped as course_lib.studies.recall_study.train_run returns it, by hand."""
    lengths = [str(T) for T in accuracy]
    return {
        "mixer": mixer,
        "lengths": [int(T) for T in lengths],
        "lr": 3e-3,
        "seed": seed,
        "d_model": d_model,
        "kind": kind,
        "accuracy": dict(accuracy),
        "curve": [(steps, dict(accuracy))],
        "steps": steps,
        "stop": stop,
        # two distance bins per length: near answers right more often than far ones
        "by_distance": {
            T: [[1, 8, min(1.0, a + 0.1)], [8, 16, a - 0.1], [16, 32, None]] for T, a in accuracy.items()
        },
        "state_bytes": {T: state[T] for T in lengths},
        "parameters": 1000,
        "seconds": 10.0,
    }


@pytest.fixture
def fake_recall_summary():
    """A partial recall-study summary, written by hand and passed through ``summarise``: a sweep of
    two mixers, final runs of attention (seeds 0 and 1) and GLA (seed 0 only), one state-sweep run."""
    from course_lib.studies import recall_study

    sweep = [
        {"mixer": "attention", "lr": 1e-3, "accuracy": {"64": 0.99}, "steps": 700, "stop": "converged"},
        {"mixer": "attention", "lr": 3e-3, "accuracy": {"64": 1.0}, "steps": 400, "stop": "converged"},
        {"mixer": "gla", "lr": 3e-3, "accuracy": {"64": 0.91}, "steps": 1500, "stop": "cap"},
        {"mixer": "gla", "lr": 1e-2, "accuracy": {"64": 0.30}, "steps": 1500, "stop": "cap"},
    ]
    kv = {"64": 65536, "128": 131072, "256": 262144}
    fixed = {"64": 8192, "128": 8192, "256": 8192}
    final = [
        _recall_record("attention", 0, {"64": 1.0, "128": 0.99, "256": 0.97}, kv),
        _recall_record("attention", 1, {"64": 1.0, "128": 0.98, "256": 0.95}, kv),
        _recall_record("gla", 0, {"64": 0.95, "128": 0.6, "256": 0.3}, fixed, stop="cap", steps=2400),
    ]
    state = [
        _recall_record("gla", 0, {"128": 0.5}, {"128": 4096}, kind="state", d_model=32),
    ]
    return recall_study.summarise(sweep, final, state)
