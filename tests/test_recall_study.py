"""Chapter 08's recall study: the training recipe's pieces, end to end on the smallest configuration."""

from __future__ import annotations

import json

import pytest
import torch

from course_lib.recall import IGNORE, MQARTask, answer_distances, mqar_batch
from course_lib.studies import recall_study as study
from course_lib.studies.recall_study import Run, train_run


def tiny(mixer="attention", **options):
    settings = dict(lengths=(16, 32), d_model=16, num_heads=2, batch_size=4, cap=6, eval_every=2, patience=2)
    return Run(mixer, **{**settings, **options})


def test_a_run_trains_on_every_length_and_reports_each():
    record = train_run(tiny())
    assert set(record["accuracy"]) == {"16", "32"} and all(0 <= a <= 1 for a in record["accuracy"].values())
    assert [step for step, _ in record["curve"]] == [2, 4, 6] and record["stop"] in ("cap", "plateau")
    assert set(record["by_distance"]) == {"16", "32"}
    for bins in record["by_distance"].values():
        assert [low for low, _, _ in bins] == study.DISTANCE_EDGES[:-1]
    assert record["state_bytes"]["32"] == 2 * record["state_bytes"]["16"]  # attention: a KV cache grows
    json.dumps(record)  # JSON-ready


def test_a_run_stops_early_on_a_plateau():
    # A learning rate this small moves nothing: the mean accuracy never improves, so the run
    # stops after `patience` evaluations instead of spending its whole cap.
    record = train_run(tiny(lr=1e-9, cap=40, eval_every=2, patience=2))
    assert record["stop"] == "plateau" and record["steps"] == 6


def test_no_plateau_stop_before_min_steps():
    record = train_run(tiny(lr=1e-9, cap=12, eval_every=2, patience=2, min_steps=10))
    assert record["stop"] == "plateau" and record["steps"] == 10


def test_a_run_stops_when_every_length_converges(monkeypatch):
    monkeypatch.setattr(study, "TARGET", 0.0)  # any accuracy counts as converged
    record = train_run(tiny(cap=40))
    assert record["stop"] == "converged" and record["steps"] == 2


def test_runs_are_cached_and_resumed(tmp_path, monkeypatch):
    calls = []
    real = study.train_run
    monkeypatch.setattr(study, "train_run", lambda run, **kw: calls.append(run.key()) or real(run, **kw))
    runs = [tiny(), tiny("gla")]
    first = study._run_all(runs, tmp_path, jobs=1, progress=False, label="test")
    again = study._run_all(runs, tmp_path, jobs=1, progress=False, label="test")
    assert len(calls) == 2 and first == again and len(list(tmp_path.glob("*.json"))) == 2
    assert runs[0].key() != runs[1].key() != tiny(seed=1).key()


def test_the_plan_covers_every_mixer_and_the_sweep_picks_the_best():
    full = study.plan()
    assert {r.mixer for r in full["final"]} == set(study.RECALL_MIXERS)
    assert len(full["final"]) == len(study.RECALL_MIXERS) * len(study.SEEDS)
    assert {r.lr for r in full["sweep"]} == set(study.SWEEP_LRS)
    quick = study.plan(quick=True)
    assert not quick["sweep"] and all(r.cap <= 300 and r.seed == 0 for r in quick["final"])
    records = [
        {"mixer": "gla", "lr": 1e-3, "accuracy": {"64": 0.5}, "steps": 900},
        {"mixer": "gla", "lr": 3e-3, "accuracy": {"64": 0.99}, "steps": 1200},
        {"mixer": "gla", "lr": 1e-2, "accuracy": {"64": 0.99}, "steps": 700},
    ]
    assert study._best_lr(records, "gla") == 1e-2  # tie on accuracy: the fewer steps


def test_power_law_placement_crowds_queries_after_the_pairs():
    uniform, power = (MQARTask(64, 4, 128, placement=p) for p in ("uniform", "power_law"))
    distance = {}
    for task in (uniform, power):
        inputs, targets = mqar_batch(task, 512, seed=0)
        d = answer_distances(inputs, targets, task)
        rows, positions = (targets != IGNORE).nonzero(as_tuple=True)
        # the distance points back at the queried key, whose next token is the answer
        assert torch.equal(inputs[rows, positions - d], inputs[rows, positions])
        assert torch.equal(inputs[rows, positions - d + 1], targets[rows, positions])
        distance[task.placement] = d.float().mean().item()
    assert distance["power_law"] < 0.7 * distance["uniform"]


def test_bad_input():
    with pytest.raises(ValueError, match="mixer"):
        Run("transformer")
    with pytest.raises(ValueError, match="placement"):
        MQARTask(placement="zipf")
    with pytest.raises(ValueError, match="lr"):
        Run("gla", lr=0.0)


# --- reading the stored summary (a partial one, written by hand in tests/conftest.py) ------------


def test_load_summary_lists_what_the_plan_holds_and_the_summary_lacks(fake_recall_summary, tmp_path):
    path = tmp_path / "recall_study.json"
    path.write_text(json.dumps(fake_recall_summary))
    summary = study.load_summary(path)
    assert summary["stored"] and summary["path"] == "recall_study.json"
    pending = summary["pending"]
    # final runs: attention has both seeds, GLA seed 0 only, every other mixer none
    assert "attention" not in pending["final"] and pending["final"]["gla"] == [1]
    assert pending["final"]["deltanet"] == list(study.SEEDS)
    assert set(pending["final"]) == set(study.RECALL_MIXERS) - {"attention"}
    # the sweep: attention lacks 1e-2, GLA 1e-3; the others every rate
    assert pending["sweep"]["attention"] == [1e-2] and pending["sweep"]["gla"] == [1e-3]
    assert pending["sweep"]["mamba2"] == list(study.SWEEP_LRS)
    assert pending["state"]["gla"] == [64, 128] and pending["state"]["deltanet"] == [32, 64, 128]
    assert list(pending["final"]) == [m for m in study.RECALL_MIXERS if m in pending["final"]]
    with pytest.raises(TypeError, match="path"):
        study.load_summary(3)


def test_without_a_stored_summary_everything_is_pending(tmp_path):
    summary = study.load_summary(tmp_path / "none.json")
    assert not summary["stored"] and not summary["sweep"] and not summary["final"]
    assert sum(map(len, summary["pending"]["final"].values())) == len(study.plan()["final"])
    text = study.status_report(summary)
    assert "nothing has been run yet" in text and study.COMMAND in text


def test_sweep_best_keeps_the_best_rate_and_reports_how_it_stopped(fake_recall_summary):
    rows = study.sweep_best(fake_recall_summary)
    assert [r["mixer"] for r in rows] == ["attention", "gla"]
    assert rows[0] | {"tried": None} == {
        "mixer": "attention",
        "lr": 3e-3,
        "accuracy": 1.0,
        "stop": "converged",
        "steps": 400,
        "tried": None,
        "complete": False,  # 1e-2 was not run
    }
    assert rows[1]["lr"] == 3e-3 and rows[1]["stop"] == "cap" and rows[1]["tried"] == {3e-3: 0.91, 1e-2: 0.30}
    text = study.sweep_report(fake_recall_summary)
    assert "reached 0.99 (converged): attention" in text
    assert "did not reach 0.99 within the step cap (1500): gla 0.91" in text
    assert "(sweep incomplete)" in text


def test_final_report_shows_mean_and_spread_and_names_what_is_not_yet_run(fake_recall_summary):
    rows = study.final_rows(fake_recall_summary)
    assert [r["mixer"] for r in rows] == ["attention", "gla"]
    cell = rows[0]["accuracy"][256]  # seeds 0.97 and 0.95
    assert (cell["mean"], cell["min"], cell["max"]) == (pytest.approx(0.96), 0.95, 0.97)
    assert rows[1]["seeds"] == [0] and rows[1]["stops"] == ["cap"] and rows[1]["steps"] == [2400]
    text = study.final_report(fake_recall_summary)
    assert "0.96 [0.95-0.97]" in text and "cap (2400)" in text
    assert "every seed at least 0.95 at every length: attention" in text
    assert "(not learned within this budget): gla" in text
    assert "final runs of seed 0 for sliding_window" in text and "final runs of seed 1 for" in text
    assert "seed 1 for every mixer" not in text  # attention has its seed 1
    assert f"resume with `{study.COMMAND}`" in text
    assert "no final runs in the summary yet" in study.final_report(study.summarise([], [], []))


def test_distance_and_state_rows(fake_recall_summary):
    distance = study.distance_rows(fake_recall_summary)
    assert set(distance) == {"attention", "gla"}
    # attention at T = 256: near bin min(1, a + 0.1) for both seeds, far bin a - 0.1 averaged, empty bin None
    assert distance["attention"][256] == [
        (1, 8, pytest.approx(1.0)),
        (8, 16, pytest.approx(0.86)),
        (16, 32, None),
    ]
    state = study.state_rows(fake_recall_summary)
    assert state == [
        {
            "mixer": "gla",
            "d_model": 32,
            "T": 128,
            "accuracy": 0.5,
            "state_bytes": 4096,
            "stop": "converged",
            "steps": 1200,
        }
    ]
    assert "d_model   32" in study.state_report(fake_recall_summary)
    assert "no state sweep in the summary yet" in study.state_report(study.summarise([], [], []))
