"""Chapter 07's figures: forget and select gates, the methods placed by gate type, TTT's learnable state."""

from __future__ import annotations

from collections.abc import Callable

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from .. import catalogue
from ..catalogue import Gates
from ..recurrent import delta_rule, gla, retnet_gammas, ttt_linear
from ..studies.gates import gate_profile
from ..viz import STYLE

__all__ = [
    "FIGURES",
    "gates",
    "taxonomy",
    "placement",
    "ttt_hidden_state",
    "TAXONOMY",
    "ttt_prediction_errors",
]

F64 = torch.float64


def _overwrite_weights(beta: float) -> tuple[float, float, float, float]:
    """Write v1 then v2 under one unit key; return the weights of v1 and v2 in the read-out,
    for the delta rule (write strength beta) and for linear attention."""
    generator = torch.Generator().manual_seed(0)
    D = 8
    key = F.normalize(torch.randn(D, generator=generator, dtype=F64), dim=0)
    values = torch.linalg.qr(torch.randn(D, 2, generator=generator, dtype=F64))[0].T  # orthonormal v1, v2
    k = key.expand(1, 1, 2, D)
    v = values[None, None]
    _, delta = delta_rule(k, k, v, torch.full((1, 1, 2), beta, dtype=F64), output_final_state=True)
    _, linear = gla(k, k, v, torch.zeros_like(k), output_final_state=True)
    read_delta, read_linear = key @ delta[0, 0], key @ linear[0, 0]
    return (*(values @ read_delta).tolist(), *(values @ read_linear).tolist())


def gates() -> Figure:
    """(a) RetNet's fixed decays, (b) GLA's data-dependent per-dimension decays, (c) the select gate
    beta: what a second write under the same key leaves of the first."""
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(1, 3, figsize=(15, 4))
        steps = torch.arange(0, 513, dtype=F64)
        for gamma in retnet_gammas(4).tolist():
            horizon = 1 / (1 - gamma)
            axes[0].plot(
                steps.numpy(), (gamma**steps).numpy(), label=f"gamma = {gamma:.4g}: ~{horizon:.0f} tokens"
            )
            axes[0].plot([horizon], [gamma**horizon], marker="o", color="black", markersize=3)
        axes[0].axhline(torch.e**-1, color="grey", linestyle=":", linewidth=1)
        axes[0].set_xlabel("steps since the write")
        axes[0].set_ylabel("weight left, gamma^t")
        axes[0].set_title("forget gate, fixed (RetNet, 4 heads)")
        axes[0].legend(frameon=False, fontsize=8)

        view = gate_profile("gla", decay=0.97, spread=1.0, steps=300)
        per_dim = view["per_dim"]
        for d in range(per_dim.shape[1]):
            axes[1].plot(per_dim[:, d].numpy(), color="#0072B2", alpha=0.35, linewidth=0.9)
        axes[1].plot(view["profile"].numpy(), color="black", linewidth=2, label="whole write (norm)")
        axes[1].plot([], [], color="#0072B2", alpha=0.5, label="single key dimensions")
        axes[1].set_xlabel("steps since the write")
        axes[1].set_ylabel("weight left")
        axes[1].set_title("forget gate, data dependent per dimension (GLA)")
        axes[1].legend(frameon=False, fontsize=8)

        betas = torch.linspace(0, 1, 21).tolist()
        weights = [_overwrite_weights(b) for b in betas]
        axes[2].plot(betas, [w[0] for w in weights], label="delta rule: old value v1")
        axes[2].plot(betas, [w[1] for w in weights], label="delta rule: new value v2")
        axes[2].plot(betas, [w[2] for w in weights], linestyle="--", label="linear attention: v1 (and v2)")
        axes[2].set_xlabel("write strength beta of both writes")
        axes[2].set_ylabel("weight in read(k)")
        axes[2].set_title("select gate: v1 then v2 under one key")
        axes[2].legend(frameon=False, fontsize=8)
        figure.tight_layout()
    return figure


# The structure of G_t for each forget gate, with an additive write and with a delta-rule write
# (which also erases along the key it writes: I - beta k k^T, beta the select gate).
_DECAY = {
    "none": "identity",
    "fixed": "scalar, fixed",
    "scalar": "scalar, data dependent",
    "vector": "diagonal, data dependent",
}
_ERASE = {
    "none": "I - beta k k^T",
    "fixed": "gamma (I - beta k k^T)",
    "scalar": "alpha (I - beta k k^T)",
    "vector": "diag(w) (I - beta k k^T)",
}
_COLUMNS = ("no gate", "forget", "forget + select")
_ROWS = (*_DECAY.values(), *_ERASE.values())


def placement(gates: Gates) -> tuple[str, str, str]:
    """Where a recurrence sits in the taxonomy, read off its :class:`~course_lib.catalogue.Gates`:
    (column: which gates, row: the structure of G_t, the write term).

    A data-dependent write strength (``select``) or a delta-rule write (which forgets along the
    key it writes) puts it under "forget + select"; a forget gate alone under "forget".
    """
    if gates.select is not None or gates.write == "delta":
        column = "forget + select"
    else:
        column = "forget" if gates.forget != "none" else "no gate"
    row = (_ERASE if gates.write == "delta" else _DECAY)[gates.forget]
    strength = gates.select or ("beta" if gates.write == "delta" else "")
    if " " in strength:
        strength = f"({strength})"
    return column, row, f"{strength} k v^T".strip()


def _taxonomy() -> dict[str, tuple[str, str, str]]:
    return {m.title: placement(m.gates) for m in catalogue.mechanisms(has="gates")}


# title -> (column: gate type, row: structure of G_t, short write term), from the catalogue's gates
TAXONOMY: dict[str, tuple[str, str, str]] = _taxonomy()


def taxonomy() -> Figure:
    """The linear-attention family on two axes: which gates (columns) and the shape of G_t (rows)."""
    with plt.rc_context(STYLE):
        figure, ax = plt.subplots(figsize=(14, 5.6))
        colours = {"no gate": "#f2f2f2", "forget": "#cfe3f3", "forget + select": "#f6dcc8"}
        placed = _taxonomy()
        rows = [row for row in _ROWS if any(r == row for _, r, _ in placed.values())]
        for x, column in enumerate(_COLUMNS):
            ax.add_patch(
                FancyBboxPatch(
                    (x + 0.04, -0.45),
                    0.92,
                    len(rows) - 0.1,
                    boxstyle="round,pad=0.02",
                    facecolor=colours[column],
                    edgecolor="none",
                )
            )
            ax.text(x + 0.5, -0.75, column, ha="center", va="center", fontsize=12, weight="bold")
        for name, (column, row, write) in placed.items():
            x, y = _COLUMNS.index(column), rows.index(row)
            same = [n for n, (c, r, _) in placed.items() if c == column and r == row]
            offset = (same.index(name) - (len(same) - 1) / 2) * 0.92 / max(len(same), 2)
            ax.text(x + 0.5 + offset, y + 0.05, name, ha="center", va="center", fontsize=9.5, weight="bold")
            ax.text(
                x + 0.5 + offset,
                y + 0.3,
                f"write {write}",
                ha="center",
                va="center",
                fontsize=7,
                color="#444444",
            )
        ax.set_xlim(0, len(_COLUMNS))
        ax.set_ylim(len(rows) - 0.4, -1.0)
        ax.set_yticks(range(len(rows)), [f"G_t = {r}" if r != "identity" else "G_t = 1" for r in rows])
        ax.set_xticks([])
        for side in ("top", "right", "bottom", "left"):
            ax.spines[side].set_visible(False)
        ax.tick_params(axis="y", length=0)
        ax.set_title(
            "S_t = G_t * S_{t-1} + write_t: the methods by gate type (columns) and decay structure (rows)"
        )
    return figure


def ttt_prediction_errors(
    T: int = 160, D: int = 16, lr: float = 0.5, seed: int = 0
) -> dict[str, torch.Tensor]:
    """How well each state predicts the *next* value before writing it, on a stream with
    ``v_t = M^T k_t + noise`` (a fixed hidden map M, unit keys).

    With query ``q_t = k_{t+1}`` and scale 1 the output ``o_t = S_t^T k_{t+1}`` is the prediction of
    ``v_{t+1}``, so one call per method gives every prediction. Returns the squared errors (T - 1,)
    of TTT-Linear (mini-batch 1 and 16) and of linear attention, and the noise level.
    """
    generator = torch.Generator().manual_seed(seed)
    M = torch.randn(D, D, generator=generator, dtype=F64) / D**0.5
    k = F.normalize(torch.randn(1, 1, T, D, generator=generator, dtype=F64), dim=-1)
    noise = 0.05 * torch.randn(1, 1, T, D, generator=generator, dtype=F64)
    v = k @ M + noise
    q = torch.cat([k[:, :, 1:], torch.zeros_like(k[:, :, :1])], dim=2)
    rates = torch.full((1, 1, T), lr, dtype=F64)
    target = v[0, 0, 1:]

    def errors(o):
        return (o[0, 0, :-1] - target).pow(2).sum(-1)

    return {
        "ttt, mini-batch 1": errors(ttt_linear(q, k, v, rates, mini_batch_size=1, scale=1.0)),
        "ttt, mini-batch 16": errors(ttt_linear(q, k, v, rates, mini_batch_size=16, scale=1.0)),
        "linear attention": errors(gla(q, k, v, torch.zeros_like(k), scale=1.0)),
        "noise": noise[0, 0, 1:].pow(2).sum(-1),
    }


def ttt_hidden_state() -> Figure:
    """TTT: the hidden state is the weight of an inner model trained by one gradient step per token."""
    with plt.rc_context(STYLE):
        figure, (left, right) = plt.subplots(1, 2, figsize=(14, 4.6), gridspec_kw={"width_ratios": [1.25, 1]})
        left.set_xlim(0, 10)
        left.set_ylim(0, 6)
        left.axis("off")

        def box(x, y, text, colour):
            left.add_patch(
                FancyBboxPatch(
                    (x - 1.05, y - 0.45),
                    2.1,
                    0.9,
                    boxstyle="round,pad=0.05",
                    facecolor=colour,
                    edgecolor="#555555",
                )
            )
            left.text(x, y, text, ha="center", va="center", fontsize=9)

        def arrow(start, end, text=None, dy=0.25):
            left.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color="#333333"))
            if text:
                left.text(
                    (start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + dy, text, ha="center", fontsize=8
                )

        box(1.3, 5.0, "token x_t", "#f2f2f2")
        box(1.3, 3.0, "views\nk_t, v_t, q_t", "#f2f2f2")
        box(5.0, 5.0, "inner model\nf(k; W_{t-1}) = W^T k", "#cfe3f3")
        box(5.0, 3.0, "loss\n||W^T k_t - v_t||^2 / 2", "#f6dcc8")
        box(5.0, 1.0, "W_t = W_{t-1}\n - eta_t grad", "#cfe3f3")
        box(8.6, 1.0, "output\no_t = W_t^T q_t", "#f2f2f2")
        arrow((1.3, 4.55), (1.3, 3.45), "learned projections", dy=0.0)
        arrow((2.35, 3.0), (3.95, 3.0), "k_t, v_t")
        arrow((5.0, 4.55), (5.0, 3.45))
        arrow((5.0, 2.55), (5.0, 1.45), "gradient", dy=0.0)
        arrow((6.05, 1.0), (7.55, 1.0), "W_t")
        arrow((2.35, 2.7), (7.9, 1.45), "q_t", dy=-0.45)
        left.add_patch(
            FancyArrowPatch(
                (6.05, 1.2),
                (6.05, 4.8),
                connectionstyle="arc3,rad=-0.5",
                arrowstyle="-|>",
                mutation_scale=12,
                color="#0072B2",
                linestyle="--",
            )
        )
        left.text(7.3, 3.3, "next token\nuses W_t", color="#0072B2", fontsize=8, ha="center")
        left.set_title("TTT: the hidden state W is trained while the sequence is read")

        errors = ttt_prediction_errors()
        window = 8
        for name, values in errors.items():
            smooth = torch.nn.functional.avg_pool1d(values[None, None], window, stride=1)[0, 0]
            style = {"linestyle": ":", "color": "grey"} if name == "noise" else {}
            right.plot(range(window, window + len(smooth)), smooth.numpy(), label=name, **style)
        right.set_yscale("log")
        right.set_xlabel("token t")
        right.set_ylabel("||prediction of v_t - v_t||^2 (moving mean)")
        right.set_title("predicting the next value before writing it (v = M^T k + noise)")
        right.legend(frameon=False, fontsize=8)
        figure.tight_layout()
    return figure


FIGURES: dict[str, Callable[[], Figure]] = {
    "07_gates": gates,
    "07_taxonomy": taxonomy,
    "07_ttt_hidden_state": ttt_hidden_state,
}
