"""Notebook layer of chapter 09: widgets driven headlessly, the benchmark suite.

The widgets replay the kernels' index arithmetic in plain Python and need no Triton.
"""

import importlib.util
import subprocess
import sys

import ipywidgets
import pytest
import torch

from course_lib import bench
from course_lib.benchmarks.ch09 import FAMILIES, kernels_suite, kernels_table, match_accelerator
from course_lib.hardware import ACCELERATORS
from course_lib.measure import Measurement, SuiteUnavailable
from course_lib.widgets import ch09

HAS_TRITON = importlib.util.find_spec("triton") is not None


def controls(widget):
    return {c.description: c for c in widget.children if isinstance(c, ipywidgets.ValueWidget)}


# --- the program explorer ----------------------------------------------------------------------


def visible(T, S, causal):
    allowed = torch.ones(T, S, dtype=torch.bool)
    return allowed.tril(diagonal=S - T) if causal else allowed


SHAPES = [(40, 40, 16, 16, True), (40, 40, 16, 16, False), (20, 45, 16, 32, True), (45, 20, 32, 16, True)]


@pytest.mark.parametrize("T, S, block_m, block_n, causal", SHAPES)
@pytest.mark.parametrize("kernel", ch09.PROGRAM_KERNELS)
def test_programs_visit_exactly_the_tiles_with_a_visible_pair(kernel, T, S, block_m, block_n, causal):
    allowed = visible(T, S, causal)
    programs = ch09.program_map(kernel, T, S, block_m, block_n, causal)
    by_queries = kernel != "fa2 backward dK dV"
    assert len(programs) == -(-(T if by_queries else S) // (block_m if by_queries else block_n))
    seen = set()
    for program in programs:
        for tile in program["steps"]:
            (q0, q1), (k0, k1) = tile["q_rows"], tile["k_rows"]
            block = allowed[q0:q1, k0:k1]
            assert block.any(), "a visited tile must hold a visible pair"
            cut = (q1 - q0, k1 - k0) != (block_m, block_n)
            assert tile["status"] == ("full" if block.all() and not cut else "masked")
            seen.add((q0, k0))
        for tile in program["skipped"]:
            (q0, q1), (k0, k1) = tile["q_rows"], tile["k_rows"]
            assert not allowed[q0:q1, k0:k1].any(), "a skipped tile must hold no visible pair"
    expected = {
        (q0, k0) for q0 in range(0, T, block_m) for k0 in range(0, S, block_n)
        if allowed[q0 : q0 + block_m, k0 : k0 + block_n].any()
    }  # fmt: skip
    assert seen == expected


def test_program_view_counts_and_describes_the_chosen_program():
    view = ch09.program_map_view(
        "fa2 forward", T=64, S=64, block_m=16, block_n=16, causal=True, program=2, draw=False
    )
    assert view["grid"] == (4,) and view["owns"] == ("queries", (32, 48))
    assert len(view["steps"]) == 3 and len(view["skipped"]) == 1  # keys 0..47 of 64
    assert view["tiles_computed"] == 10 and view["tiles_skipped"] == 6
    assert view["work_fraction"] == pytest.approx(10 / 16)
    assert "tl.program_id(0) = 2" in view["html"]
    # Past the end shows the last program; on-chip bytes grow with the head dim.
    last = ch09.program_map_view("fa2 forward", T=64, S=64, program=99, draw=False)
    assert last["program"] == 3
    wide = ch09.program_map_view("fa2 forward", T=64, S=64, program=0, head_dim=128, draw=False)
    assert wide["on_chip_bytes"] > last["on_chip_bytes"]


def test_program_explorer_reacts_to_every_control():
    box = ch09.program_explorer()
    w = box.interactive
    c = controls(w)
    assert set(c) >= {"kernel", "T", "S", "BLOCK_M", "BLOCK_N", "causal", "program", "head dim"}
    for kernel in c["kernel"].options:
        c["kernel"].value = kernel
        assert kernel in box.children[1].value
        rows = c["T"].value if kernel != "fa2 backward dK dV" else c["S"].value
        block = c["BLOCK_M"].value if kernel != "fa2 backward dK dV" else c["BLOCK_N"].value
        assert c["program"].max == -(-rows // block) - 1  # the slider spans the grid
    c["kernel"].value = "fa2 forward"
    for T in (1, 17, 96):
        c["T"].value = T
        assert w.result["grid"] == (-(-T // c["BLOCK_M"].value),)
    for block in c["BLOCK_M"].options:
        c["BLOCK_M"].value = block
        assert all(t["q_rows"][1] - t["q_rows"][0] <= block for t in w.result["steps"])
    c["causal"].value = False
    assert w.result["tiles_skipped"] == 0
    c["causal"].value = True
    for program in range(c["program"].max + 1):
        c["program"].value = program
        assert w.result["program"] == program
    before = w.result["on_chip_bytes"]
    c["head dim"].value = 128
    assert w.result["on_chip_bytes"] > before
    c["S"].value = 30
    c["BLOCK_N"].value = 32
    assert all(t["k_rows"][1] <= 30 for t in w.result["steps"])


# --- the paged gather --------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1, 3, 4, 7])
@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_gathered_offsets_hold_the_tokens_they_name(page_size, num_splits):
    lengths = (13, 6, 10)
    for sequence, length in enumerate(lengths):
        covered = []
        for split in range(num_splits):
            view = ch09.paged_gather_view(
                page_size, lengths, sequence, num_splits, split, block_n=4, draw=False
            )
            # The pool stores token t of sequence s as 1000 s + t: the offset found the right row.
            assert view["values"] == [1000 * sequence + t for t in view["tokens"]]
            assert all(len(step) <= 4 for step in view["steps"])
            covered += view["tokens"]
        assert covered == list(range(length)), "the splits cover the sequence once, in order"


def test_paged_gather_explorer_reacts_to_every_control():
    box = ch09.paged_gather_explorer()
    w = box.interactive
    c = controls(w)
    assert set(c) >= {"page size", "sequence", "num_splits", "split", "BLOCK_N"}
    for page_size in range(c["page size"].min, c["page size"].max + 1):
        c["page size"].value = page_size
        assert all(slot < page_size for slot in w.result["slots"])
    for sequence in c["sequence"].options:
        c["sequence"].value = sequence
        assert f"sequence {sequence}" in box.children[1].value
    for splits in range(c["num_splits"].min, c["num_splits"].max + 1):
        c["num_splits"].value = splits
        assert c["split"].max == splits - 1
    c["num_splits"].value = 6
    c["sequence"].value = 1  # 6 tokens in 6 splits: one token each
    c["split"].value = 5
    assert w.result["tokens"] == [5]
    for block in c["BLOCK_N"].options:
        c["BLOCK_N"].value = block
        assert all(len(step) <= block for step in w.result["steps"])


def test_side_by_side_shows_both_sources_escaped():
    def loop(x):
        return x < 1

    class Jit:  # a @triton.jit function keeps the Python function in .fn
        fn = staticmethod(lambda y: y)

    widget = ch09.side_by_side(loop, Jit(), titles=("PyTorch", "Triton"))
    assert "PyTorch" in widget.value and "Triton" in widget.value
    assert "return x &lt; 1" in widget.value and "lambda y: y" in widget.value


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: ch09.program_map("fa3", 8, 8, 4, 4, True), ValueError, "kernel"),
        (lambda: ch09.program_map("fa2 forward", 0, 8, 4, 4, True), ValueError, "T"),
        (lambda: ch09.program_map("fa2 forward", 8, 8, 4, 4, 1), TypeError, "causal"),
        (lambda: ch09.paged_gather_view(0, draw=False), ValueError, "page_size"),
        (lambda: ch09.paged_gather_view(lengths=(), draw=False), ValueError, "lengths"),
        (lambda: ch09.paged_gather_view(num_splits=0, draw=False), ValueError, "num_splits"),
    ],
)
def test_widget_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


# --- the benchmark suite -----------------------------------------------------------------------


def test_kernels_suite_is_listed_and_says_it_needs_cuda():
    assert "kernels" in bench.suites()
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the suite runs")
    with pytest.raises(SuiteUnavailable, match="needs a CUDA GPU"):
        kernels_suite("cpu")
    result = subprocess.run(
        [sys.executable, "-m", "course_lib.bench", "kernels"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    assert "needs a CUDA GPU" in result.stderr and "Traceback" not in result.stderr


def test_accelerators_are_matched_by_device_name():
    assert match_accelerator("NVIDIA H100 80GB HBM3") is ACCELERATORS["H100-SXM"]
    assert match_accelerator("NVIDIA H200") is ACCELERATORS["H200-SXM"]
    assert match_accelerator("NVIDIA A100-SXM4-80GB") is ACCELERATORS["A100-80GB-SXM"]
    assert match_accelerator("NVIDIA GeForce RTX 4090") is ACCELERATORS["RTX-4090"]
    assert match_accelerator("Tesla T4") is None


def test_kernels_table_computes_throughput_and_fraction_of_peak():
    h100 = ACCELERATORS["H100-SXM"]
    flops, read = 1e12, 3.35e9
    forward = {"family": "fa2 forward", "flops": flops}
    results = [
        Measurement("fa2 forward / triton", 1024, 0.01, None, {**forward, "method": "triton"}),
        Measurement("fa2 forward / sdpa", 1024, 0.005, None, {**forward, "method": "sdpa"}),
        Measurement(
            "paged decode / triton", 1024, 0.002, None,
            {"family": "paged decode", "method": "triton", "bytes": read, "flops": 1.0},
        ),
    ]  # fmt: skip
    table = kernels_table(results, device_name="NVIDIA H100 80GB HBM3")
    assert "H100-SXM datasheet" in table
    # 1e12 FLOPs in 10 ms = 100 TFLOP/s, 10.1% of 989.4; twice SDPA's time.
    assert (
        "100.0 TFLOP/s" in table
        and f"{100 * 100e12 / h100.peak_flops_16bit:.1f}%" in table
        and "2.00x" in table
    )
    # 3.35 GB in 2 ms = 1675 GB/s, half of the H100's 3.35 TB/s.
    assert "1675.0 GB/s" in table and "50.0%" in table
    assert set(FAMILIES) >= {"fa2 forward", "paged decode", "chunked gla"}
    assert "n/a" in kernels_table(results, device_name="Some GPU")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (pip install -e '.[kernels]')")
def test_every_benchmark_method_runs_and_each_family_computes_the_same_thing():
    """A smoke test of the GPU-only suite's code under the interpreter (run once each, never timed)."""
    from course_lib.benchmarks.ch09 import kernels_methods

    device = "cuda" if torch.cuda.is_available() else "cpu"
    outputs = {}
    for build in kernels_methods(device).values():
        call = build(16)
        assert call.extra["family"] in FAMILIES and call.extra["flops"] > 0
        result = call()
        if isinstance(result, list):  # the page-by-page loop: one (H, 1, D) output per sequence
            result = torch.stack(result)
        outputs.setdefault(call.extra["family"], []).append(result)
    for family, results in outputs.items():
        first = results[0] if isinstance(results[0], tuple) else (results[0],)
        for other in results[1:]:
            other = other if isinstance(other, tuple) else (other,)
            for a, b in zip(first, other):
                torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2, msg=family)


# The exercise checkers of chapter 09 are tested with every other chapter's: tests/test_exercises.py runs the
# notebook's solutions, stubs and tests/exercise_mistakes_ch09.py (with Triton installed).
