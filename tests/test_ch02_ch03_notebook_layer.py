"""Notebook layer of chapters 02 and 03: widgets driven headlessly, checkers, figures, bench suite."""

import math
import re

import ipywidgets
import pytest
import torch

from course_lib import bench
from course_lib.figures import FIGURES
from course_lib.hardware import ACCELERATORS, Accelerator
from course_lib.tiling import FlashStats, flash_attention
from course_lib.widgets import ch02, ch03


def controls(widget):
    return {c.description: c for c in widget.children if isinstance(c, ipywidgets.ValueWidget)}


# --- chapter 02 widgets -------------------------------------------------------------------------


def test_operation_cost_counts_by_hand():
    # Decode, one head, S = 4096, D = 128, bf16: 4 D S FLOPs; q, o (2 D) and k, v (2 S D) elements.
    cost = ch02.operation_cost("attention decode", seq_len=4096, num_heads=1, num_kv_heads=1, head_dim=128)
    assert cost["flops"] == 4 * 128 * 4096
    assert cost["bytes"] == (2 * 128 + 2 * 4096 * 128) * 2
    # A linear layer at decode with batch b reads the d x d weights once: intensity about b.
    for batch in (1, 4, 64):
        linear = ch02.operation_cost("linear layer decode", batch=batch, num_heads=32, head_dim=128)
        width = 32 * 128
        assert linear["flops"] == 2 * batch * width * width
        assert linear["intensity"] == pytest.approx(batch, rel=0.05)


def test_roofline_explorer_decode_is_memory_bound_and_prefill_compute_bound():
    decode = ch02.roofline_explorer_view(operation="attention decode", seq_len=8192, draw=False)
    prefill = ch02.roofline_explorer_view(operation="attention prefill", seq_len=8192, draw=False)
    h100 = ACCELERATORS["H100-SXM"]
    assert decode["bound"] == "memory" and prefill["bound"] == "compute"
    assert decode["intensity"] == pytest.approx(1.0, rel=1e-3)  # bf16 MHA decode: 1 FLOP per byte
    assert decode["seconds"] == pytest.approx(decode["bytes"] / h100.memory_bandwidth)
    assert prefill["seconds"] == pytest.approx(prefill["flops"] / h100.peak_flops_16bit)
    assert decode["attainable"] == pytest.approx(h100.memory_bandwidth * decode["intensity"])


def test_roofline_explorer_widget_reacts_to_every_control():
    measured = {"this machine": Accelerator("this machine", 16e9, 20e9, 2**20, 2, 1e11, 1e11, "DDR")}
    box = ch02.roofline_explorer(extra_accelerators=measured)
    w = box.interactive
    c = controls(w)
    assert set(c) >= {"device", "operation", "batch", "length", "heads", "KV heads", "head dim", "dtype"}
    for device in c["device"].options:
        c["device"].value = device
        expected_bandwidth = {**ACCELERATORS, **measured}[device].memory_bandwidth
        assert w.result["attainable"] <= w.result["intensity"] * expected_bandwidth * (1 + 1e-9)
        assert box.children[1].value == w.result["html"]
    c["device"].value = "H100-SXM"
    for operation in c["operation"].options:
        c["operation"].value = operation
        assert operation in w.result["html"]
        assert w.result["bound"] in ("memory", "compute")
    c["operation"].value = "linear layer decode"
    intensities = []
    for batch in c["batch"].options:
        c["batch"].value = batch
        intensities.append(w.result["intensity"])
    assert intensities == sorted(intensities) and intensities[-1] > 50 * intensities[0]
    c["operation"].value = "attention prefill"
    lengths = []
    for length in c["length"].options:
        c["length"].value = length
        lengths.append(w.result["intensity"])
    assert lengths == sorted(lengths)
    c["operation"].value = "attention decode"
    for heads in c["heads"].options:
        c["heads"].value = heads
        assert w.result["flops"] > 0
    c["heads"].value = 32
    for kv_heads in c["KV heads"].options:
        c["KV heads"].value = kv_heads
        # Grouped-query decode: the intensity grows with the group size (heads / KV heads).
        assert w.result["intensity"] == pytest.approx(32 / kv_heads, rel=0.01)
    c["heads"].value = 8  # fewer query heads than KV heads: the slider is clipped, no error
    assert c["KV heads"].value <= 8 and w.result["intensity"] >= 1.0 - 1e-3
    for head_dim in c["head dim"].options:
        c["head dim"].value = head_dim
        assert w.result["flops"] > 0
    for dtype in c["dtype"].options:
        c["dtype"].value = dtype
        assert w.result["bytes"] > 0
    assert w.result["figure"] is not None


@pytest.mark.parametrize("dtype", list(ch02.DTYPES))
def test_intensity_ridge_labels_do_not_overlap(dtype):
    # Five accelerators' ridges lie within a factor of 3 (bfloat16): their labels once overlapped.
    figure = ch02.intensity_calculator_view(dtype=dtype)["figure"]
    figure.draw_without_rendering()
    ax = figure.axes[0]
    labels = [t for t in ax.texts if any(t.get_text().startswith(name) for name in ACCELERATORS)]
    assert len(labels) == len(ACCELERATORS)
    boxes = [t.get_window_extent() for t in labels]
    for i, first in enumerate(boxes):
        for second in boxes[i + 1 :]:
            assert not first.overlaps(second)
        # nor do they cross the data: they sit right of the axes
        assert first.x0 >= ax.get_window_extent().x1


def test_intensity_table_cells_are_padded():
    # Without padding, the notebook's table styles ran the headers together.
    html = ch02.intensity_calculator_view(draw=False)["html"]
    cells = re.findall(r"<t[hd]([^>]*)>", html)
    assert len(cells) == (len(ACCELERATORS) + 2) * 5
    assert all("padding" in attributes for attributes in cells)


def test_intensity_calculator_reacts_to_every_control():
    box = ch02.intensity_calculator()
    w = box.interactive
    c = controls(w)
    values = []
    for length in c["length"].options:
        c["length"].value = length
        values.append(w.result["intensity"]["attention prefill"])
        # Decode intensity hardly depends on the length (q and o are tiny next to the cache).
        if length >= 1024:
            assert w.result["intensity"]["attention decode"] == pytest.approx(32 / 8, rel=0.01)
    assert values == sorted(values)
    for batch in c["batch"].options:
        c["batch"].value = batch
        assert w.result["intensity"]["attention decode"] == pytest.approx(4, rel=0.01)
        # 2 b w^2 FLOPs over (2 b w + w^2) * 2 bytes, w = 32 heads * 128: close to b while b << w.
        width = 32 * 128
        assert w.result["intensity"]["linear layer decode"] == pytest.approx(
            batch * width / (2 * batch + width)
        )
    for name in ("heads", "KV heads", "head dim"):
        for value in c[name].options:
            c[name].value = value
            assert w.result["intensity"]["attention decode"] >= 1.0 - 1e-3
    for dtype in c["dtype"].options:
        c["dtype"].value = dtype
        assert set(w.result["bound"]) == set(ACCELERATORS)
        assert box.children[1].value == w.result["html"]
    # float32 halves every intensity of bf16.
    c["dtype"].value = "bfloat16"
    bf16 = w.result["intensity"]["attention decode"]
    c["dtype"].value = "float32"
    assert w.result["intensity"]["attention decode"] == pytest.approx(bf16 / 2)


@pytest.mark.parametrize(
    "call,error,name",
    [
        (lambda: ch02.operation_cost("attention"), ValueError, "operation"),
        (lambda: ch02.operation_cost("attention decode", dtype="int4"), ValueError, "dtype"),
        (
            lambda: ch02.operation_cost("attention decode", num_heads=4, num_kv_heads=8),
            ValueError,
            "num_kv_heads",
        ),
        (lambda: ch02.roofline_explorer_view(accelerator="TPU", draw=False), ValueError, "accelerator"),
        (lambda: ch02.intensity_calculator_view(seq_len=0, draw=False), ValueError, "seq_len"),
        (lambda: ch02.plot_roofline({}), ValueError, "devices"),
    ],
)
def test_ch02_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


# --- chapter 03 widgets -------------------------------------------------------------------------


@pytest.mark.parametrize("loop_order", ch03.LOOP_ORDERS)
@pytest.mark.parametrize("causal", [False, True])
def test_tile_walk_ends_at_the_exact_softmax_statistics(loop_order, causal):
    T = 10
    first = ch03.tile_walk_view(0, loop_order, causal, T, 3, 4, draw=False)
    last = ch03.tile_walk_view(10**6, loop_order, causal, T, 3, 4, draw=False)
    assert first["num_steps"] == last["num_steps"] == math.ceil(T / 3) * math.ceil(T / 4)
    # After its last step a Q block holds its final max, sum and output; check every block.
    q, k, v = ch03.tile_walk_inputs(T)
    scores = (q @ k.transpose(-2, -1))[0, 0] / math.sqrt(ch03.WALK_HEAD_DIM)
    if causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    for step in range(last["num_steps"]):
        view = ch03.tile_walk_view(step, loop_order, causal, T, 3, 4, draw=False)
        q0, q1 = view["q_rows"]
        # Both loop orders: once the last K block has been visited, the Q block's state is final.
        if view["k_rows"][1] == T:
            torch.testing.assert_close(view["row_max"], scores[q0:q1].amax(-1))
            torch.testing.assert_close(
                view["row_sum"], torch.exp(scores[q0:q1] - view["row_max"][:, None]).sum(-1)
            )
            assert view["output_error"] < 1e-12
    skipped = sum(
        ch03.tile_walk_view(s, loop_order, causal, T, 3, 4, draw=False)["skipped"]
        for s in range(last["num_steps"])
    )
    assert last["skipped_so_far"] == skipped
    assert (skipped > 0) == causal


def test_tile_walk_running_max_only_grows():
    previous = None
    for step in range(4):  # FA2, block 4, T = 16: steps 0..3 are Q block 0 against K blocks 0..3
        view = ch03.tile_walk_view(step, "fa2", False, 16, 4, 4, draw=False)
        assert view["q_rows"] == (0, 4)
        if previous is not None:
            assert (view["row_max"] >= previous).all()
        previous = view["row_max"]


def test_tile_walk_widget_reacts_to_every_control():
    w = ch03.tile_walk()
    c = controls(w)
    assert set(c) >= {"step", "loop order", "causal", "T = S", "block_q", "block_k"}
    for step in range(c["step"].min, c["step"].max + 1):  # every step once (each redraw costs)
        c["step"].value = step
        assert w.result["step"].step == step
    for order in c["loop order"].options:
        c["loop order"].value = order
        for causal in (False, True):
            c["causal"].value = causal
            for step in (c["step"].min, c["step"].max // 2, c["step"].max):
                c["step"].value = step
                assert w.result["step"].step == step
                assert w.result["skipped"] is False or causal
    for value in c["block_q"].options:
        c["block_q"].value = value
        assert c["step"].max == w.result["num_steps"] - 1
        assert w.result["q_rows"][1] - w.result["q_rows"][0] <= value
    for value in c["block_k"].options:
        c["block_k"].value = value
        assert c["step"].max == w.result["num_steps"] - 1
    for T in range(c["T = S"].min, c["T = S"].max + 1, 5):
        c["T = S"].value = T
        assert w.result["num_steps"] == math.ceil(T / c["block_q"].value) * math.ceil(T / c["block_k"].value)
    c["step"].value = c["step"].max
    assert w.result["output_error"] < 1e-12
    assert w.result["figure"] is not None


def test_io_explorer_matches_the_instrumented_counts():
    # The widget's numbers are io_cost's; io_cost must equal what flash_attention counts.
    view = ch03.io_explorer_view(
        N=256, d=16, block_q=32, block_k=64, loop_order="fa2", bytes_per_element=4, draw=False
    )
    stats = FlashStats()
    q, k, v = torch.randn(3, 1, 1, 256, 16).unbind(0)
    flash_attention(q, k, v, block_q=32, block_k=64, stats=stats)
    assert view["tiled_bytes"] == stats.bytes_moved(4)
    assert view["standard_bytes"] == (4 * 256 * 16 + 4 * 256 * 256) * 4


def test_io_explorer_reacts_to_every_control():
    box = ch03.io_explorer()
    w = box.interactive
    c = controls(w)
    assert set(c) >= {"N", "d", "SRAM KiB", "block_q", "block_k", "loop order", "dtype"}
    # 0 stands for the paper's choice of block: the slider says "auto", not "0".
    assert c["block_q"].value == c["block_k"].value == 0
    assert c["block_q"].label == c["block_k"].label == "auto"
    c["loop order"].value = "fa1"
    tiled = []
    for sram in c["SRAM KiB"].options:
        c["SRAM KiB"].value = sram
        tiled.append(w.result["tiled_bytes"])
        assert box.children[1].value == w.result["html"]
    # Theorem 2: more SRAM, bigger blocks, less traffic; with a tiny SRAM tiling loses.
    assert tiled == sorted(tiled, reverse=True)
    c["SRAM KiB"].value = 8
    assert w.result["ratio"] < 1
    c["SRAM KiB"].value = 256
    assert w.result["ratio"] > 1
    for N in c["N"].options:
        c["N"].value = N
        assert w.result["standard_bytes"] == pytest.approx((4 * N * c["d"].value + 4 * N * N) * 2)
    for d in c["d"].options:
        c["d"].value = d
        assert w.result["tile_bytes"] > 0
    for name in ("block_q", "block_k"):
        for label, value in c[name].options:
            c[name].value = value
            assert c[name].label == label
            assert value == 0 or w.result[name] == value
    for order in c["loop order"].options:
        c["loop order"].value = order
        assert w.result["cost"].loop_order == order
    c["dtype"].value = 2
    two = w.result["standard_bytes"]
    c["dtype"].value = 4
    assert w.result["standard_bytes"] == 2 * two


@pytest.mark.parametrize(
    "call,error,name",
    [
        (lambda: ch03.tile_walk_view(loop_order="fa3", draw=False), ValueError, "loop_order"),
        (lambda: ch03.tile_walk_view(block_q=0, draw=False), ValueError, "block_q"),
        (lambda: ch03.tile_walk_view(step=-1, draw=False), ValueError, "step"),
        (lambda: ch03.io_explorer_view(sram_kib=0, draw=False), ValueError, "sram_kib"),
        (lambda: ch03.io_explorer_view(N=0, draw=False), ValueError, "N"),
    ],
)
def test_ch03_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


# --- figures and the benchmark suite ------------------------------------------------------------


def test_chapter_figures_are_registered():
    for name in ("02_memory_hierarchy", "02_roofline", "03_tiling", "03_io_vs_block_size"):
        assert name in FIGURES
        assert FIGURES[name]().axes


def test_flash_suite_is_registered_and_its_methods_agree():
    methods, reference, lengths = bench.suites()["flash"]("cpu")
    phases, names = ("forward", "causal", "train", "decode"), ("flash", "sdpa", "dense")
    assert set(methods) == {f"{p}/{m}" for p in phases for m in names} | {"matmul"}
    assert reference == "forward/sdpa"
    assert lengths[0] == 512 and lengths[-1] == 16384  # prefill to 8192, decode caches of 1K-16K
    for phase in phases:  # 300: not a multiple of the block; train returns the gradients of q, k, v
        outputs = {name: methods[f"{phase}/{name}"](300)() for name in names}
        for name in ("flash", "dense"):
            torch.testing.assert_close(outputs[name], outputs["sdpa"], atol=1e-4, rtol=1e-4)
    assert methods["forward/flash"](8192) is None and methods["causal/flash"](8192) is not None


def test_flash_suite_runs_from_the_cli(tmp_path, capsys):
    path = tmp_path / "flash.json"
    bench.main(
        ["flash", "--lengths", "64", "128", "--min-run-time", "0.01", "--json", str(path), "--no-progress"]
    )
    printed = capsys.readouterr().out
    assert "flash/sdpa" in printed and "flash/dense" in printed and "GFLOP/s" in printed
    assert "matmul 2048^3" in printed and "targets" in printed
    assert path.exists()
