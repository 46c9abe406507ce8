"""Chapter 05's figures: the gallery of sparse patterns, NSA's and MoBA's block routing, and the
cost of attention over images and video."""

from __future__ import annotations

from collections.abc import Callable

import matplotlib.pyplot as plt
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..sparse import layers_to_connect, vision_attention_cost
from ..studies.sparse_kernels import MOBA_OPTIONS, NSA_OPTIONS, routing_work
from ..studies.sparse_patterns import NSA_BRANCHES, nsa_branch_map, pattern_mask
from ..viz import STYLE, plot_mask

__all__ = [
    "FIGURES",
    "GALLERY",
    "sparse_gallery",
    "ROUTING_LENGTHS",
    "block_routing",
    "VISION_SIDES",
    "vision_costs",
]

# (title, pattern, knobs) of each panel; T = 32, bidirectional (as in the BigBird and Longformer
# figures) except NSA and MoBA, which are causal and choose blocks from seeded random content.
GALLERY = [
    ("local: window 3 each side", "window", {"window": 3}),
    ("global + local: token 0 global", "global+local", {"window": 3, "num_globals": 1}),
    ("BigBird: window + global + random", "bigbird", {"block_size": 4, "num_globals": 1, "random_blocks": 1}),
    ("dilated: window 3, dilation 2", "dilated", {"window": 3, "dilation": 2}),
    ("block: diagonal + 1 random block (size 4)", "block", {"block_size": 4, "random_blocks": 1}),
    ("strided (Sparse Transformer), stride 6", "strided", {"stride": 6}),
    ("NSA: 3 blocks of 4 (first, own, best) + window 4", "nsa", {"block_size": 4, "top_k": 3, "window": 4}),
    ("MoBA: top-2 blocks of 4, own included", "moba", {"block_size": 4, "top_k": 2}),
]


def sparse_gallery(T: int = 32) -> Figure:
    """Eight patterns side by side, each titled with its layers to connect all pairs."""
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(2, 4, figsize=(17, 8.8))
        for ax, (title, pattern, knobs) in zip(axes.flat, GALLERY):
            mask = pattern_mask(pattern, T, causal=False, seed=0, **knobs)
            layers = layers_to_connect(mask)
            plot_mask(
                mask, ax=ax, title=f"{title}\nlayers to connect: {'never' if layers is None else layers}"
            )
        figure.tight_layout()
    return figure


ROUTING_LENGTHS = (512, 1024, 2048, 4096)
_BRANCH_COLOURS = ["#f2f2f2", "#cfe3f1", "#0072B2", "#E69F00", "#009E73"]


def block_routing(T: int = 64) -> Figure:
    """NSA's three branches and MoBA's blocks on one seeded input, and the blocks each kernel computes.

    Left: which branch of NSA reads each pair (blocks of 8, 3 selected with the first and the own
    block forced, window 8, compression blocks of 8 every 4). Middle: MoBA's top-3 blocks of 8 on
    the same queries and keys. Right: the (query, key block) pairs the kernels computed, as a
    share of a causal kernel's at the same block size, and the scores, as a share of ``T x S``,
    at the benchmark's settings
    (:func:`course_lib.studies.sparse_kernels.routing_work`).
    """
    branches = nsa_branch_map(T, block_size=8, num_selected=3, window=8, compress_block=8, compress_stride=4)
    moba = pattern_mask("moba", T, block_size=8, top_k=3)
    work = routing_work(ROUTING_LENGTHS)
    with plt.rc_context(STYLE):
        figure, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.8))
        left.imshow(
            branches.numpy(), cmap=ListedColormap(_BRANCH_COLOURS), vmin=0, vmax=len(NSA_BRANCHES) - 1
        )
        left.set_title(f"NSA, T={T}: which branch reads each key")
        left.set_xlabel("key")
        left.set_ylabel("query")
        handles = [Patch(color=c, label=name) for c, name in zip(_BRANCH_COLOURS, NSA_BRANCHES)]
        left.legend(handles=handles, loc="upper right", fontsize=7, frameon=True)
        plot_mask(moba, ax=middle, title=f"MoBA, T={T}: top-3 blocks of 8 (own included)")
        for kernel, marker in (("nsa", "o"), ("moba", "s")):
            right.plot(ROUTING_LENGTHS, [w.block_fraction for w in work[kernel]], marker=marker,
                       label=f"{kernel}: key blocks / causal kernel's")  # fmt: skip
            right.plot(ROUTING_LENGTHS, [w.score_fraction for w in work[kernel]], marker=marker,
                       linestyle="--", label=f"{kernel}: scores / (T x S)")  # fmt: skip
        right.set_xscale("log", base=2)
        right.set_ylim(bottom=0)
        right.axhline(1.0, color="grey", linewidth=1, linestyle=":")
        right.set_xlabel("sequence length T")
        right.set_ylabel("share of dense work")
        nsa_n, moba_k = NSA_OPTIONS["num_selected"], MOBA_OPTIONS["top_k"]
        right.set_title(
            f"computed, as counted by the kernels\n(NSA {nsa_n} blocks of {NSA_OPTIONS['block_size']}, "
            f"MoBA {moba_k} of {MOBA_OPTIONS['block_size']})"
        )
        right.legend(frameon=False, fontsize=8)
        figure.tight_layout()
    return figure


VISION_SIDES = (8, 16, 32, 64, 128)


def vision_costs(frames: int = 8, ratio: int = 8, kernel_size: int = 7) -> Figure:
    """Stored score entries per head against the number of tokens: images (left) and videos (right).

    Full attention over every patch, spatial reduction by ``ratio`` (PVT, Segformer), a
    ``kernel_size`` neighbourhood (NAT) and, for video, divided space-time attention (TimeSformer),
    for square images of :data:`VISION_SIDES` patches a side
    (:func:`course_lib.sparse.vision_attention_cost`).
    """
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
        for ax, F in zip(axes, (1, frames)):
            rows = {
                side: {
                    c.name: c
                    for c in vision_attention_cost(side, side, F, ratio=ratio, kernel_size=kernel_size)
                }
                for side in VISION_SIDES
            }
            tokens = [F * side * side for side in VISION_SIDES]
            names = [n for n in rows[VISION_SIDES[0]] if F > 1 or n != "divided space-time"]
            for name in names:
                ax.plot(
                    tokens, [rows[side][name].score_entries for side in VISION_SIDES], marker="o", label=name
                )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_xlabel("tokens (frames x height x width patches)")
            what = "images" if F == 1 else f"videos of {F} frames"
            ax.set_title(f"{what}: side {VISION_SIDES[0]} to {VISION_SIDES[-1]}")
            ax.legend(frameon=False, fontsize=8)
        axes[0].set_ylabel("score entries per head and layer")
        figure.suptitle(
            f"Attention over patches: spatial reduction R={ratio}, neighbourhood {kernel_size}x{kernel_size}"
        )
        figure.tight_layout()
    return figure


FIGURES: dict[str, Callable[[], Figure]] = {
    "05_sparse_gallery": sparse_gallery,
    "05_block_routing": block_routing,
    "05_vision_costs": vision_costs,
}
