"""Test setup: headless plotting, deterministic seeds, and hypothesis settings."""

import matplotlib
import matplotlib.pyplot as plt
import pytest
import torch
from hypothesis import settings

matplotlib.use("Agg")

# Small, deadline-free hypothesis runs keep the suite fast and stable on a 2-core CPU.
settings.register_profile("course", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("course")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")
