"""Stored results are read in one place: course_lib.results."""

import json
from pathlib import Path

import pytest

from course_lib import catalogue, results
from course_lib.measure import Measurement, save_json


def test_load_results_reads_what_save_json_wrote(tmp_path):
    written = [Measurement("prefill:attention", 256, 0.01, 2**20, {"flops": 1.0})]
    written.append(Measurement("x", 8, 0.5, None))
    path = save_json(written, tmp_path / "r.json", suite="all", shape={"B": 1, "H": 4, "D": 64})
    assert results.load_results(path) == written
    assert results.load_results(str(path)) == written
    payload = results.load_payload(path)
    assert payload["suite"] == "all" and payload["shape"] == {"B": 1, "H": 4, "D": 64}
    assert payload["results"] == json.loads(path.read_text())["results"]


def test_the_default_is_the_stored_comparison_of_chapter_08():
    assert results.RESULTS_DIR.name == "results" and (results.RESULTS_DIR / "all_small.json").is_file()
    stored = results.load_results()
    assert stored == results.load_results(results.RESULTS_DIR / "all_small.json")
    assert all(isinstance(r, Measurement) for r in stored) and len(stored) > 10
    assert results.load_payload()["suite"] == "all"


def test_chapter_08_modules_read_results_through_this_module():
    from course_lib.figures import ch08 as figures08
    from course_lib.widgets import ch08 as w08

    assert w08.load_results is results.load_results and w08.RESULTS_DIR == results.RESULTS_DIR
    assert figures08.load_results is results.load_results


def test_bad_input_names_the_argument(tmp_path):
    with pytest.raises(TypeError, match="path"):
        results.load_results(3)
    with pytest.raises(FileNotFoundError):
        results.load_results(tmp_path / "missing.json")


# --- the stored comparison under the catalogue's names -------------------------------------------

BEFORE_RENAMING = Path(__file__).parent / "data" / "all_small_before_catalogue_names.json"


def test_a_comparison_stored_before_the_catalogue_loads_renamed_with_every_value_unchanged():
    # The copy in tests/data is results/all_small.json as first measured (eight mechanisms), before
    # the catalogue's names; the stored file has since been re-measured with every mechanism.
    before = json.loads(BEFORE_RENAMING.read_text())
    after = results.load_payload(BEFORE_RENAMING)
    assert {k: v for k, v in after.items() if k != "results"} == {
        k: v for k, v in before.items() if k != "results"
    }
    assert len(after["results"]) == len(before["results"]) == 120
    renamed = 0
    for old, new in zip(before["results"], after["results"], strict=True):
        phase, mechanism = old["method"].split(":")
        expected = results.RENAMED.get(mechanism, mechanism)
        renamed += expected != mechanism
        assert new["method"] == f"{phase}:{expected}"
        assert (new["T"], new["seconds"], new["peak_bytes"]) == (old["T"], old["seconds"], old["peak_bytes"])
        assert new["extra"] == {**old["extra"], "mechanism": expected}
        assert new["extra"]["mechanism"] in catalogue.names(has="run")
    assert renamed == 90  # six of the eight mechanisms were renamed, in all 15 of their points
    assert results.load_results(BEFORE_RENAMING) == [Measurement(**r) for r in after["results"]]


def test_the_stored_comparison_uses_the_catalogues_names():
    payload = json.loads((results.RESULTS_DIR / "all_small.json").read_text())  # the file, not migrated
    assert results.catalogue_names(payload) == payload
    assert {r["extra"]["mechanism"] for r in payload["results"]} == set(catalogue.names(has="run"))


def test_catalogue_names_renames_only_the_old_names():
    payload = {
        "suite": "all",
        "results": [
            {
                "method": "train:naive",
                "T": 8,
                "seconds": 1.0,
                "peak_bytes": 3,
                "extra": {"mechanism": "naive"},
            },
            {"method": "ssd", "T": 8, "seconds": 2.0, "peak_bytes": None, "extra": {}},
            {"method": "decode:gla", "T": 8, "seconds": 3.0, "peak_bytes": 1, "extra": {"mechanism": "gla"}},
            {"method": "prefill:naive_v2", "T": 8, "seconds": 4.0, "peak_bytes": 1, "extra": {}},
        ],
    }
    renamed = results.catalogue_names(payload)
    assert [r["method"] for r in renamed["results"]] == [
        "train:attention",
        "mamba2",
        "decode:gla",
        "prefill:naive_v2",
    ]
    assert renamed["results"][0]["extra"] == {"mechanism": "attention"}
    assert [r["seconds"] for r in renamed["results"]] == [1.0, 2.0, 3.0, 4.0]
    assert payload["results"][0]["method"] == "train:naive"  # the input is not changed
    assert results.catalogue_names(renamed) == renamed
    assert set(results.RENAMED.values()) <= set(catalogue.names(has="run"))


def test_stored_recall_study_uses_the_catalogues_names():
    payload = json.loads((results.RESULTS_DIR / "recall_study.json").read_text())
    mixers = {r["mixer"] for kind in ("sweep", "final", "state") for r in payload[kind]}
    mixers |= set(payload["table"]) | {m["mixer"] for m in payload.get("missing", [])}
    assert mixers and mixers <= set(catalogue.names(has="mixer"))
    assert not mixers & set(results.RENAMED)  # none of the names from before the catalogue
    assert not (results.RESULTS_DIR / "recall_grid.json").exists()  # the 600-step grid is retired
