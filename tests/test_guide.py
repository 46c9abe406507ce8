"""Chapter 08's decision guide: findings read off measurements, the recall study's results, the rules."""

import json

import pytest

from course_lib.measure import Measurement
from course_lib.recall import state_bytes
from course_lib.studies import guide, recall_study


def point(phase, mechanism, T, seconds, peak=1000, state=None):
    extra = {"phase": phase, "mechanism": mechanism}
    if state is not None:
        extra["state_bytes"] = state
    return Measurement(f"{phase}:{mechanism}", T, seconds, peak, extra)


def synthetic():
    """Hand-made measurements with round numbers, so every finding's figures can be worked out here."""
    rows = []
    for T in (256, 512, 1024):
        s = T / 1024
        rows += [
            point("train", "attention", T, 0.8 * s * s, peak=400 * T * T),
            point("train", "sdpa", T, 0.1 * s * s, peak=10 * T),
            point("train", "flash_attention", T, 0.2 * s * s, peak=20 * T),
            point("train", "gla", T, 0.04 * s, peak=30 * T),  # beats sdpa from T = 512 (0.02 vs 0.025)
            point("prefill", "sdpa", T, 0.01 * s * s),
            point("prefill", "attention", T, 0.05 * s * s),
            point("prefill", "gla", T, 0.008 * s),  # beats sdpa only at T = 1024 (0.008 vs 0.01)
        ]
    for T in (256, 4096):
        rows += [
            point("decode", "sdpa", T, 1e-5 * T / 256, state=2048 * T),
            point("decode", "attention", T, 2e-5 * T / 256, state=2048 * T),
            point("decode", "mqa", T, 1e-5 * T / 256, state=512 * T),
            point("decode", "gla", T, 5e-5, state=65536),
            point("decode", "sliding_window", T, 3e-5, state=2048 * min(T, 256)),
        ]
    return rows


def test_findings_quote_the_measurements():
    found = guide.measured_evidence(synthetic(), name="fake.json")
    train = found["exact_train"]
    assert "T=1024" in train.text and "fastest exact mechanism was sdpa (100 ms" in train.text
    assert "attention 800 ms (8.0x)" in train.text and "flash_attention 200 ms (2.0x)" in train.text
    assert train.source == "fake.json: train phase, exact mechanisms at T=1024"
    decode = found["exact_decode"]
    assert "0.01 ms at a context of 256 and 0.16 ms at 4096 (16x, slope 1.00)" in decode.text
    assert "KV cache of 8.0 MiB" in decode.text  # 2048 bytes per token x 4096
    assert "mqa keeps 25% of multi-head attention's cache" in found["compact_cache"].text
    assert "its step took 0.50x naive attention's" in found["compact_cache"].text
    state = found["state_decode"]
    assert "slopes 0.00 to 0.00" in state.text and "0.31x to 0.31x sdpa's step" in state.text
    assert "from a state of 64.0 KiB" in state.text
    assert "slope 0.00), with a cache capped at 512.0 KiB" in found["window_decode"].text
    assert "the earliest from T=512 (gla)" in found["chunk_train"].text
    assert "the earliest from T=1024 (gla)" in found["chunk_prefill"].text
    assert "slopes 1.00 to 1.00, sdpa's with 2.00" in found["chunk_train"].text


def test_findings_leave_out_what_was_not_measured():
    only_sdpa = [point("prefill", "sdpa", T, T * 1e-6) for T in (256, 512)]
    assert guide.measured_evidence(only_sdpa) == {}
    rules = guide.rules(guide.measured_evidence(only_sdpa))
    assert all(r["evidence"] == [] and r["not_measured"] for r in rules)


def grid_payload():
    rows = []
    for mixer, accuracies, states in (
        ("attention", (1.0, 0.99, 0.97), (64, 128, 256)),
        ("deltanet", (1.0, 0.95, 0.91), (8, 8, 8)),
        ("gla", (0.99, 0.5, 0.2), (16, 16, 16)),
        ("mamba2", (0.99, 0.95, 0.91), (32, 32, 32)),
    ):
        for T, accuracy, kib in zip((64, 128, 256), accuracies, states):
            extra = {"accuracy": accuracy, "state_bytes": kib * 1024}
            rows.append({"method": mixer, "T": T, "seconds": 0.1, "peak_bytes": 1, "extra": extra})
    return {"suite": "recall", "results": rows}


def test_quality_per_state_ranks_recall_then_smaller_state(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid_payload()))
    quality = guide.recall_quality(path)
    assert quality["source"] == "grid.json" and quality["rows"][("gla", 128)]["accuracy"] == 0.5
    table = guide.quality_per_state(quality)
    assert [r["mixer"] for r in table] == ["attention", "deltanet", "mamba2", "gla"]
    assert [r["fixed"] for r in table] == [False, True, True, True]
    assert table[1]["per_kib"] == pytest.approx(0.91 / 8)
    # at T = 64 attention and DeltaNet tie (1.00): the smaller state comes first
    assert [r["mixer"] for r in guide.quality_per_state(quality, 64)] == [
        "deltanet",
        "attention",
        "gla",
        "mamba2",
    ]
    found = guide.recall_evidence(quality)
    assert "best fixed-size state was deltanet (0.91 with 8.0 KiB)" in found["recall"].text
    assert "reaching 0.9: deltanet, mamba2" in found["recall"].text
    assert "attention 0.97 (256.0 KiB)" in found["recall"].text
    assert found["recall"].source == (
        "grid.json: one run per mixer and length (bench recall grid); "
        "answer accuracy and state bytes at T=256"
    )
    with pytest.raises(ValueError, match="T=100"):
        guide.quality_per_state(quality, 100)


def test_recall_quality_reads_the_final_runs_when_the_summary_holds_them(fake_recall_summary, tmp_path):
    # attention (seeds 0, 1) and GLA (seed 0) have final runs; the sweep is not used then
    path = tmp_path / "recall_study.json"
    path.write_text(json.dumps(fake_recall_summary))
    quality = guide.recall_quality(path)
    assert quality["source"] == "recall_study.json"
    assert quality["measurement"] == "final runs, mean over seeds 0, 1"
    assert quality["rows"][("attention", 256)] == {
        "accuracy": pytest.approx(0.96),
        "state_bytes": 262144,
        "fixed": False,
    }
    assert quality["rows"][("gla", 128)] == {"accuracy": 0.6, "state_bytes": 8192, "fixed": True}
    assert {T for _, T in quality["rows"]} == {64, 128, 256}
    assert "attention" not in quality["missing"] and "deltanet" in quality["missing"]
    found = guide.recall_evidence(quality)
    assert "best fixed-size state was gla (0.30 with 8.0 KiB)" in found["recall"].text
    assert "attention 0.96 (256.0 KiB)" in found["recall"].text and "not yet measured: sliding_window" in (
        found["recall"].text
    )
    assert found["recall"].source == (
        "recall_study.json: final runs, mean over seeds 0, 1; answer accuracy and state bytes at T=256"
    )


def test_recall_quality_uses_the_sweep_when_no_final_run_is_stored(fake_recall_summary, tmp_path):
    sweep_only = recall_study.summarise(fake_recall_summary["sweep"], [], [])
    path = tmp_path / "recall_study.json"
    path.write_text(json.dumps(sweep_only))
    quality = guide.recall_quality(path)
    assert quality["measurement"].startswith(
        "learning-rate sweep, best of each mixer's learning rates at T=64"
    )
    # the best rate of each mixer at T = 64; the state of the recall model at T = 64; attention's grows
    assert quality["rows"] == {
        ("attention", 64): {"accuracy": 1.0, "state_bytes": state_bytes("attention", 64), "fixed": False},
        ("gla", 64): {"accuracy": 0.91, "state_bytes": state_bytes("gla", 64), "fixed": True},
    }
    found = guide.recall_evidence(quality)
    assert "MQAR at T=64: the best fixed-size state was gla (0.91" in found["recall"].text
    assert "learning-rate sweep" in found["recall"].source and "at T=64" in found["recall"].source


def test_without_a_stored_study_the_recall_finding_is_not_measured(tmp_path, monkeypatch):
    monkeypatch.setattr(guide, "RECALL_STUDY", tmp_path / "missing.json")
    assert guide.recall_evidence() == {}
    hybrid = next(r for r in guide.rules({}) if r["rule"] == "hybrid")
    assert "recall" in hybrid["not_measured"]
    with pytest.raises(FileNotFoundError):
        guide.recall_quality()
    with pytest.raises(TypeError, match="path"):
        guide.recall_quality(3)
    assert not hasattr(guide, "RECALL_GRID")  # the old 600-step grid is not read any more


def test_the_stored_study_backs_the_recall_finding():
    quality = guide.recall_quality()
    assert quality["source"] == "recall_study.json" and quality["rows"]
    summary = recall_study.load_summary()
    if summary["table"]:
        assert quality["measurement"].startswith("final runs")
        swept = {r["mixer"] for r in summary["sweep"]}
        assert {m for m, _ in quality["rows"]} == set(summary["table"]) | swept
        for mixer in set(summary["table"]):
            assert {T for m, T in quality["rows"] if m == mixer} == set(recall_study.LENGTHS), mixer
        for mixer in swept - set(summary["table"]):
            assert {T for m, T in quality["rows"] if m == mixer} == {64}, "the sweep's length only"
            assert mixer in quality["measurement"]
    else:
        assert quality["measurement"].startswith("learning-rate sweep")
        assert {m for m, _ in quality["rows"]} == {r["mixer"] for r in summary["sweep"]}
    assert guide.recall_evidence()["recall"].source.startswith(f"recall_study.json: {quality['measurement']}")


def test_rules_follow_the_cache_arithmetic_and_cite_their_findings(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid_payload()))
    found = guide.evidence(synthetic(), guide.recall_quality(path))
    per_token = guide.kv_cache_bytes_per_token(32)
    assert per_token == 2 * 32 * 32 * 128 * 2  # 0.5 MiB per token for a Llama-2-7B shape in fp16
    fits = guide.recommend(1024, 8.0, True, False, found=found)
    assert fits["chapter"] == "03" and fits["mha_cache"] == 1024 * per_token
    assert fits["backed_by"] == [
        f"all_small.json: {p} phase, exact mechanisms at T=1024" for p in ("train", "prefill")
    ]
    compact = guide.recommend(1024, 8.0, True, True, found=found)
    assert compact["chapter"] == "04" and len(compact["evidence"]) == 2
    assert guide.recommend(2**20, 1.0, True, True, found=found)["rule"] == "ring"
    assert guide.recommend(2**20, 1.0, False, True, found=found)["rule"] == "hybrid"
    recurrent = guide.recommend(2**20, 1.0, False, False, found=found)
    assert recurrent["chapter"] == "07" and "(deltanet:" in recurrent["recommendation"]
    assert recurrent["backed_by"][-1].startswith("grid.json: one run per mixer and length")
    assert [r["rule"] for r in guide.rules(found)] == ["fits", "compact", "ring", "hybrid", "recurrent"]
    for bad, name in (
        ({"seq_len": 0}, "seq_len"),
        ({"memory_gib": 0.0}, "memory_gib"),
        ({"exact": 1}, "exact"),
    ):
        with pytest.raises((ValueError, TypeError), match=name):
            guide.recommend(**bad, found=found)


def test_every_rule_is_backed_by_the_stored_results():
    for rule in guide.rules():
        assert rule["evidence"] and not rule["not_measured"], rule["rule"]
        assert all(source.split(":")[0].endswith(".json") for source in rule["backed_by"])
