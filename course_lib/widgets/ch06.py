"""Chapter 06's explorers: FAVOR+ against softmax, and the three forms of linear attention step by step.

Both are built on :mod:`course_lib.linear`. The FAVOR+ explorer draws a random-feature map and
compares the kernel it estimates, and the attention it gives, with exact softmax attention. The
stepper walks one causal sequence through the recurrent form (one token at a time) or the chunk
form (one chunk at a time) and shows which entries of the implied matrix are read through the
state and which are computed directly, next to the state itself.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Rectangle

from ..checks import check_choice, check_float, check_int
from ..linear import favor_plus, linear_attention, linear_attention_matrix
from ..standard import attention
from ..studies.linear_forms import SCHEDULE_LABELS, STEP_FORMS, draw_schedule, schedule_matrix
from ..viz import STYLE
from ._display import new_figure, show, widen_labels

__all__ = [
    "FAVOR_HEAD_DIM",
    "favor_inputs",
    "favor_kernel_mse",
    "favor_explorer_view",
    "favor_explorer",
    "STEP_FORMS",
    "SCHEDULE_LABELS",
    "schedule_matrix",
    "three_forms_view",
    "three_forms_stepper",
]

# --- (a) FAVOR+ explorer ------------------------------------------------------------------------

FAVOR_HEAD_DIM = 16


@contextmanager
def _one_thread():
    """Draw feature maps on one thread: many tiny QR factorisations are far slower on several."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def favor_inputs(input_scale: float = 0.5, T: int = 64, head_dim: int = FAVOR_HEAD_DIM, seed: int = 0):
    """Seeded float64 ``(1, 1, T, head_dim)`` queries, keys and values; q and k times ``input_scale``."""
    input_scale = check_float(input_scale, "input_scale", min=0.0, min_open=True)
    generator = torch.Generator().manual_seed(seed)
    shape = (1, 1, check_int(T, "T", min=1), check_int(head_dim, "head_dim", min=1))
    q, k, v = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3))
    return q * input_scale, k * input_scale, v


def favor_kernel_mse(
    num_features: int,
    *,
    orthogonal: bool = True,
    head_dim: int = FAVOR_HEAD_DIM,
    radius: float = 1.0,
    num_seeds: int = 40,
    num_pairs: int = 64,
) -> float:
    """Mean squared error of FAVOR+'s estimate of ``exp(q.k / sqrt(d))``, over seeds and pairs.

    The ``num_pairs`` pairs are fixed (seed 0): random directions of length ``radius``, so the
    estimator's variance, which grows like ``exp(|q + k|^2 / sqrt(d))``, stays bounded. Each of
    the ``num_seeds`` seeds draws a new feature map.
    """
    num_features = check_int(num_features, "num_features", min=1)
    head_dim = check_int(head_dim, "head_dim", min=1)
    radius = check_float(radius, "radius", min=0.0, min_open=True)
    num_seeds = check_int(num_seeds, "num_seeds", min=1)
    num_pairs = check_int(num_pairs, "num_pairs", min=1)
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(num_pairs, head_dim, generator=generator, dtype=torch.float64) for _ in range(2))
    q, k = (radius * x / x.norm(dim=-1, keepdim=True) for x in (q, k))
    exact = torch.exp((q * k).sum(-1) / math.sqrt(head_dim))
    errors = []
    with _one_thread():
        for seed in range(num_seeds):
            feature_map = favor_plus(head_dim, num_features, orthogonal=orthogonal, seed=seed)
            estimate = (feature_map(q) * feature_map(k)).sum(-1)
            errors.append(((estimate - exact) ** 2).mean())
    return float(torch.stack(errors).mean())


def favor_explorer_view(
    num_features: int = 64,
    orthogonal: bool = True,
    input_scale: float = 0.5,
    seed: int = 0,
    *,
    draw: bool = True,
) -> dict:
    """FAVOR+ with ``num_features`` random features vs exact softmax attention (T = 64, D = 16).

    Queries and keys are Gaussian times ``input_scale``: the estimator's variance grows like
    ``exp(|q + k|^2 / sqrt(D))``, so larger inputs need many more features. Returns the exact and
    estimated kernel values, the exact and FAVOR+ attention weights and outputs, the kernel's
    relative error, and the outputs' mean squared and largest absolute error.
    """
    num_features = check_int(num_features, "num_features", min=1)
    seed = check_int(seed, "seed", min=0)
    q, k, v = favor_inputs(input_scale)
    with _one_thread():
        feature_map = favor_plus(FAVOR_HEAD_DIM, num_features, orthogonal=bool(orthogonal), seed=seed)
    exact_kernel = torch.exp(q[0, 0] @ k[0, 0].T / math.sqrt(FAVOR_HEAD_DIM))
    estimated_kernel = feature_map(q[0, 0]) @ feature_map(k[0, 0]).T
    exact_output, exact_weights = attention(q, k, v, return_weights=True)
    output = linear_attention(q, k, v, feature_map=feature_map, causal=False, form="parallel")
    weights = linear_attention_matrix(q, k, feature_map=feature_map, causal=False)
    error = output - exact_output
    view = {
        "exact_kernel": exact_kernel,
        "estimated_kernel": estimated_kernel,
        "kernel_relative_error": float((estimated_kernel - exact_kernel).norm() / exact_kernel.norm()),
        "exact_weights": exact_weights[0, 0],
        "weights": weights[0, 0],
        "output": output[0, 0],
        "exact_output": exact_output[0, 0],
        "output_mse": float((error**2).mean()),
        "output_max_error": float(error.abs().max()),
    }
    if draw:
        with plt.rc_context(STYLE):
            figure = new_figure((14, 4.2))
            axes = figure.subplots(1, 3)
            top = float(view["exact_weights"].max())
            for ax, matrix, title in (
                (axes[0], view["exact_weights"], "softmax weights (exact)"),
                (axes[1], view["weights"], f"FAVOR+ weights, m = {num_features}"),
            ):
                image = ax.imshow(matrix.numpy(), cmap="viridis", vmin=0.0, vmax=top)
                figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
                ax.set_title(title)
                ax.set_xlabel("key")
                ax.set_ylabel("query")
            exact_flat, estimate_flat = exact_kernel.flatten().numpy(), estimated_kernel.flatten().numpy()
            axes[2].scatter(exact_flat, estimate_flat, s=3, alpha=0.4)
            low, high = float(exact_flat.min()), float(exact_flat.max())
            axes[2].plot([low, high], [low, high], color="black", linewidth=1, label="estimate = exact")
            axes[2].set_xlabel("exact exp(q.k / sqrt D)")
            axes[2].set_ylabel("FAVOR+ phi(q).phi(k)")
            axes[2].set_title(
                f"kernel rel. error {view['kernel_relative_error']:.3f}\n"
                f"output MSE {view['output_mse']:.2e}, max {view['output_max_error']:.3f}"
            )
            axes[2].legend(frameon=False, loc="upper left")
            figure.tight_layout()
            show(figure)
        view["figure"] = figure
    return view


def favor_explorer() -> widgets.Widget:
    """Number of random features, orthogonal or i.i.d., input size and seed -> FAVOR+ vs softmax."""
    explorer = widgets.interactive(
        favor_explorer_view,
        num_features=widgets.SelectionSlider(
            options=[2**p for p in range(1, 13)], value=64, description="features m"
        ),
        orthogonal=widgets.Checkbox(value=True, description="orthogonal"),
        input_scale=widgets.FloatSlider(value=0.5, min=0.1, max=1.5, step=0.1, description="|q|, |k| scale"),
        seed=widgets.IntSlider(value=0, min=0, max=20, description="seed"),
        draw=widgets.fixed(True),
    )
    return widen_labels(explorer)


# --- (b) the three forms, step by step ----------------------------------------------------------


def _stepper_inputs(T: int, head_dim: int = 4):
    generator = torch.Generator().manual_seed(6)
    return [torch.randn(1, 1, T, head_dim, generator=generator, dtype=torch.float64) for _ in range(3)]


def three_forms_view(
    form: str = "chunk",
    tokens: int = 8,
    T: int = 16,
    chunk_size: int = 4,
    *,
    draw: bool = True,
) -> dict:
    """Run causal elu+1 linear attention on the first ``tokens`` of a ``T``-token sequence.

    ``form="recurrent"`` advances one token at a time; ``form="chunk"`` a chunk at a time, so
    ``tokens`` is rounded up to the end of its chunk. Returns the tokens actually processed, the
    state ``S`` (D', D_v) and normaliser ``z`` (D') after them, the outputs of those tokens (equal
    to the parallel form's), the full parallel output and the schedule matrix codes.
    """
    check_choice(form, "form", STEP_FORMS)
    T = check_int(T, "T", min=1)
    chunk_size = check_int(chunk_size, "chunk_size", min=1)
    tokens = check_int(tokens, "tokens", min=0)
    tokens = min(tokens, T)
    if form == "chunk":
        tokens = min(T, math.ceil(tokens / chunk_size) * chunk_size)
    q, k, v = _stepper_inputs(T)
    reference = linear_attention(q, k, v, form="parallel")
    D = q.shape[-1]
    if tokens == 0:
        outputs = torch.zeros(0, D, dtype=torch.float64)
        state, normaliser = torch.zeros(D, D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
    else:
        part = slice(0, tokens)
        outputs, (state, normaliser) = linear_attention(
            q[:, :, part],
            k[:, :, part],
            v[:, :, part],
            form=form,
            chunk_size=chunk_size,
            output_final_state=True,
        )
        outputs, state, normaliser = outputs[0, 0], state[0, 0], normaliser[0, 0]
    codes = schedule_matrix(form, T, chunk_size, tokens)
    view = {
        "tokens_done": tokens,
        "state": state,
        "normaliser": normaliser,
        "outputs": outputs,
        "parallel_output": reference[0, 0],
        "schedule": codes,
        "max_difference": float((outputs - reference[0, 0, :tokens]).abs().max()) if tokens else 0.0,
    }
    if draw:
        with plt.rc_context(STYLE):
            figure = new_figure((14, 4.4))
            axes = figure.subplots(1, 3, gridspec_kw={"width_ratios": [1.3, 1.0, 0.9]})
            draw_schedule(codes, ax=axes[0], chunk_size=chunk_size if form == "chunk" else None)
            if tokens:
                first = tokens - 1 if form == "recurrent" else (tokens - 1) // chunk_size * chunk_size
                axes[0].add_patch(
                    Rectangle(
                        (-0.5, first - 0.5), T, tokens - first, fill=False, edgecolor="black", linewidth=2
                    )
                )
            axes[0].set_title(f"{form} form after {tokens} of {T} tokens")
            with_z = torch.cat([state, normaliser[:, None]], dim=1)
            image = axes[1].imshow(
                with_z.numpy(),
                cmap="coolwarm",
                vmin=-with_z.abs().max() - 1e-12,
                vmax=with_z.abs().max() + 1e-12,
            )
            figure.colorbar(image, ax=axes[1], fraction=0.046, pad=0.04)
            axes[1].set_xticks(range(D + 1), [f"v{i}" for i in range(D)] + ["z"])
            axes[1].set_yticks(range(D))
            axes[1].set_ylabel("feature of phi(k)")
            axes[1].set_title(f"state [S | z], |S| = {float(state.norm()):.2f}")
            shown = torch.full((T, D), float("nan"), dtype=torch.float64)
            shown[:tokens] = outputs
            axes[2].imshow(shown.numpy(), cmap="coolwarm", aspect="auto")
            axes[2].set_xlabel("value dim")
            axes[2].set_ylabel("token")
            axes[2].set_title(f"outputs so far\nmax |diff| to parallel {view['max_difference']:.1e}")
            figure.tight_layout()
            show(figure)
        view["figure"] = figure
    return view


def three_forms_stepper() -> widgets.Widget:
    """Form, tokens processed, sequence length and chunk size -> schedule, state and outputs."""
    explorer = widgets.interactive(
        three_forms_view,
        form=widgets.Dropdown(options=STEP_FORMS, value="chunk", description="form"),
        tokens=widgets.IntSlider(value=8, min=0, max=32, description="tokens"),
        T=widgets.IntSlider(value=16, min=1, max=32, description="T"),
        chunk_size=widgets.IntSlider(value=4, min=1, max=16, description="chunk size"),
        draw=widgets.fixed(True),
    )
    return widen_labels(explorer)
