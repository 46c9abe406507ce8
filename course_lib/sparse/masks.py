"""The mask gallery: which keys each query may see, and what that costs and connects.

Every builder returns a boolean ``(T, S)`` mask (True = may attend) that broadcasts to
``(B, H, T, S)`` like the masks of chapter 01. Queries are aligned to the end of the keys as in
:func:`course_lib.standard.causal_mask`: query ``i`` sits at key position ``S - T + i``.
A mask only says *what* to compute; the kernels in :mod:`.kernels` are what skip the work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..checks import check_bool, check_choice, check_generator, check_int, check_tensor

__all__ = [
    "sliding_window_mask",
    "dilated_mask",
    "strided_mask",
    "global_local_mask",
    "bigbird_layout",
    "bigbird_mask",
    "block_sparse_mask",
    "neighborhood_mask_2d",
    "reachability",
    "layers_to_connect",
    "MaskStats",
    "mask_stats",
]


def _offsets(T: int, S: int, device: torch.device | str | None) -> torch.Tensor:
    """``(T, S)`` signed distance ``query position - key position`` with end-aligned queries."""
    query_positions = torch.arange(T, device=device).unsqueeze(1) + (S - T)
    key_positions = torch.arange(S, device=device).unsqueeze(0)
    return query_positions - key_positions


def _lengths(T: int, S: int | None) -> tuple[int, int]:
    # Empty sequences give empty masks, as every kernel accepts T = 0 and S = 0.
    T = check_int(T, "T", min=0)
    S = T if S is None else check_int(S, "S", min=0)
    return T, S


# --- local patterns -------------------------------------------------------------------------


def sliding_window_mask(
    T: int,
    window: int,
    S: int | None = None,
    *,
    causal: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Local attention: query ``i`` sees the ``window`` keys ``i - window + 1 .. i``.

    ``window`` counts the query itself. With ``causal=False`` the window is mirrored: keys at
    distance ``< window`` on either side (``2 * window - 1`` keys), so the causal mask is exactly
    the symmetric one intersected with the causal triangle.
    """
    T, S = _lengths(T, S)
    window = check_int(window, "window", min=1)
    check_bool(causal, "causal")
    distance = _offsets(T, S, device)
    if causal:
        return (distance >= 0) & (distance < window)
    return distance.abs() < window


def dilated_mask(
    T: int,
    window: int,
    dilation: int,
    S: int | None = None,
    *,
    causal: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A sliding window with holes: ``window`` keys spaced ``dilation`` apart.

    Query ``i`` sees keys ``i, i - dilation, ..., i - (window - 1) * dilation`` (mirrored as
    well with ``causal=False``). The receptive field grows ``dilation`` times for the same cost;
    ``dilation=1`` is :func:`sliding_window_mask`.
    """
    T, S = _lengths(T, S)
    window = check_int(window, "window", min=1)
    dilation = check_int(dilation, "dilation", min=1)
    check_bool(causal, "causal")
    distance = _offsets(T, S, device)
    on_grid = distance % dilation == 0
    reach = (window - 1) * dilation
    if causal:
        return on_grid & (distance >= 0) & (distance <= reach)
    return on_grid & (distance.abs() <= reach)


def strided_mask(
    T: int,
    stride: int,
    *,
    pattern: str = "strided",
    summary: int = 1,
    causal: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The factorised patterns of Sparse Transformers (Child et al., 2019), as one ``(T, T)`` mask.

    ``pattern="strided"``: the previous ``stride`` positions plus every ``stride``-th one
    before them (``(i - j) % stride == 0``), suited to data with a period such as images.
    ``pattern="fixed"``: every key of the query's own block of ``stride`` positions plus the
    last ``summary`` positions of every block, which act as summaries for text.
    The paper splits the two parts over heads or layers; the union is returned here.
    """
    T = check_int(T, "T", min=0)
    stride = check_int(stride, "stride", min=1)
    check_choice(pattern, "pattern", ("strided", "fixed"))
    summary = check_int(summary, "summary", min=1, max=stride)
    check_bool(causal, "causal")
    distance = _offsets(T, T, device)
    if pattern == "strided":
        allowed = (distance.abs() < stride) | (distance % stride == 0)
    else:
        positions = torch.arange(T, device=device)
        same_block = (positions.unsqueeze(1) // stride) == (positions.unsqueeze(0) // stride)
        is_summary = (positions % stride) >= stride - summary
        allowed = same_block | is_summary.unsqueeze(0)
    return allowed & (distance >= 0) if causal else allowed


# --- global + local and random ----------------------------------------------------------------


def global_local_mask(
    T: int,
    window: int,
    global_tokens: Sequence[int] | torch.Tensor,
    *,
    causal: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Longformer: a sliding window plus chosen global tokens that see, and are seen by, all.

    ``global_tokens`` lists positions in ``[0, T)`` (e.g. ``[0]`` for a CLS token). With
    ``causal=True`` the causal triangle is applied on top, so a global token sees only the past.
    """
    T = check_int(T, "T", min=0)
    if isinstance(global_tokens, torch.Tensor):
        check_tensor(global_tokens, "global_tokens", ndim=1)
        if global_tokens.is_floating_point() or global_tokens.dtype == torch.bool:
            raise TypeError(f"global_tokens must hold integers, got dtype {global_tokens.dtype}")
        global_tokens = global_tokens.tolist()
    if not isinstance(global_tokens, Sequence):
        raise TypeError(f"global_tokens must be a sequence of ints, got {type(global_tokens).__name__}")
    positions = [check_int(p, "global_tokens", min=0, max=T - 1) for p in global_tokens]
    allowed = sliding_window_mask(T, window, causal=False, device=device)
    is_global = torch.zeros(T, dtype=torch.bool, device=device)
    is_global[positions] = True
    allowed = allowed | is_global.unsqueeze(0) | is_global.unsqueeze(1)
    check_bool(causal, "causal")
    return allowed & (_offsets(T, T, device) >= 0) if causal else allowed


def bigbird_layout(
    num_blocks: int,
    *,
    window_blocks: int = 3,
    global_blocks: int = 1,
    random_blocks: int = 1,
    causal: bool = False,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """BigBird's ``(num_blocks, num_blocks)`` block layout: window + global + random blocks.

    ``window_blocks`` (odd) is centred on the diagonal; the first ``global_blocks`` blocks attend
    to, and are attended by, every block; each other query block also picks ``random_blocks``
    blocks uniformly among those it does not already see (fewer when none are left). The draw
    uses only ``generator`` or ``seed`` (default seed 0), so a seed reproduces the layout.
    With ``causal=True`` only blocks on or below the diagonal are used.
    """
    num_blocks = check_int(num_blocks, "num_blocks", min=0)
    window_blocks = check_int(window_blocks, "window_blocks", min=1)
    if window_blocks % 2 == 0:
        raise ValueError(f"window_blocks={window_blocks} must be odd (centred on the diagonal)")
    global_blocks = check_int(global_blocks, "global_blocks", min=0)
    random_blocks = check_int(random_blocks, "random_blocks", min=0)
    check_bool(causal, "causal")
    generator = check_generator(generator, seed)

    rows = torch.arange(num_blocks).unsqueeze(1)
    cols = torch.arange(num_blocks).unsqueeze(0)
    layout = (rows - cols).abs() <= window_blocks // 2
    layout[:global_blocks, :] = True
    layout[:, :global_blocks] = True
    if causal:
        layout &= cols <= rows
    for row in range(global_blocks, num_blocks):
        candidates = (~layout[row]).nonzero().flatten()
        if causal:
            candidates = candidates[candidates <= row]
        if len(candidates) and random_blocks:
            order = torch.randperm(len(candidates), generator=generator)
            layout[row, candidates[order[:random_blocks]]] = True
    return layout


def block_sparse_mask(
    layout: torch.Tensor, block_size: int, T: int | None = None, S: int | None = None
) -> torch.Tensor:
    """Expand a boolean block layout ``(..., T_blocks, S_blocks)`` to a token mask ``(..., T, S)``.

    Entry ``[a, b]`` of the layout switches on the ``block_size x block_size`` tile of queries
    ``a * block_size ..`` and keys ``b * block_size ..``. ``T`` and ``S`` (default: the layout
    times the block size) crop a last, partial block.
    """
    check_tensor(layout, "layout", dtype=torch.bool)
    if layout.dim() < 2:
        raise ValueError(f"layout must have at least 2 dims (T_blocks, S_blocks), got {tuple(layout.shape)}")
    block_size = check_int(block_size, "block_size", min=1)
    query_blocks, key_blocks = layout.shape[-2:]
    T = query_blocks * block_size if T is None else check_int(T, "T", min=0)
    S = key_blocks * block_size if S is None else check_int(S, "S", min=0)
    if -(-T // block_size) != query_blocks:
        raise ValueError(
            f"layout must have ceil(T / block_size) = {-(-T // block_size)} rows, got {query_blocks}"
        )
    if -(-S // block_size) != key_blocks:
        raise ValueError(
            f"layout must have ceil(S / block_size) = {-(-S // block_size)} columns, got {key_blocks}"
        )
    expanded = layout.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
    return expanded[..., :T, :S]


def bigbird_mask(
    T: int,
    block_size: int,
    *,
    window_blocks: int = 3,
    global_blocks: int = 1,
    random_blocks: int = 1,
    causal: bool = False,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """BigBird's ``(T, T)`` token mask: :func:`bigbird_layout` expanded by ``block_size``.

    With ``causal=True`` the token-level causal triangle is applied too.
    """
    T = check_int(T, "T", min=0)
    block_size = check_int(block_size, "block_size", min=1)
    layout = bigbird_layout(
        -(-T // block_size),
        window_blocks=window_blocks,
        global_blocks=global_blocks,
        random_blocks=random_blocks,
        causal=causal,
        generator=generator,
        seed=seed,
    )
    mask = block_sparse_mask(layout, block_size, T, T)
    return mask & (_offsets(T, T, None) >= 0) if causal else mask


def neighborhood_mask_2d(
    height: int, width: int, kernel_size: int, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """The ``(height * width, height * width)`` mask of :func:`neighborhood_attention_2d`.

    Pixel ``(r, c)`` (flattened row-major) sees the ``kernel_size x kernel_size`` square starting
    at row ``clamp(r - kernel_size // 2, 0, height - kernel_size)`` (columns alike): at a border
    the window slides inwards, so every pixel sees exactly ``kernel_size ** 2`` pixels (NAT).
    """
    height = check_int(height, "height", min=0)
    width = check_int(width, "width", min=0)
    if height == 0 or width == 0:  # an empty image: no pixel, an empty mask
        check_int(kernel_size, "kernel_size", min=1)
        return torch.zeros(0, 0, dtype=torch.bool, device=device)
    kernel_size = check_int(kernel_size, "kernel_size", min=1, max=min(height, width))

    def window_starts(length: int) -> torch.Tensor:
        return (torch.arange(length, device=device) - kernel_size // 2).clamp(0, length - kernel_size)

    def inside(length: int) -> torch.Tensor:
        positions = torch.arange(length, device=device)
        start = window_starts(length).unsqueeze(1)
        return (positions >= start) & (positions < start + kernel_size)

    rows, cols = inside(height), inside(width)
    return (rows[:, None, :, None] & cols[None, :, None, :]).reshape(height * width, height * width)


# --- what a mask costs and connects -------------------------------------------------------------


def _square_mask(mask: object) -> torch.Tensor:
    check_tensor(mask, "mask", ndim=2, dtype=torch.bool)
    assert isinstance(mask, torch.Tensor)
    if mask.shape[0] != mask.shape[1]:
        raise ValueError(f"mask must be square (T, T) to stack layers, got {tuple(mask.shape)}")
    return mask


def _bool_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Boolean matrix product: ``[i, j]`` is True when some ``m`` has ``a[i, m] and b[m, j]``."""
    return (a.float() @ b.float()) > 0


def reachability(mask: torch.Tensor, num_layers: int) -> torch.Tensor:
    """Which tokens can influence which after ``num_layers`` layers of attention with ``mask``.

    Each layer lets query ``i`` mix the keys ``j`` with ``mask[i, j]``; the residual stream keeps
    what ``i`` already had, so one layer is ``mask | identity`` and ``L`` layers are its boolean
    ``L``-th power. Returns the ``(T, T)`` boolean matrix of that power.
    """
    mask = _square_mask(mask)
    num_layers = check_int(num_layers, "num_layers", min=0)
    one_layer = mask | torch.eye(len(mask), dtype=torch.bool, device=mask.device)
    reach = torch.eye(len(mask), dtype=torch.bool, device=mask.device)
    for _ in range(num_layers):
        reach = _bool_matmul(reach, one_layer)
    return reach


def layers_to_connect(mask: torch.Tensor) -> int | None:
    """The fewest layers after which every token reaches every token it could ever reach.

    The target is all pairs for a mask that looks ahead anywhere, and all pairs ``j <= i`` for a
    causal one. Returns ``None`` when stacking never gets there (e.g. disjoint blocks). Uses
    repeated squaring and then binary lifting, ``O(T^3 log T)`` instead of ``O(T^4)``.
    """
    mask = _square_mask(mask)
    T = len(mask)
    identity = torch.eye(T, dtype=torch.bool, device=mask.device)
    looks_ahead = bool(torch.triu(mask, diagonal=1).any())
    target = torch.ones_like(mask) if looks_ahead else torch.tril(torch.ones_like(mask))

    # powers[n] = reach after 2**n layers; with self loops, T - 1 layers reach whatever is reachable.
    powers = [mask | identity]
    while not bool(powers[-1][target].all()):
        if 2 ** (len(powers) - 1) >= max(T - 1, 1):
            return None
        powers.append(_bool_matmul(powers[-1], powers[-1]))
    if len(powers) == 1:
        return 0 if not bool((target & ~identity).any()) else 1

    # Binary lifting: add the largest powers that still fall short; one more layer then suffices.
    reach, layers = identity, 0
    for exponent in range(len(powers) - 2, -1, -1):
        candidate = _bool_matmul(reach, powers[exponent])
        if not bool(candidate[target].all()):
            reach, layers = candidate, layers + 2**exponent
    return layers + 1


@dataclass(frozen=True)
class MaskStats:
    """What a ``(T, S)`` mask keeps and saves. FLOPs count the two matmuls, 2 per multiply-add."""

    density: float
    allowed_pairs: int
    dense_flops: int
    sparse_flops: int
    flops_saved: float
    layers_to_connect: int | None


def mask_stats(mask: torch.Tensor, *, head_dim: int = 64, value_dim: int | None = None) -> MaskStats:
    """Density, FLOPs of a kernel that skips masked pairs vs dense, and layers to connect all tokens.

    Dense attention costs ``2 T S D`` for ``q k^T`` plus ``2 T S D_v`` for ``p v``; a kernel that
    skips every masked pair pays that only for the allowed pairs. ``layers_to_connect`` is
    :func:`layers_to_connect` for a square mask and ``None`` otherwise.
    """
    check_tensor(mask, "mask", ndim=2, dtype=torch.bool)
    head_dim = check_int(head_dim, "head_dim", min=1)
    value_dim = head_dim if value_dim is None else check_int(value_dim, "value_dim", min=1)
    T, S = mask.shape
    allowed = int(mask.sum())
    per_pair = 2 * (head_dim + value_dim)
    return MaskStats(
        density=allowed / (T * S),
        allowed_pairs=allowed,
        dense_flops=per_pair * T * S,
        sparse_flops=per_pair * allowed,
        flops_saved=1.0 - allowed / (T * S),
        layers_to_connect=layers_to_connect(mask) if T == S else None,
    )
