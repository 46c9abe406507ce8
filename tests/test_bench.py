"""The benchmark command: it lists the suites without importing them, runs one, and prints its shape."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from course_lib import bench, measure

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_suite_with_what_it_measures_without_importing_torch():
    # A fresh interpreter: --help must answer from the source, before torch or any suite loads.
    code = (
        "import sys\n"
        "from course_lib import bench\n"
        "try:\n"
        "    bench.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "loaded = [m for m in sys.modules if m == 'torch' or m.startswith('course_lib.benchmarks.')]\n"
        "print('LOADED', sorted(loaded))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True, timeout=120
    )
    assert "LOADED []" in run.stdout
    lines = run.stdout.splitlines()
    for name, description in bench.suite_descriptions().items():
        assert any(line.split()[:1] == [name] and line.endswith(description) for line in lines), name


def test_source_reading_finds_exactly_the_suites_the_modules_define():
    suites = bench.suites()
    descriptions = bench.suite_descriptions()
    assert set(descriptions) == set(suites)
    for name, suite in suites.items():
        assert descriptions[name] == suite.__doc__.strip().split("\n")[0]
        assert len(descriptions[name]) > 20, f"suite {name} needs a one-line description of what it measures"
        assert bench.load_suite(name) is suite
        assert {"B", "H", "D"} <= set(getattr(suite, "shape", {})), f"suite {name} declares no B, H, D"


def test_cli_standard_writes_table_and_json(tmp_path, capsys):
    path = tmp_path / "standard.json"
    bench.main(
        [
            "standard",
            "--lengths",
            "32",
            "64",
            "--min-run-time",
            "0.01",
            "--json",
            str(path),
            "--no-progress",
            "--plot",
            str(tmp_path / "plot.png"),
        ]
    )
    printed = capsys.readouterr().out
    assert "naive/sdpa" in printed
    payload = json.loads(path.read_text())
    assert payload["suite"] == "standard" and len(payload["results"]) == 4
    assert payload["shape"] == {"B": 1, "H": 8, "D": 64}
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_cli_prints_the_shape_and_counts_threads_in_english(capsys):
    threads = torch.get_num_threads()
    try:
        bench.main(
            ["standard", "--lengths", "16", "--min-run-time", "0.01", "--no-progress", "--threads", "1"]
        )
        printed = capsys.readouterr().out
        assert "(1 thread)" in printed and "threads)" not in printed
        assert "B=1, H=8, D=64" in printed
        torch.set_num_threads(2)
        bench.main(["standard", "--lengths", "16", "--min-run-time", "0.01", "--no-progress"])
        assert "(2 threads)" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)


def test_cli_uses_a_suites_own_table_report_and_plot(tmp_path, capsys, monkeypatch):
    def suite(device):
        return {"a": lambda T: lambda: torch.ones(T).sum()}, "a", [16, 32]

    drawn = []
    suite.table = lambda results: f"own table of {len(results)} measurements"
    suite.report = lambda results: "own report"
    suite.plot = lambda results, path: drawn.append((len(results), path))
    monkeypatch.setattr(bench, "suite_descriptions", lambda: {"mine": "a test suite"})
    monkeypatch.setattr(bench, "load_suite", lambda name: {"mine": suite}[name])
    bench.main(["mine", "--min-run-time", "0.01", "--no-progress", "--plot", str(tmp_path / "p.png")])
    printed = capsys.readouterr().out
    assert "own table of 2 measurements" in printed and "own report" in printed
    assert "a ms" not in printed  # format_table was replaced
    assert "B, H, D: not declared" in printed
    assert drawn == [(2, tmp_path / "p.png")]


def test_the_measuring_names_still_answer_from_bench_for_one_release():
    for name in bench._MOVED_TO_MEASURE:
        assert getattr(bench, name) is getattr(measure, name)
    from course_lib.bench import Measurement, sweep

    assert Measurement is measure.Measurement and sweep is measure.sweep
    with pytest.raises(AttributeError, match="no_such_name"):
        bench.no_such_name  # noqa: B018


def test_bad_input_names_the_argument(capsys):
    with pytest.raises(ValueError, match="name"):
        bench.load_suite("no_such_suite")
    with pytest.raises(SystemExit):
        bench.main(["no_such_suite"])
    assert "SUITE" in capsys.readouterr().err
