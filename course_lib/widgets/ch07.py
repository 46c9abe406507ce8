"""Chapter 07's explorers: what forget gates keep over time, and what select gates do to recall.

(a) The gate explorer draws one write followed through a recurrence ``S_t = G_t * S_{t-1} +
write_t`` (the study :mod:`course_lib.studies.gates`), for every recurrence of the catalogue that
declares its gates (the dropdown shows their titles): how much of it is left after t steps (the
decay profile), after how many steps it has fallen below 1/e (the effective memory horizon), and
how large the whole state grows under a stream of random writes. (b) The recall demo writes
key-value pairs into a state with linear attention and with the delta rule and reads them back:
interference between keys, and overwriting one key.
Both compute in float64; their states are checked against :mod:`course_lib.recurrent` in the tests.
"""

from __future__ import annotations

import math

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from .. import catalogue
from ..checks import check_bool, check_choice, check_float, check_int
from ..recurrent import delta_rule, gla

# The gate simulation is a study; GATE_METHODS and gate_inputs stay importable here for one release.
from ..studies.gates import GATE_METHODS, gate_inputs, gate_methods, gate_profile, gates_of
from ..viz import STYLE
from ._display import new_figure, show

__all__ = [
    "GATE_METHODS",
    "gate_inputs",
    "gate_explorer_view",
    "gate_explorer",
    "KEY_KINDS",
    "recall_inputs",
    "recall_demo_view",
    "recall_demo",
    "state_vs_kv_cache",
]

F64 = torch.float64

# --- (a) gate explorer --------------------------------------------------------------------------


def gate_explorer_view(
    method: str = "gla",
    decay: float = 0.95,
    spread: float = 1.0,
    beta: float = 0.5,
    steps: int = 200,
    *,
    draw: bool = True,
) -> dict:
    """Draw :func:`course_lib.studies.gates.gate_profile` of one head of ``method``: the decay profile
    and memory horizon (left), the state norm under random writes (right).

    Returns the profile's dict (``inputs``, ``profile``, ``per_dim``, ``horizon``,
    ``typical_horizon``, ``state_norm``, ``final_state``), plus ``figure`` when drawn.
    """
    view = gate_profile(method, decay, spread, beta, steps)
    profile, per_dim, horizon = view["profile"], view["per_dim"], view["horizon"]
    if draw:
        T = profile.shape[0]
        with plt.rc_context(STYLE):
            figure = new_figure((11, 3.8))
            left, right = figure.subplots(1, 2)
            if gates_of(method).forget == "vector":  # one gate per key dimension: draw some of them
                for d in range(0, per_dim.shape[1], 3):
                    left.plot(per_dim[:, d].numpy(), color="grey", alpha=0.35, linewidth=0.8)
                left.plot([], [], color="grey", alpha=0.5, label="single key dimensions")
            left.plot(profile.numpy(), linewidth=2, label="what is left of the first write")
            left.axhline(math.exp(-1), color="black", linestyle=":", linewidth=1, label="1/e")
            if horizon is not None:
                left.axvline(horizon, color="#D55E00", linestyle="--", linewidth=1)
            left.set_ylim(-0.02, 1.05)
            left.set_xlabel("steps after the write")
            left.set_ylabel("fraction left")
            shown = "beyond the window" if horizon is None else f"{horizon} steps"
            left.set_title(f"{catalogue.get(method).title}: decay profile, horizon {shown}")
            left.legend(frameon=False)
            right.plot(range(1, T + 1), view["state_norm"].numpy(), color="#009E73")
            right.set_xlabel("tokens written")
            right.set_ylabel("||S_t|| (Frobenius)")
            right.set_title("state norm under random unit writes")
            figure.tight_layout()
            show(figure)
        view["figure"] = figure
    return view


def gate_explorer() -> widgets.Widget:
    """Method, typical decay, data dependence and beta -> decay profile, horizon and state norm."""
    return widgets.interactive(
        gate_explorer_view,
        method=widgets.Dropdown(
            options=[(catalogue.get(name).title, name) for name in gate_methods()],
            value="gla",
            description="method",
        ),
        decay=widgets.FloatSlider(
            value=0.95, min=0.5, max=0.999, step=0.001, readout_format=".3f", description="decay"
        ),
        spread=widgets.FloatSlider(value=1.0, min=0.0, max=2.0, step=0.1, description="spread"),
        beta=widgets.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.05, description="beta"),
        steps=widgets.IntSlider(value=200, min=20, max=600, step=20, description="steps"),
        draw=widgets.fixed(True),
    )


# --- (b) recall demo ----------------------------------------------------------------------------

KEY_KINDS = ("random", "orthogonal")


def recall_inputs(
    num_pairs: int = 16, head_dim: int = 64, keys: str = "random", seed: int = 0
) -> dict[str, torch.Tensor]:
    """Unit keys (n, D), values (n, D) and one extra value for overwriting key 0 (float64, seeded).

    ``keys="orthogonal"`` makes the first ``min(n, D)`` keys orthonormal (the rest stay random:
    no more than D directions are orthogonal in D dimensions).
    """
    n = check_int(num_pairs, "num_pairs", min=1)
    D = check_int(head_dim, "head_dim", min=1)
    check_choice(keys, "keys", KEY_KINDS)
    generator = torch.Generator().manual_seed(seed)
    k = F.normalize(torch.randn(n, D, generator=generator, dtype=F64), dim=-1)
    values = torch.randn(n, D, generator=generator, dtype=F64)
    new_value = torch.randn(D, generator=generator, dtype=F64)
    if keys == "orthogonal":
        m = min(n, D)
        basis, _ = torch.linalg.qr(torch.randn(D, D, generator=generator, dtype=F64))
        k = torch.cat([basis[:, :m].T, k[m:]])
    return {"keys": k, "values": values, "new_value": new_value}


def _final_states(keys: torch.Tensor, values: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """States after writing every pair in order: linear attention (GLA with gates 0) and the delta rule."""
    k, v = keys[None, None], values[None, None]
    _, linear = gla(k, k, v, torch.zeros_like(k), form="recurrent", output_final_state=True)
    betas = torch.full(k.shape[:3], beta, dtype=F64)
    _, delta = delta_rule(k, k, v, betas, form="recurrent", output_final_state=True)
    return linear[0, 0], delta[0, 0]


def recall_demo_view(
    num_pairs: int = 16,
    head_dim: int = 64,
    beta: float = 1.0,
    keys: str = "random",
    overwrite: bool = True,
    *,
    draw: bool = True,
) -> dict:
    """Write the pairs (then, with ``overwrite``, key 0 again with a new value) and read every key back.

    Returns ``inputs``, the final states ``linear_state`` and ``delta_state`` (D, D), the read-outs
    ``linear_read`` and ``delta_read`` (n, D) = keys @ state, the relative errors per pair against the
    value each key should now return (for key 0 the new value when overwriting), their means, and
    with ``overwrite`` the coefficients ``(old, new)`` of the least-squares fit
    ``read(k_0) ~ old * v_old + new * v_new`` per method.
    """
    beta = check_float(beta, "beta", min=0.0, max=1.0)
    check_bool(overwrite, "overwrite")
    inputs = recall_inputs(num_pairs, head_dim, keys)
    k, v = inputs["keys"], inputs["values"]
    written_keys, written_values, targets = k, v, v.clone()
    if overwrite:
        written_keys = torch.cat([k, k[:1]])
        written_values = torch.cat([v, inputs["new_value"][None]])
        targets[0] = inputs["new_value"]
    linear_state, delta_state = _final_states(written_keys, written_values, beta)
    view: dict = {"inputs": inputs, "linear_state": linear_state, "delta_state": delta_state}
    for name, state in (("linear", linear_state), ("delta", delta_state)):
        read = k @ state
        errors = (read - targets).norm(dim=-1) / targets.norm(dim=-1)
        view[f"{name}_read"], view[f"{name}_error"] = read, errors
        view[f"{name}_mean_error"] = errors.mean().item()
        if overwrite:
            basis = torch.stack([v[0], inputs["new_value"]], dim=1)  # (D, 2)
            view[f"{name}_old_new"] = torch.linalg.lstsq(basis, read[0]).solution
    if draw:
        n = k.shape[0]
        with plt.rc_context(STYLE):
            figure = new_figure((14, 3.8))
            axes = figure.subplots(1, 3, gridspec_kw={"width_ratios": [2.2, 1.2, 1.2]})
            positions = torch.arange(n).numpy()
            axes[0].bar(positions - 0.2, view["linear_error"].numpy(), width=0.4, label="linear attention")
            axes[0].bar(
                positions + 0.2, view["delta_error"].numpy(), width=0.4, label=f"delta rule, beta={beta:g}"
            )
            axes[0].set_xlabel("pair (in writing order)")
            axes[0].set_ylabel("relative error of read-out")
            means = f"{view['linear_mean_error']:.2f} (linear) vs {view['delta_mean_error']:.2f} (delta)"
            axes[0].set_title(f"recall: mean error {means}")
            axes[0].legend(frameon=False)
            similarity = (k @ k.T).abs()
            image = axes[1].imshow(similarity.numpy(), cmap="viridis", vmin=0, vmax=1)
            figure.colorbar(image, ax=axes[1], fraction=0.046, pad=0.04)
            axes[1].set_title(f"|k_i . k_j|: {keys} keys, D={k.shape[1]}")
            axes[1].set_xlabel("key j")
            axes[1].set_ylabel("key i")
            if overwrite:
                labels = ["old value", "new value"]
                axes[2].bar([-0.2, 0.8], view["linear_old_new"].numpy(), width=0.4, label="linear attention")
                axes[2].bar([0.2, 1.2], view["delta_old_new"].numpy(), width=0.4, label="delta rule")
                axes[2].set_xticks([0, 1], labels)
                axes[2].set_ylabel("weight in read(k_0)")
                top = max(1.0, float(view["linear_old_new"].max()), float(view["delta_old_new"].max()))
                axes[2].set_ylim(top=1.4 * top)
                axes[2].set_title("key 0 written twice")
                axes[2].legend(frameon=False)
            else:
                axes[2].axis("off")
                axes[2].text(0.5, 0.5, "overwrite off", ha="center", va="center")
            figure.tight_layout()
            show(figure)
        view["figure"] = figure
    return view


def recall_demo() -> widgets.Widget:
    """Pairs, head size, beta, key kind, overwriting -> read-back errors, linear attention vs delta rule."""
    return widgets.interactive(
        recall_demo_view,
        num_pairs=widgets.IntSlider(value=16, min=1, max=128, description="pairs"),
        head_dim=widgets.SelectionSlider(options=[8, 16, 32, 64, 128], value=64, description="head dim"),
        beta=widgets.FloatSlider(value=1.0, min=0.0, max=1.0, step=0.05, description="beta"),
        keys=widgets.Dropdown(options=KEY_KINDS, value="random", description="keys"),
        overwrite=widgets.Checkbox(value=True, description="overwrite key 0"),
        draw=widgets.fixed(True),
    )


# --- state size vs KV cache ---------------------------------------------------------------------


def state_vs_kv_cache(seq_len: int, head_dim: int = 64, value_dim: int | None = None) -> dict[str, int]:
    """Floats one head must keep to generate the next token after ``seq_len`` tokens.

    Softmax attention keeps every key and value: ``seq_len * (head_dim + value_dim)``. A recurrence
    keeps its state: ``head_dim * value_dim``, whatever the length (mLSTM adds a normaliser of
    ``head_dim`` and one stabiliser; the short convolutions a few tokens more, left out here).
    """
    seq_len = check_int(seq_len, "seq_len", min=0)
    head_dim = check_int(head_dim, "head_dim", min=1)
    value_dim = head_dim if value_dim is None else check_int(value_dim, "value_dim", min=1)
    return {"kv_cache": seq_len * (head_dim + value_dim), "state": head_dim * value_dim}
