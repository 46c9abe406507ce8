"""Argument checks shared by every public function of the course.

Each check raises ``TypeError`` for a value of the wrong kind and ``ValueError`` for a value of
the right kind that is out of range, and every message starts with the argument's name, e.g.
``num_kv_heads=3 must divide num_heads=8``. Chapters call these instead of writing their own.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "check_tensor",
    "check_shape",
    "check_attention_inputs",
    "check_mask",
    "check_broadcast",
    "check_like",
    "check_hashable",
    "check_int",
    "check_float",
    "check_choice",
    "check_divisible",
    "check_bool",
    "check_generator",
    "compute_dtype",
    "resolve_scale",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    x: object,
    name: str,
    *,
    ndim: int | Sequence[int] | None = None,
    floating: bool = False,
    dtype: torch.dtype | Sequence[torch.dtype] | None = None,
) -> torch.Tensor:
    """Check that ``x`` is a tensor with the given number of dims and dtype family.

    Meta tensors (a shape without data) are refused: no result computed from one can be read.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_meta:
        raise ValueError(f"{name} must hold data, got a meta tensor of shape {tuple(x.shape)}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dims, got shape {tuple(x.shape)}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if dtype is not None:
        allowed_dtypes = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if x.dtype not in allowed_dtypes:
            raise TypeError(f"{name} must have dtype {' or '.join(map(str, allowed_dtypes))}, got {x.dtype}")
    return x


def check_shape(x: torch.Tensor, name: str, shape: Sequence[int | None], *, names: str | None = None) -> None:
    """Check ``x.shape`` against ``shape``; ``None`` entries match any size.

    ``names`` spells the dims for the message, e.g. ``"B, H, T, D"``.
    """
    expected = tuple(shape)
    ok = x.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, x.shape))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        dims = f" = ({names})" if names else ""
        raise ValueError(f"{name} must have shape {want}{dims}, got {tuple(x.shape)}")


def check_attention_inputs(
    q: object, k: object, v: object, *, same_heads: bool = True
) -> tuple[int, int, int, int, int, int]:
    """Check the ``(B, H, T, D)`` / ``(B, H, S, D)`` / ``(B, H, S, D_v)`` triple of attention.

    Returns ``(B, H, T, S, D, D_v)``. With ``same_heads=False`` keys and values may have fewer
    heads than queries (grouped-query attention); H is then the query head count.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(x, name, ndim=4, floating=True)
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    B, H, T, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(
            f"k and v must have batch size {B} like q, got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if same_heads and (k.shape[1] != H or v.shape[1] != H):
        raise ValueError(f"k and v must have {H} heads like q, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads, got {k.shape[1]} and {v.shape[1]}")
    if k.shape[3] != D:
        raise ValueError(f"k must have head dim D={D} like q, got k {tuple(k.shape)}")
    S = k.shape[2]
    if v.shape[2] != S:
        raise ValueError(f"v must have the same length S={S} as k, got v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    return B, H, T, S, D, v.shape[3]


def check_broadcast(
    x: torch.Tensor, name: str, target: Sequence[int], *, names: str = "B, H, T, S"
) -> torch.Tensor:
    """Check that ``x`` broadcasts to ``target`` *without changing it* and return it expanded.

    ``torch`` would happily broadcast a ``(2, B, H, T, S)`` bias against ``(B, H, T, S)`` scores
    and return a result of a new shape; here extra or mismatched dims are an error.
    """
    target = tuple(target)
    if x.dim() > len(target):
        raise ValueError(f"{name} must have at most {len(target)} dims ({names}), got shape {tuple(x.shape)}")
    try:
        return x.expand(*target)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(x.shape)} must broadcast to {target} = ({names})") from None


def check_mask(
    mask: object, name: str, target: Sequence[int], *, device: torch.device | None = None
) -> torch.Tensor:
    """Check a boolean mask (True = may attend) broadcastable to ``target`` and expand it.

    With ``device`` (that of ``q``), the mask must live there too.
    """
    check_tensor(mask, name, dtype=torch.bool)
    assert isinstance(mask, torch.Tensor)
    if device is not None and mask.device != torch.device(device):
        raise ValueError(f"{name} must be on the device of q ({device}), got {mask.device}")
    return check_broadcast(mask, name, target)


def check_like(
    x: object, name: str, like: torch.Tensor, like_name: str = "q", *, dtype: bool = True
) -> torch.Tensor:
    """Check a side tensor against the main input ``like``: same device, and same dtype if ``dtype``.

    The course's rule: every tensor a function takes lives on the device of its queries; the
    tensors it computes with as data (values, compressed keys, a second query half) also share
    their dtype, like q, k and v; side tensors that only steer the computation (masks, biases,
    gates, tables, projections) are cast to the compute dtype instead (``dtype=False``).
    """
    check_tensor(x, name)
    assert isinstance(x, torch.Tensor)
    if x.device != like.device:
        raise ValueError(f"{name} must be on the device of {like_name} ({like.device}), got {x.device}")
    if dtype and x.dtype != like.dtype:
        raise TypeError(f"{name} must have the dtype of {like_name} ({like.dtype}), got {x.dtype}")
    return x


def check_hashable(value: object, name: str) -> object:
    """Check that ``value`` can be a dictionary key (a sequence id, a name), e.g. not a list."""
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            f"{name} must be hashable (an int, a str, a tuple), got {type(value).__name__}"
        ) from None
    return value


def check_int(value: object, name: str, *, min: int | None = None, max: int | None = None) -> int:
    """Check that ``value`` is an integer (not a bool) in ``[min, max]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if min is not None and value < min:
        raise ValueError(f"{name}={value} must be >= {min}")
    if max is not None and value > max:
        raise ValueError(f"{name}={value} must be <= {max}")
    return value


def check_float(
    value: object,
    name: str,
    *,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
) -> float:
    """Check that ``value`` is a real number in the given (closed unless ``*_open``) range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if value != value:
        raise ValueError(f"{name} must not be NaN")
    if min is not None and (value < min or (min_open and value == min)):
        raise ValueError(f"{name}={value} must be {'>' if min_open else '>='} {min}")
    if max is not None and (value > max or (max_open and value == max)):
        raise ValueError(f"{name}={value} must be {'<' if max_open else '<='} {max}")
    return value


def check_bool(value: object, name: str) -> bool:
    """Check that ``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_choice(value: object, name: str, choices: Iterable[object]) -> object:
    """Check that ``value`` is one of ``choices``."""
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"{name}={value!r} must be one of {', '.join(repr(c) for c in options)}")
    return value


def check_divisible(value: int, name: str, divisor: int, divisor_name: str) -> None:
    """Check that ``divisor`` divides ``value``, e.g. ``num_kv_heads`` divides ``num_heads``."""
    if divisor == 0 or value % divisor != 0:
        raise ValueError(f"{divisor_name}={divisor} must divide {name}={value}")


def check_generator(generator: object, seed: object) -> torch.Generator:
    """The explicit source of randomness: ``generator`` as given, or a new one seeded with ``seed``
    (seed 0 when neither is given, so results never depend on global random state)."""
    if generator is not None and seed is not None:
        raise ValueError("seed and generator: pass at most one of them")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator
    seed = 0 if seed is None else check_int(seed, "seed", min=0)
    return torch.Generator().manual_seed(seed)


def compute_dtype(x: torch.Tensor | torch.dtype) -> torch.dtype:
    """The dtype every mechanism accumulates in: float64 stays float64, anything else is float32.

    Half-precision inputs are computed in float32 and cast back at the end; float64 is kept so
    that gradient checks and the course's float64 agreement tests stay exact.
    """
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    return torch.promote_types(dtype, torch.float32)


def resolve_scale(scale: object, head_dim: int, name: str = "scale") -> float:
    """The score scale: ``head_dim ** -0.5`` when ``scale`` is None, else a finite real number.

    Zero and negative scales are allowed (a zero scale gives uniform weights); bools, inf and
    NaN are refused, since they silently turn every output into NaN.
    """
    if scale is None:
        return float(head_dim) ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name} must be a real number or None, got {type(scale).__name__}")
    value = float(scale)
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} must be a finite number")
    return value
