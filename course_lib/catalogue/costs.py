"""Cost models shared by the declarations: FLOPs and float32 bytes moved by one call.

``flops`` counts 2 per multiply-add of the matrix products (elementwise work left out); ``bytes``
counts what must travel between memory and the compute units: inputs, outputs and every
intermediate a mechanism materialises (a CPU cache holds none of them at large T). H heads of
D dimensions. The train phase is taken as three times the prefill (each product of the forward
needs two in the backward). The decode phase is one token at a context of T tokens.
"""

from __future__ import annotations

from .core import Geometry

F32 = 4


def _train_factor(phase: str) -> int:
    return 3 if phase == "train" else 1


def _io(T: int, g: Geometry) -> float:
    return F32 * 4 * g.heads * T * g.head_dim  # q, k, v read, o written


def softmax(phase: str, T: int, g: Geometry, *, materialises: bool, block: int = 128, skips: bool = True):
    """Exact causal softmax attention.

    Prefill: naive attention (``materialises``) computes all T^2 scores, ``4 H T^2 D`` FLOPs, and
    writes and reads the scores and the weights, ``16 H T^2`` bytes beyond q, k, v, o. A fused or
    tiled kernel skips the tiles above the diagonal, ``2 H T^2 D``, and re-reads K and V once per
    block of ``block`` queries, ``4 H T D (T / block)`` bytes. Decode: the KV cache is read,
    ``4 H T D`` FLOPs and ``8 H T D`` bytes (naive also writes and reads its T scores and weights).
    """
    H, D = g.heads, g.head_dim
    if phase == "decode":
        flops = 4 * H * T * D
        moved = F32 * (2 * H * T * D + 2 * H * D) + (F32 * 4 * H * T if materialises else 0)
        return {"flops": float(flops), "bytes": float(moved)}
    if materialises:
        flops, moved = 4 * H * T * T * D, _io(T, g) + F32 * 4 * H * T * T
    else:
        flops = (2 if skips else 4) * H * T * T * D
        moved = _io(T, g) + F32 * H * T * D * T / block
    factor = _train_factor(phase)
    return {"flops": float(factor * flops), "bytes": float(factor * moved)}


def window(phase: str, T: int, g: Geometry, *, window: int):
    """Causal sliding-window attention computed block by block (blocks of ``window`` queries).

    Prefill: each query block sees the block and the ``w - 1`` keys before it, ``4 H T (2w - 1) D``
    FLOPs and the score tiles ``8 H T (2w - 1)`` bytes beyond q, k, v, o and their slices.
    Decode: the last ``min(w, T)`` cached tokens, as softmax attention.
    """
    H, D = g.heads, g.head_dim
    if phase == "decode":
        return softmax("decode", min(window, T), g, materialises=False)
    keys = min(2 * window - 1, T)
    flops, moved = 4 * H * T * keys * D, 2 * _io(T, g) + F32 * 2 * H * T * keys
    factor = _train_factor(phase)
    return {"flops": float(factor * flops), "bytes": float(factor * moved)}


def chunked(phase: str, T: int, g: Geometry, *, chunk: int, delta: bool = False):
    """A chunk form: masked attention inside chunks of C plus a D x D state between them.

    Prefill: ``4 H T C D`` (inside chunks) plus ``4 H T D^2`` (reading and updating the state);
    the delta rule adds its WY transform, ``2 H T C D + 2 H T D^2``. Bytes: q, k, v, o, the chunk
    scores ``8 H T C`` and one state per chunk ``8 H D^2 T / C``. Decode: one step of the
    recurrence reads and writes a D x D state per head, ``8 H D^2`` bytes and ``4 H D^2`` FLOPs
    (``6 H D^2`` for the delta rule).
    """
    H, D = g.heads, g.head_dim
    if phase == "decode":
        flops = (6 if delta else 4) * H * D * D
        return {"flops": float(flops), "bytes": float(F32 * (2 * H * D * D + 4 * H * D))}
    flops = 4 * H * T * chunk * D + 4 * H * T * D * D
    if delta:
        flops += 2 * H * T * chunk * D + 2 * H * T * D * D
    moved = _io(T, g) + F32 * (2 * H * T * chunk + 2 * H * D * D * T / chunk)
    factor = _train_factor(phase)
    return {"flops": float(factor * flops), "bytes": float(factor * moved)}
