"""Seeded inputs for the timing comparisons of chapters 07 and 08, and one call per recurrent method.

:func:`recurrent_inputs` builds, for one sequence length, everything the mechanisms of the
comparison read (q, k, v, unit keys, GLA's log gates, the delta rule's beta, SSD's dt and A), so
every mechanism is timed on the same numbers; :func:`run_method` maps them onto the arguments
of ``gla``, ``delta_rule`` and ``ssd``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_choice
from ..measure import random_qkv
from ..recurrent import delta_rule, gla, ssd

__all__ = ["METHODS", "HEADS", "HEAD_DIM", "recurrent_inputs", "run_method"]

METHODS = ("gla", "delta_rule", "ssd")
HEADS, HEAD_DIM = 4, 64


def recurrent_inputs(T: int, device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Seeded inputs for one benchmark point: q, k, v (1, 4, T, 64), unit keys, GLA log gates,
    beta, and SSD's dt and A."""
    q, k, v = random_qkv(T, heads=HEADS, head_dim=HEAD_DIM, device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(1)
    gates = torch.randn(1, HEADS, T, HEAD_DIM, generator=generator)
    steps = torch.randn(1, HEADS, T, generator=generator)
    return {
        "q": q,
        "k": k,
        "v": v,
        "unit_k": F.normalize(k.float(), dim=-1).to(dtype),
        "g": F.logsigmoid(gates + 3.0).to(device=device, dtype=dtype),
        "beta": torch.sigmoid(steps).to(device=device, dtype=dtype),
        "dt": F.softplus(steps - 2.0).to(device=device, dtype=dtype),
        "A": -torch.linspace(1.0, 4.0, HEADS).to(device=device, dtype=dtype),
    }


def run_method(name: str, x: dict[str, torch.Tensor], **options):
    """Call ``gla``, ``delta_rule`` or ``ssd`` on :func:`recurrent_inputs` ``x``; ``options`` pass through.

    The delta rule reads the unit keys; SSD maps x <- v, B <- k, C <- q with its own dt and A.
    """
    check_choice(name, "name", METHODS)
    if name == "gla":
        return gla(x["q"], x["k"], x["v"], x["g"], **options)
    if name == "delta_rule":
        return delta_rule(x["q"], x["unit_k"], x["v"], x["beta"], **options)
    return ssd(x["v"], x["dt"], x["A"], x["k"], x["q"], **options)
