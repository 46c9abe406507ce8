"""Chapter 08's notebook layer: widgets (headless), exercise checkers, figures, bench suites."""

import ipywidgets
import matplotlib
import pytest
import torch

from course_lib.bench import Measurement, sweep
from course_lib.benchmarks import ch08 as bench08
from course_lib.benchmarks.ch07 import recurrent_inputs
from course_lib.exercises import ExerciseFailed
from course_lib.exercises.ch08 import check_answer_accuracy, check_hybrid_cache_bytes, check_ring_merge
from course_lib.figures import FIGURES
from course_lib.recall import IGNORE
from course_lib.widgets import ch08 as w08

matplotlib.use("Agg")

FAKE = [
    Measurement(m, T, s * T / 256, b * T)
    for m, s, b in (("naive", 1e-3, 4000), ("sdpa", 5e-4, 100), ("linear", 2e-3, 50))
    for T in (256, 512, 1024)
]


def controls(widget):
    return {c.description: c for c in widget.children if isinstance(c, ipywidgets.ValueWidget)}


def test_comparison_view_reads_the_measurements():
    view = w08.comparison_view(("naive", "linear"), (256, 512), "time", results=FAKE, draw=False)
    assert view["lengths"] == [256, 512]
    assert view["series"]["naive"] == pytest.approx([1.0, 2.0])
    memory = w08.comparison_view(("sdpa",), (256, 1024), "memory", results=FAKE, draw=False)
    assert memory["series"]["sdpa"] == [25600, 51200, 102400]
    with pytest.raises(ValueError, match="mechanisms"):
        w08.comparison_view(("flash",), (256, 512), results=FAKE, draw=False)
    with pytest.raises(ValueError, match="lengths"):
        w08.comparison_view(("sdpa",), (600, 700), results=FAKE, draw=False)
    with pytest.raises(ValueError, match="metric"):
        w08.comparison_view(("sdpa",), (256, 512), "flops", results=FAKE, draw=False)


def test_comparison_explorer_updates_across_its_controls():
    w = w08.comparison_explorer(FAKE)
    c = controls(w)
    for names in (("naive",), ("sdpa", "linear"), ("naive", "sdpa", "linear")):
        c["mechanisms"].value = names
        assert list(w.result["series"]) == list(names)
    for index in ((0, 0), (0, 2), (1, 2)):
        c["T range"].index = index
        assert w.result["lengths"] == [256, 512, 1024][index[0] : index[1] + 1]
    for metric in w08.METRICS:
        c["metric"].value = metric
        assert w.result["metric"] == metric


def test_stored_results_load():
    results = w08.load_results()
    assert {"naive", "sdpa", "flash", "linear", "gla", "delta_rule", "ssd", "window"} <= {
        r.method for r in results
    }


def test_decision_guide_follows_the_cache_arithmetic():
    per_token = w08.kv_cache_bytes_per_token(32)
    assert per_token == 2 * 32 * 32 * 128 * 2  # 0.5 MiB per token for a Llama-2-7B shape in fp16
    small = w08.decision_guide_view(1024, 8.0, True, False, draw=False)
    assert small["chapter"] == "03" and small["mha_cache"] == 1024 * per_token
    decode = w08.decision_guide_view(1024, 8.0, True, True, draw=False)
    assert decode["chapter"] == "04"
    huge_exact = w08.decision_guide_view(2**20, 1.0, True, True, draw=False)
    assert "ring" in huge_exact["recommendation"]
    huge_approx = w08.decision_guide_view(2**20, 1.0, False, False, draw=False)
    assert huge_approx["chapter"] == "07"
    with pytest.raises(ValueError, match="memory_gib"):
        w08.decision_guide_view(1024, 0.0, draw=False)


def test_decision_guide_widget_updates_across_its_controls():
    w = w08.decision_guide()
    c = controls(w)
    seen = set()
    for T in c["seq_len"].options:
        c["seq_len"].value = T
        seen.add(w.result["chapter"])
    for gib in (c["GiB"].min, c["GiB"].max):
        c["GiB"].value = 2**gib
        assert w.result["mha_cache"] > 0
    for flag in ("exact needed", "decode-heavy"):
        for value in (False, True):
            c[flag].value = value
            assert "recommendation" in w.result
    assert len(seen) >= 2


def merge(o1, lse1, o2, lse2):
    lse = torch.logaddexp(lse1, lse2)
    return torch.exp(lse1 - lse)[..., None] * o1 + torch.exp(lse2 - lse)[..., None] * o2, lse


def test_ring_merge_checker():
    check_ring_merge(merge)
    with pytest.raises(ExerciseFailed, match="merged output"):
        check_ring_merge(lambda o1, l1, o2, l2: ((o1 + o2) / 2, torch.logaddexp(l1, l2)))
    with pytest.raises(ExerciseFailed, match="not implemented"):
        check_ring_merge(lambda *a: (_ for _ in ()).throw(NotImplementedError))


def test_answer_accuracy_checker():
    def right(logits, targets):
        answers = targets != IGNORE
        return (logits.argmax(-1)[answers] == targets[answers]).float().mean().item()

    def wrong(logits, targets):
        return (logits.argmax(-1) == targets).float().mean().item()

    check_answer_accuracy(right)
    with pytest.raises(ExerciseFailed, match="IGNORE"):
        check_answer_accuracy(wrong)
    with pytest.raises(ExerciseFailed, match="not implemented"):
        check_answer_accuracy(lambda *a: (_ for _ in ()).throw(NotImplementedError))


def test_hybrid_cache_checker():
    def right(pattern, T, H, D, w):
        per = {"full": 2 * H * T * D * 4, "window": 2 * H * min(w, T) * D * 4, "linear": H * D * (D + 1) * 4}
        return sum(per[k] for k in pattern)

    check_hybrid_cache_bytes(right)
    with pytest.raises(ExerciseFailed, match="expected"):
        check_hybrid_cache_bytes(lambda p, T, H, D, w: len(p) * 2 * H * T * D * 4)
    with pytest.raises(ExerciseFailed, match="not implemented"):
        check_hybrid_cache_bytes(lambda *a: (_ for _ in ()).throw(NotImplementedError))


def test_chapter_figures_are_registered_and_draw():
    for name in ("08_four_classes", "08_taxonomy", "08_complexity"):
        figure = FIGURES[name]()
        assert figure.axes
        matplotlib.pyplot.close(figure)


def test_all_suite_measures_every_mechanism_and_they_agree_where_exact():
    methods, reference, lengths = bench08.all_suite("cpu")
    assert reference == "sdpa" and set(methods) == set(bench08.ALL_METHODS)
    x = recurrent_inputs(64, "cpu", torch.float32)
    exact = [bench08.ALL_METHODS[m](x) for m in ("naive", "sdpa", "flash")]
    torch.testing.assert_close(exact[0], exact[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(exact[2], exact[1], atol=1e-5, rtol=1e-4)
    results = sweep({m: methods[m] for m in ("sdpa", "ssd")}, [64], min_run_time=0.01, progress=False)
    assert [r.method for r in results] == ["sdpa", "ssd"]


def test_recall_suite_tiny_configuration_runs_end_to_end(monkeypatch):
    methods, reference, lengths = bench08.recall_suite("cpu", steps=2, progress=False)
    assert reference == "attention"
    results = sweep({m: methods[m] for m in ("attention", "gla")}, [16], min_run_time=0.01, progress=False)
    for r in results:
        assert 0.0 <= r.extra["accuracy"] <= 1.0 and r.extra["num_pairs"] == 2
    report = bench08.recall_report(results)
    assert "attention" in report and "gla" in report
