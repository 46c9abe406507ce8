"""Repository-wide pytest setup: notebook 09 needs the optional Triton extra.

`pytest` runs every notebook under nbval (see pyproject.toml). Chapter 09's kernels need Triton
(`pip install -c constraints.txt -e ".[kernels]"`); without it the notebook is skipped with that
reason instead of failing, and the rest of the course is tested as usual.
"""

import importlib.util

import pytest

TRITON_NOTEBOOKS = ("09_kernels_in_triton.ipynb",)


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("triton") is not None:
        return
    skip = pytest.mark.skip(reason="needs Triton: pip install -c constraints.txt -e '.[kernels]'")
    for item in items:
        if item.path.name in TRITON_NOTEBOOKS:
            item.add_marker(skip)
