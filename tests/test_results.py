"""Stored results are read in one place: course_lib.results."""

import json

import pytest

from course_lib import results
from course_lib.measure import Measurement, save_json


def test_load_results_reads_what_save_json_wrote(tmp_path):
    written = [Measurement("prefill:naive", 256, 0.01, 2**20, {"flops": 1.0}), Measurement("x", 8, 0.5, None)]
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
