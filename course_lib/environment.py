"""Which device to use and what the reader's environment is (notebook 00's check)."""

from __future__ import annotations

import platform

import torch

__all__ = ["pick_device", "environment_report"]


def pick_device() -> torch.device:
    """CUDA if present, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def environment_report() -> dict[str, str]:
    """Versions and hardware facts the course's numbers depend on."""
    import ipywidgets
    import matplotlib
    import numpy

    device = pick_device()
    report = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "matplotlib": matplotlib.__version__,
        "ipywidgets": ipywidgets.__version__,
        "device": str(device),
        "torch threads": str(torch.get_num_threads()),
    }
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    return report
