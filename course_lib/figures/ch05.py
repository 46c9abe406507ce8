"""Chapter 05's figure: the gallery of sparse attention patterns, with what each keeps."""

from __future__ import annotations

from collections.abc import Callable

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from ..sparse import layers_to_connect
from ..studies.sparse_patterns import pattern_mask
from ..viz import STYLE, plot_mask

__all__ = ["FIGURES", "GALLERY", "sparse_gallery"]

# (title, pattern, knobs) of each panel; T = 32, bidirectional (as in the BigBird and Longformer figures).
GALLERY = [
    ("local: window 3 each side", "window", {"window": 3}),
    ("global + local: token 0 global", "global+local", {"window": 3, "num_globals": 1}),
    ("BigBird: window + global + random", "bigbird", {"block_size": 4, "num_globals": 1, "random_blocks": 1}),
    ("dilated: window 3, dilation 2", "dilated", {"window": 3, "dilation": 2}),
    ("block: diagonal + 1 random block (size 4)", "block", {"block_size": 4, "random_blocks": 1}),
    ("strided (Sparse Transformer), stride 6", "strided", {"stride": 6}),
]


def sparse_gallery(T: int = 32) -> Figure:
    """Six patterns side by side, each titled with its share of pairs and layers to connect all pairs."""
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(2, 3, figsize=(13, 8.8))
        for ax, (title, pattern, knobs) in zip(axes.flat, GALLERY):
            mask = pattern_mask(pattern, T, causal=False, seed=0, **knobs)
            layers = layers_to_connect(mask)
            plot_mask(
                mask, ax=ax, title=f"{title}\nlayers to connect: {'never' if layers is None else layers}"
            )
        figure.tight_layout()
    return figure


FIGURES: dict[str, Callable[[], Figure]] = {"05_sparse_gallery": sparse_gallery}
