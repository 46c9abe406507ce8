"""Seeded inputs of one benchmark point, shared by the declarations (float64, CPU).

Every builder takes the sequence length T, a :class:`~course_lib.catalogue.core.Geometry` and a
``torch.Generator``, and draws in a fixed order, so the same seed gives the same inputs. The
values are in the ranges the mechanisms expect in a trained model: unit keys for the delta-rule
family, forget gates close to 1 (``logsigmoid(x + 3)``), write strengths in (0, 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .core import Geometry

F64 = torch.float64


def normal(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=F64)


def qkv(
    T: int, g: Geometry, generator: torch.Generator, *, kv_heads: int | None = None, unit_keys: bool = False
) -> dict[str, torch.Tensor]:
    """q (B, H, T, D); k (B, H_kv, T, D); v (B, H_kv, T, D_v). ``unit_keys`` L2-normalises k."""
    H_kv = g.heads if kv_heads is None else kv_heads
    q = normal(generator, g.batch, g.heads, T, g.head_dim)
    k = normal(generator, g.batch, H_kv, T, g.head_dim)
    v = normal(generator, g.batch, H_kv, T, g.dv)
    if unit_keys:
        k = F.normalize(k, dim=-1)
    return {"q": q, "k": k, "v": v}


def log_gates(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """Log forget gates near 0 (decays near 1): ``logsigmoid(N(0, 1) + 3)``."""
    return F.logsigmoid(normal(generator, *shape) + 3.0)


def strengths(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """Write strengths (beta, learning rates) in (0, 1): ``sigmoid(N(0, 1))``."""
    return torch.sigmoid(normal(generator, *shape))


def step_sizes(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """Mamba's positive step sizes ``softplus(N(0, 1) - 2)``, about 0.13 on average."""
    return F.softplus(normal(generator, *shape) - 2.0)


def decay_rates(heads: int) -> torch.Tensor:
    """Mamba-2's negative per-head ``A``, from -1 to -4."""
    return -torch.linspace(1.0, 4.0, heads, dtype=F64)
