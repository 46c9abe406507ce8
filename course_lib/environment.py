"""Which device and how many threads the course uses, and the reader's environment (notebook 00).

Two environment variables let a reader or a maintainer decide instead of the course:

- ``COURSE_DEVICE`` (``cpu``, ``cuda``, ``cuda:1``, ``mps``, or ``meta`` in tests): the device of
  every measurement that means something on a GPU (chapter 01's quadratic wall, chapter 03's
  comparison, chapter 08's phases). ``python -m course_lib.notebooks run --device cuda`` sets it.
- ``COURSE_THREADS``: torch's intra-op threads.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported inside the functions: choosing threads at `import course_lib`
    import torch  # must not start torch (the bench command's --help would wait for it)

__all__ = [
    "FEW_CORES",
    "pick_device",
    "usable_cores",
    "choose_threads",
    "thread_choice",
    "environment_report",
]

# On machines with fewer usable cores than this, the course computes with one thread (see
# choose_threads); with more, torch's default stands.
FEW_CORES = 4


def pick_device() -> torch.device:
    """``COURSE_DEVICE`` when set; else CUDA if present, then Apple's MPS, then the CPU."""
    import torch

    forced = os.environ.get("COURSE_DEVICE", "").strip()
    if forced:
        try:
            device = torch.device(forced)
        except RuntimeError as error:
            raise ValueError(f"COURSE_DEVICE={forced!r} is not a device: {error}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"COURSE_DEVICE={forced!r} but torch sees no CUDA device")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def measurement_device() -> torch.device:
    """Where the notebooks' measurements run: :func:`pick_device`, except Apple's MPS (its kernels
    run asynchronously, and ``course_lib.bench`` can neither wait for them nor read their memory),
    which measures on the CPU."""
    import torch

    device = pick_device()
    return torch.device("cpu") if device.type == "mps" else device


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity, where the OS says; else all)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# Why the thread count is what it is, for the environment report (set by choose_threads).
_CHOICE = "torch's default"
# The value the course itself gave OMP_NUM_THREADS before torch started (then it is not the reader's).
_VARIABLES_SET: str | None = None


def _reader_set_thread_variables() -> bool:
    values = {os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")} - {None, ""}
    return bool(values) and values != {_VARIABLES_SET}


def _set_threads(count: int) -> None:
    """Before torch starts, through the variables its thread pools read at start; after, directly."""
    global _VARIABLES_SET
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(count)
    else:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = _VARIABLES_SET = str(count)


def choose_threads() -> int:
    """Set torch's intra-op threads for the course and return the count.

    ``COURSE_THREADS`` wins. Otherwise, when ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` is set,
    torch already follows it. Otherwise a machine with fewer than :data:`FEW_CORES` usable cores
    gets one thread: the course's tensors are small, and under load torch's threads spin against
    each other and against other programs (100 training steps of chapter 04's model took 82 s
    with two threads and 7 s with one on a busy 2-core machine). Called on ``import course_lib``,
    which may come before torch starts: then the choice goes through ``OMP_NUM_THREADS``.
    """
    global _CHOICE
    requested = os.environ.get("COURSE_THREADS", "").strip()
    if requested:
        if not requested.isdigit() or int(requested) < 1:
            raise ValueError(f"COURSE_THREADS must be a positive integer, got {requested!r}")
        _set_threads(int(requested))
        _CHOICE = f"COURSE_THREADS={requested}"
    elif _reader_set_thread_variables():
        _CHOICE = "following OMP_NUM_THREADS / MKL_NUM_THREADS"
    elif usable_cores() < FEW_CORES:
        _set_threads(1)
        _CHOICE = f"the course's choice for {usable_cores()} cores; COURSE_THREADS=N to change"
    else:
        _CHOICE = "torch's default"
    if "torch" in sys.modules:
        return sys.modules["torch"].get_num_threads()
    return int(os.environ.get("OMP_NUM_THREADS") or usable_cores())


def thread_choice() -> str:
    """``"<threads> (<why>)"``: torch's thread count and who chose it."""
    import torch

    return f"{torch.get_num_threads()} ({_CHOICE})"


def environment_report() -> dict[str, str]:
    """Versions and hardware facts the course's numbers depend on."""
    import ipywidgets
    import matplotlib
    import numpy
    import torch

    device = pick_device()
    report = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "matplotlib": matplotlib.__version__,
        "ipywidgets": ipywidgets.__version__,
        "device": str(device),
        "cpu cores": str(usable_cores()),
        "torch threads": thread_choice(),
    }
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    return report
