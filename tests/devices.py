"""A tensor that says it lives on another device, for device checks on a CPU-only machine."""

from __future__ import annotations

import torch


class Elsewhere(torch.Tensor):
    """A CPU tensor that reports another device: it lets a CPU-only machine check that a function
    compares each tensor's device with q's (the data never moves, the check reads .device)."""

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0)


def elsewhere(x: torch.Tensor) -> torch.Tensor:
    return x.as_subclass(Elsewhere)
