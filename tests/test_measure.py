"""The timing and memory helpers: they measure what they claim."""

import json

import pytest
import torch

from course_lib import measure


def test_time_function_measures_a_known_sleep():
    import time

    seconds = measure.time_function(lambda: time.sleep(0.01), min_run_time=0.05)
    assert 0.009 < seconds < 0.1


@pytest.mark.skipif(not measure._can_measure_cpu_memory(), reason="peak RSS is read from Linux /proc")
def test_peak_memory_sees_a_temporary_allocation():
    size = 64 * 2**20  # 64 MiB, freed before the function returns

    def allocate_and_free():
        x = torch.ones(size // 4)
        return float(x[0])

    measured = measure.peak_memory_bytes(allocate_and_free)
    assert 0.9 * size < measured < 1.5 * size
    assert measure.peak_memory_bytes(lambda: 1.0) < 8 * 2**20


@pytest.mark.skipif(not measure._can_measure_cpu_memory(), reason="peak RSS is read from Linux /proc")
def test_timing_after_a_memory_measurement_does_not_pay_for_page_faults():
    # Memory mode serves every block >= 64 KiB with mmap: each new 1 MiB tensor would fault in
    # 256 fresh pages. Afterwards a freed block must be reused from the heap, as in a normal run.
    import resource

    measure.peak_memory_bytes(lambda: torch.ones(2**20).sum())

    def allocate_many():
        for _ in range(200):
            torch.ones(2**18).sum()  # 1 MiB each, freed at once

    allocate_many()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    allocate_many()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 200 * 256 // 10, f"{faults} page faults: freed blocks are not reused"


def test_loglog_slope_recovers_power_laws():
    lengths = [256, 512, 1024, 2048]
    assert measure.loglog_slope(lengths, [3e-9 * t**2 for t in lengths]) == pytest.approx(2.0)
    assert measure.loglog_slope(lengths, [5.0 * t for t in lengths]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="x and y"):
        measure.loglog_slope([1], [1])


def test_format_bytes():
    assert measure.format_bytes(512) == "512 B"
    assert measure.format_bytes(2**31) == "2.0 GiB"
    assert measure.format_bytes(None) == "n/a"


def test_sweep_and_table_report_ratios_against_the_reference():
    methods = {
        "slow": lambda T: lambda: torch.ones(T, T).sum(),
        "fast": lambda T: lambda: torch.ones(T).sum(),
    }
    results = measure.sweep(methods, [64, 128], min_run_time=0.01, progress=False)
    assert {(r.method, r.T) for r in results} == {(m, t) for m in methods for t in (64, 128)}
    assert all(r.seconds > 0 for r in results)
    table = measure.format_table(results, reference="fast")
    assert "slow/fast" in table and "log-log slope" in table
    with pytest.raises(ValueError, match="reference"):
        measure.format_table(results, reference="missing")


def test_sweep_leaves_out_the_lengths_a_builder_declines():
    methods = {
        "short": lambda T: (lambda: torch.ones(T).sum()) if T <= 64 else None,
        "every": lambda T: lambda: torch.ones(T).sum(),
    }
    results = measure.sweep(methods, [32, 128], min_run_time=0.01, progress=False)
    assert [(r.method, r.T) for r in results] == [("short", 32), ("every", 32), ("every", 128)]


@pytest.mark.parametrize(
    "call,error,name",
    [
        (lambda: measure.time_function(3), TypeError, "fn"),
        (lambda: measure.time_function(lambda: 0, min_run_time=0), ValueError, "min_run_time"),
        (lambda: measure.peak_memory_bytes(None), TypeError, "fn"),
        (lambda: measure.sweep({}, [8]), ValueError, "methods"),
        (lambda: measure.sweep({"a": lambda T: lambda: 0}, [0]), ValueError, "lengths"),
    ],
)
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


def test_save_json_stores_the_environment_and_the_shape(tmp_path):
    results = [measure.Measurement("a", 16, 0.001, 1024, {"accuracy": 0.5})]
    path = measure.save_json(results, tmp_path / "sub" / "r.json", suite="s", shape={"B": 1, "H": 2, "D": 8})
    payload = json.loads(path.read_text())
    assert payload["suite"] == "s" and payload["shape"] == {"B": 1, "H": 2, "D": 8}
    assert payload["environment"]["threads"] == torch.get_num_threads()
    assert payload["results"] == [
        {"method": "a", "T": 16, "seconds": 0.001, "peak_bytes": 1024, "extra": {"accuracy": 0.5}}
    ]
    without = json.loads(measure.save_json(results, tmp_path / "r2.json", suite="s").read_text())
    assert "shape" not in without
