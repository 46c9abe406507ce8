"""Chapter 07's notebook layer: widgets (headless), figures and the bench suites."""

import math

import ipywidgets
import pytest
import torch
import torch.nn.functional as F

from course_lib import bench, catalogue
from course_lib.bench import Measurement
from course_lib.benchmarks import ch07 as bench07
from course_lib.figures import FIGURES
from course_lib.figures.ch07 import TAXONOMY, placement, ttt_prediction_errors
from course_lib.recurrent import delta_rule, gated_delta_rule, gla, ssd
from course_lib.widgets import ch07 as w07

F64 = torch.float64


def controls(widget):
    return {c.description: c for c in widget.children if isinstance(c, ipywidgets.ValueWidget)}


# --- (a) gate explorer ----------------------------------------------------------------------------


def test_gate_inputs_have_each_methods_gate_structure():
    T, D = 50, 16
    none = w07.gate_inputs("linear_attention", steps=T)
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


def test_gate_explorer_offers_every_recurrence_of_the_catalogue_with_gates():
    assert w07.GATE_METHODS == catalogue.names(has="gates")
    assert {"linear_attention", "retnet", "gla", "mamba2", "deltanet", "gated_deltanet", "rwkv7"} <= set(
        w07.GATE_METHODS
    )


# Gates with a library function that runs the same recurrence: any forget gate with an additive
# write is GLA (a zero, constant or broadcast gate); a delta-rule write without a forget gate is the
# delta rule, with a scalar one Gated DeltaNet. (A per-dimension gate before a delta-rule write has
# no such function: tests/test_studies.py checks every method against a loop written out instead.)
LIBRARY_GATES = [
    m.name for m in catalogue.mechanisms(has="gates") if m.gates.write == "add" or m.gates.forget != "vector"
]


@pytest.mark.parametrize("method", LIBRARY_GATES)
def test_gate_explorer_state_equals_the_library(method):
    view = w07.gate_explorer_view(method, decay=0.9, spread=0.8, beta=0.6, steps=40, draw=False)
    x = view["inputs"]
    k, v = x["keys"][None, None], x["values"][None, None]
    gates = catalogue.get(method).gates
    if gates.write == "delta":
        beta = x["beta"][None, None]
        g = x["log_gates"][None, None, :, 0]
        assert gates.forget in ("none", "scalar")
        if gates.forget == "none":
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
    view = w07.gate_explorer_view("linear_attention", steps=400, draw=False)
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
    assert list(c["method"].options) == [(m.title, m.name) for m in catalogue.mechanisms(has="gates")]
    for _, method in c["method"].options:
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
    assert list(TAXONOMY) == [m.title for m in catalogue.mechanisms(has="gates")]
    for method in (
        "linear attention",
        "RetNet",
        "GLA",
        "Mamba-2 (SSD)",
        "mLSTM (xLSTM)",
        "HGRN-2",
        "RWKV-6",
        "DeltaNet",
        "Gated DeltaNet",
        "TTT-Linear",
    ):
        assert method in TAXONOMY
    assert TAXONOMY["linear attention"] == ("no gate", "identity", "k v^T")
    assert TAXONOMY["RetNet"] == ("forget", "scalar, fixed", "k v^T")
    assert TAXONOMY["GLA"] == ("forget", "diagonal, data dependent", "k v^T")
    assert TAXONOMY["Mamba-2 (SSD)"] == ("forget + select", "scalar, data dependent", "dt k v^T")
    assert TAXONOMY["DeltaNet"] == ("forget + select", "I - beta k k^T", "beta k v^T")
    assert TAXONOMY["Gated DeltaNet"] == ("forget + select", "alpha (I - beta k k^T)", "beta k v^T")


def test_placement_reads_the_gates():
    assert placement(catalogue.Gates()) == ("no gate", "identity", "k v^T")
    assert placement(catalogue.Gates(forget="vector", select="1 - f")) == (
        "forget + select",
        "diagonal, data dependent",
        "(1 - f) k v^T",
    )
    # a delta-rule write forgets along the key it writes, even without a select gate of its own
    assert placement(catalogue.Gates(write="delta")) == ("forget + select", "I - beta k k^T", "beta k v^T")
    assert placement(catalogue.Gates(forget="vector", select="lr", write="delta"))[1:] == (
        "diag(w) (I - beta k k^T)",
        "lr k v^T",
    )


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
    chapter = catalogue.mechanisms(chapter=7, has="recurrent")
    assert bench07.mechanisms() == chapter and len(chapter) >= 10
    assert set(methods) == {"sdpa"} | {f"{m.name} {form}" for m in chapter for form in m.forms}
    for mechanism in chapter:
        chunk = methods[f"{mechanism.name} chunk"](70)()
        for form in mechanism.forms:
            torch.testing.assert_close(methods[f"{mechanism.name} {form}"](70)(), chunk, rtol=1e-4, atol=1e-4)
    x = catalogue.get("sdpa").make_inputs(70, bench07.GEOMETRY)
    expected = F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)
    torch.testing.assert_close(methods["sdpa"](70)(), expected)
    # every form but the chunk form stops at RECURRENT_MAX_T
    assert methods["gla recurrent"](2 * bench07.RECURRENT_MAX_T) is None
    assert methods["mamba1 scan"](2 * bench07.RECURRENT_MAX_T) is None
    chunk_methods, _, chunk_lengths = suites["recurrent_chunk"]("cpu")
    assert set(chunk_methods) == {"sdpa"} | {f"{m.name} chunk" for m in chapter} and chunk_lengths[-1] > 4096


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
        Measurement("mamba2 chunk", 8, 1.0, None),
    ]
    assert bench07.speedups(results) == {("gla", 8): 4.0}


def test_each_method_runs_on_its_own_catalogue_inputs():
    methods, _, _ = bench07.recurrent_suite("cpu")
    x = catalogue.get("deltanet").make_inputs(20, bench07.GEOMETRY)
    torch.testing.assert_close(x["k"].norm(dim=-1), torch.ones(1, 4, 20))  # the delta rule's unit keys
    torch.testing.assert_close(
        methods["deltanet recurrent"](20)(), delta_rule(x["q"], x["k"], x["v"], x["beta"], form="recurrent")
    )
    y = catalogue.get("mamba2").make_inputs(20, bench07.GEOMETRY)
    torch.testing.assert_close(
        methods["mamba2 chunk"](20)(),
        ssd(y["x"], y["dt"], y["A"], y["B"], y["C"], form="parallel"),
        rtol=1e-4,
        atol=1e-5,
    )
