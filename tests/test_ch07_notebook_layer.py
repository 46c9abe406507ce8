"""Chapter 07's notebook layer: widgets (headless), figures and the bench suites."""

import math

import ipywidgets
import pytest
import torch
import torch.nn.functional as F

from course_lib import bench
from course_lib.bench import Measurement
from course_lib.benchmarks import ch07 as bench07
from course_lib.figures import FIGURES
from course_lib.figures.ch07 import TAXONOMY, ttt_prediction_errors
from course_lib.recurrent import delta_rule, gated_delta_rule, gla, ssd
from course_lib.widgets import ch07 as w07

F64 = torch.float64


def controls(widget):
    return {c.description: c for c in widget.children if isinstance(c, ipywidgets.ValueWidget)}


# --- (a) gate explorer ----------------------------------------------------------------------------


def test_gate_inputs_have_each_methods_gate_structure():
    T, D = 50, 16
    none = w07.gate_inputs("linear attention", steps=T)
    assert (none["log_gates"] == 0).all() and (none["beta"] == 1).all()
    retnet = w07.gate_inputs("retnet", decay=0.9, steps=T)
    torch.testing.assert_close(retnet["log_gates"], torch.full((T, D), math.log(0.9), dtype=F64))
    mamba = w07.gate_inputs("mamba2", spread=1.0, steps=T)["log_gates"]
    assert (mamba == mamba[:, :1]).all() and mamba[:, 0].std() > 0  # scalar per step, varies over time
    glag = w07.gate_inputs("gla", spread=1.0, steps=T)["log_gates"]
    assert glag.std(dim=1).min() > 0 and glag.std(dim=0).min() > 0  # varies over dimensions and steps
    assert (glag < 0).all()
    delta = w07.gate_inputs("gated_deltanet", beta=0.3, steps=T)
    assert (delta["beta"] == 0.3).all()
    torch.testing.assert_close(delta["keys"].norm(dim=-1), torch.ones(T, dtype=F64))
    with pytest.raises(ValueError, match="method"):
        w07.gate_inputs("transformer")
    with pytest.raises(ValueError, match="decay"):
        w07.gate_inputs("retnet", decay=1.0)


@pytest.mark.parametrize("method", w07.GATE_METHODS)
def test_gate_explorer_state_equals_the_library(method):
    view = w07.gate_explorer_view(method, decay=0.9, spread=0.8, beta=0.6, steps=40, draw=False)
    x = view["inputs"]
    k, v = x["keys"][None, None], x["values"][None, None]
    if method in ("deltanet", "gated_deltanet"):
        beta = x["beta"][None, None]
        g = x["log_gates"][None, None, :, 0]
        if method == "deltanet":
            _, state = delta_rule(k, k, v, beta, form="recurrent", output_final_state=True)
        else:
            _, state = gated_delta_rule(k, k, v, g, beta, form="recurrent", output_final_state=True)
    else:
        _, state = gla(k, k, v, x["log_gates"][None, None], form="recurrent", output_final_state=True)
    torch.testing.assert_close(view["final_state"], state[0, 0])
    torch.testing.assert_close(view["state_norm"][-1], state[0, 0].norm())
    assert view["profile"][0] == pytest.approx(1.0)


def test_a_fixed_decay_has_profile_gamma_to_the_t_and_horizon_near_one_over_one_minus_gamma():
    for decay in (0.8, 0.95, 0.99):
        view = w07.gate_explorer_view("retnet", decay=decay, steps=600, draw=False)
        steps = torch.arange(600, dtype=F64)
        torch.testing.assert_close(view["profile"], decay**steps)
        assert view["horizon"] == math.floor(-1 / math.log(decay)) + 1
        assert view["typical_horizon"] == pytest.approx(-1 / math.log(decay))
        # Triangle inequality: ||S|| <= sum of decay^s over unit writes < 1 / (1 - decay).
        assert view["state_norm"].max() < 1 / (1 - decay)


def test_without_a_gate_nothing_fades_and_the_state_keeps_growing():
    view = w07.gate_explorer_view("linear attention", steps=400, draw=False)
    torch.testing.assert_close(view["profile"], torch.ones(400, dtype=F64))
    assert view["horizon"] is None and view["typical_horizon"] is None
    assert view["state_norm"][-1] > 3 * view["state_norm"][20]
    # The delta rule has no forget gate, yet old writes fade (erased along later keys).
    delta = w07.gate_explorer_view("deltanet", beta=1.0, steps=400, draw=False)
    assert delta["horizon"] is not None and delta["state_norm"][-1] < view["state_norm"][-1] / 3


def test_gate_explorer_widget_reacts_to_every_control():
    w = w07.gate_explorer()
    c = controls(w)
    assert set(c) >= {"method", "decay", "spread", "beta", "steps"}
    for method in c["method"].options:
        c["method"].value = method
        assert w.result["method"] == method and w.result["figure"] is not None
    c["method"].value = "retnet"
    horizons = []
    for decay in (c["decay"].min, 0.9, c["decay"].max):
        c["decay"].value = decay
        horizons.append(w.result["typical_horizon"])
    assert horizons == sorted(horizons)
    c["method"].value = "gla"
    for spread in (c["spread"].min, 1.0, c["spread"].max):
        c["spread"].value = spread
        assert torch.isfinite(w.result["profile"]).all()
    c["method"].value = "deltanet"
    for beta in (c["beta"].min, 0.5, c["beta"].max):
        c["beta"].value = beta
        assert (w.result["inputs"]["beta"] == beta).all()
    for steps in (c["steps"].min, c["steps"].max):
        c["steps"].value = steps
        assert w.result["profile"].shape == (steps,)


# --- (b) recall demo ------------------------------------------------------------------------------


def test_recall_states_equal_references_written_here():
    view = w07.recall_demo_view(num_pairs=10, head_dim=8, beta=0.7, overwrite=True, draw=False)
    x = view["inputs"]
    keys = torch.cat([x["keys"], x["keys"][:1]])
    values = torch.cat([x["values"], x["new_value"][None]])
    torch.testing.assert_close(view["linear_state"], keys.T @ values)
    S = torch.zeros(8, 8, dtype=F64)
    for k, v in zip(keys, values):
        S = S + 0.7 * torch.outer(k, v - S.T @ k)
    torch.testing.assert_close(view["delta_state"], S)
    torch.testing.assert_close(view["delta_read"], x["keys"] @ S)


def test_orthogonal_keys_are_recalled_exactly_and_overwriting_differs():
    view = w07.recall_demo_view(
        num_pairs=16, head_dim=32, beta=1.0, keys="orthogonal", overwrite=True, draw=False
    )
    assert view["delta_mean_error"] < 1e-10
    assert view["linear_error"][1:].max() < 1e-10  # every key but the overwritten one
    assert view["linear_error"][0] > 0.5
    torch.testing.assert_close(view["linear_old_new"], torch.ones(2, dtype=F64))
    torch.testing.assert_close(view["delta_old_new"], torch.tensor([0.0, 1.0], dtype=F64), atol=1e-10, rtol=0)


def test_random_keys_interfere_less_with_the_delta_rule():
    for seed_pairs in (8, 16, 32):
        view = w07.recall_demo_view(num_pairs=seed_pairs, head_dim=64, beta=1.0, overwrite=False, draw=False)
        assert 0 < view["delta_mean_error"] < view["linear_mean_error"]
    # With beta = 1 the last write is always recalled exactly, even over random keys.
    view = w07.recall_demo_view(num_pairs=40, head_dim=16, beta=1.0, overwrite=True, draw=False)
    torch.testing.assert_close(view["delta_read"][0], view["inputs"]["new_value"])


def test_recall_demo_widget_reacts_to_every_control():
    w = w07.recall_demo()
    c = controls(w)
    assert set(c) >= {"pairs", "head dim", "beta", "keys", "overwrite key 0"}
    for n in (c["pairs"].min, 16, c["pairs"].max):
        c["pairs"].value = n
        assert w.result["linear_error"].shape == (n,)
    for D in c["head dim"].options:
        c["head dim"].value = D
        assert w.result["delta_state"].shape == (D, D)
    for beta in (c["beta"].min, 0.5, c["beta"].max):
        c["beta"].value = beta
        assert torch.isfinite(w.result["delta_read"]).all()
    for kind in c["keys"].options:
        c["keys"].value = kind
        assert w.result["figure"] is not None
    c["overwrite key 0"].value = False
    assert "delta_old_new" not in w.result
    c["overwrite key 0"].value = True
    assert "delta_old_new" in w.result


def test_state_vs_kv_cache_by_hand():
    assert w07.state_vs_kv_cache(2048, 64) == {"kv_cache": 2048 * 128, "state": 64 * 64}
    assert w07.state_vs_kv_cache(10, 16, 8) == {"kv_cache": 240, "state": 128}
    with pytest.raises(ValueError, match="head_dim"):
        w07.state_vs_kv_cache(10, 0)


# --- figures --------------------------------------------------------------------------------------


def test_chapter_figures_are_registered():
    assert {"07_gates", "07_taxonomy", "07_ttt_hidden_state"} <= set(FIGURES)


def test_taxonomy_places_every_method_of_the_issue():
    names = set(TAXONOMY)
    for method in (
        "linear attention",
        "RetNet",
        "GLA",
        "Mamba-2 (SSD)",
        "mLSTM",
        "HGRN-2",
        "RWKV-6",
        "DeltaNet",
        "Gated DeltaNet",
        "TTT-Linear",
    ):
        assert method in names
    assert TAXONOMY["linear attention"][0] == "no gate"
    assert TAXONOMY["RetNet"][0] == "forget" and TAXONOMY["Gated DeltaNet"][0] == "forget + select"


def test_ttt_learns_the_hidden_map_and_linear_attention_does_not():
    errors = ttt_prediction_errors()
    for name in ("ttt, mini-batch 1", "ttt, mini-batch 16"):
        assert errors[name][-40:].mean() < 0.2 * errors[name][:10].mean()
    assert errors["linear attention"][-40:].mean() > errors["linear attention"][:10].mean()


# --- benchmark suites -----------------------------------------------------------------------------


def test_suites_are_registered_and_forms_compute_the_same():
    suites = bench.suites()
    assert {"recurrent", "recurrent_chunk"} <= set(suites)
    methods, reference, lengths = suites["recurrent"]("cpu")
    assert reference == "sdpa" and lengths[0] == 256 and lengths[-1] == 4096
    assert {f"{m} {f}" for m in bench07.METHODS for f in ("chunk", "recurrent")} <= set(methods)
    for name in bench07.METHODS:
        chunk, recurrent = methods[f"{name} chunk"](70)(), methods[f"{name} recurrent"](70)()
        torch.testing.assert_close(chunk, recurrent, rtol=1e-4, atol=1e-4)
    q, k, v = bench.random_qkv(70, heads=4)
    torch.testing.assert_close(methods["sdpa"](70)(), F.scaled_dot_product_attention(q, k, v, is_causal=True))
    chunk_methods, _, chunk_lengths = suites["recurrent_chunk"]("cpu")
    assert not any("recurrent" in m for m in chunk_methods) and chunk_lengths[-1] > 4096


def test_recurrent_sweep_caps_the_recurrent_forms():
    results = bench07.recurrent_sweep(
        [16, 32], recurrent_max_t=16, methods=("gla",), min_run_time=0.001, measure_memory=False
    )
    measured = {(r.method, r.T) for r in results}
    assert measured == {
        ("sdpa", 16),
        ("sdpa", 32),
        ("gla chunk", 16),
        ("gla chunk", 32),
        ("gla recurrent", 16),
    }
    assert set(bench07.speedups(results)) == {("gla", 16)}
    with pytest.raises(ValueError, match="methods"):
        bench07.recurrent_sweep([16], methods=("lstm",))


def test_speedups_divide_recurrent_by_chunk_time():
    results = [
        Measurement("gla chunk", 8, 0.5, None),
        Measurement("gla recurrent", 8, 2.0, None),
        Measurement("ssd chunk", 8, 1.0, None),
    ]
    assert bench07.speedups(results) == {("gla", 8): 4.0}


def test_run_method_passes_each_method_its_own_inputs():
    x = bench07.recurrent_inputs(20)
    torch.testing.assert_close(
        bench07.run_method("delta_rule", x, form="recurrent"),
        delta_rule(x["q"], x["unit_k"], x["v"], x["beta"], form="recurrent"),
    )
    torch.testing.assert_close(
        bench07.run_method("ssd", x, chunk_size=8),
        ssd(x["v"], x["dt"], x["A"], x["k"], x["q"], form="parallel"),
    )
    with pytest.raises(ValueError, match="name"):
        bench07.run_method("mamba", x)
