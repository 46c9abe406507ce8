"""Stored notebooks that read well without running: widget state and static views, and the runner."""

from pathlib import Path

import nbformat
import pytest
import torch

from course_lib import notebooks
from course_lib.notebooks import (
    WIDGET_STATE,
    WIDGET_VIEW,
    add_static_views,
    missing_widget_models,
    static_view,
)

NOTEBOOKS = sorted(Path("notebooks").glob("[0-9][0-9]*_*.ipynb"))
# Stored before `python -m course_lib.notebooks store` existed; the lead re-stores them after
# merging, and strict xfail fails until each name is removed here.
NOT_YET_STORED: set[str] = set()  # notebooks stored before static widget views (none left)
PNG = "iVBORw0KGgo="  # not a whole picture: the view copies it, never decodes it


def _model(name, state, module="@jupyter-widgets/controls"):
    return {"model_module": module, "model_name": name, "state": state}


def _explorer_state(hidden=False):
    """An ``interactive`` (a VBox) with a slider, a dropdown and an Output that printed and drew."""
    return {
        "box": _model("VBoxModel", {"children": ["IPY_MODEL_slider", "IPY_MODEL_pick", "IPY_MODEL_out"]}),
        "slider": _model("IntSliderModel", {"description": "step", "value": 4}),
        "pick": _model(
            "SelectionSliderModel",
            {"description": "block_q", "index": 0, "_options_labels": ["auto", "16"]},
        ),
        "out": _model(
            "OutputModel",
            {
                "layout": "IPY_MODEL_layout",
                "outputs": [
                    {"output_type": "stream", "name": "stdout", "text": "free list: [1, 2]\n<b>\n"},
                    {"output_type": "display_data", "data": {"image/png": PNG, "text/plain": "<Figure>"}},
                ],
            },
            module="@jupyter-widgets/output",
        ),
        "layout": _model(
            "LayoutModel", {"visibility": "hidden" if hidden else None}, "@jupyter-widgets/base"
        ),
    }


def test_static_view_lists_the_controls_then_what_was_shown():
    view = static_view(_explorer_state(), "box")
    html, text = view["text/html"], view["text/plain"]
    assert "step = 4" in html and "block_q = auto" in html  # the option's label, not its value
    assert "<pre>free list: [1, 2]\n&lt;b&gt;\n</pre>" in html  # printed text, escaped
    assert f'<img src="data:image/png;base64,{PNG}"' in html
    assert html.index("step = 4") < html.index("free list") < html.index("<img")
    assert text.startswith("Explorer (the stored first view") and "step = 4, block_q = auto" in text
    assert "children" not in text  # never the raw repr


def test_static_view_of_other_controls():
    state = {
        "box": _model("HBoxModel", {"children": [f"IPY_MODEL_{k}" for k in "abcdef"]}),
        "a": _model("FloatLogSliderModel", {"description": "temperature", "value": 0.5, "base": 10}),
        "b": _model(
            "SelectionRangeSliderModel",
            {"description": "T range", "index": [0, 2], "_options_labels": ["256", "512", "2048"]},
        ),
        "c": _model("CheckboxModel", {"description": "causal", "value": False}),
        "d": _model(
            "SelectMultipleModel", {"description": "mechanisms", "index": [1], "_options_labels": ["x", "y"]}
        ),
        "e": _model("HTMLModel", {"value": "<b>40.0 GiB</b>"}),
        "f": _model("FloatSliderModel", {"description": "beta", "value": 0.123456}),
    }
    html = static_view(state, "box")["text/html"]
    for shown in (
        "temperature = 0.5",
        "T range = 256 to 2048",
        "causal = off",
        "mechanisms = y",
        "beta = 0.123",
    ):
        assert shown in html
    assert "<b>40.0 GiB</b>" in html


def test_a_hidden_widget_shows_nothing():
    # A finished progress bar (tqdm hides it): the live view is empty, so is the static one.
    state = _explorer_state(hidden=True)
    state["box"]["state"]["children"] = ["IPY_MODEL_out"]
    assert static_view(state, "box") == {"text/plain": "", "text/html": ""}


def _notebook_with_widget(model_id, state):
    output = nbformat.v4.new_output(
        "display_data", data={WIDGET_VIEW: {"model_id": model_id, "version_major": 2, "version_minor": 0}}
    )
    cell = nbformat.v4.new_code_cell("explorer()", outputs=[output])
    notebook = nbformat.v4.new_notebook(cells=[cell])
    notebook.metadata["widgets"] = {WIDGET_STATE: {"state": state, "version_major": 2, "version_minor": 0}}
    return notebook


def test_add_static_views_fills_every_widget_output():
    notebook = _notebook_with_widget("box", _explorer_state())
    assert add_static_views(notebook) == 1
    data = notebook.cells[0].outputs[0].data
    assert data[WIDGET_VIEW]["model_id"] == "box"  # the live view stays first choice where trusted
    assert "step = 4" in data["text/html"] and "step = 4" in data["text/plain"]


def test_a_widget_without_stored_state_is_refused():
    notebook = _notebook_with_widget("gone", _explorer_state())
    assert missing_widget_models(notebook) == ["gone"]
    with pytest.raises(ValueError, match="gone"):
        add_static_views(notebook)
    with pytest.raises(KeyError, match="model_id"):
        static_view(_explorer_state(), "gone")


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(
            p,
            marks=pytest.mark.xfail(
                p.stem in NOT_YET_STORED,
                reason="stored before static views: python -m course_lib.notebooks store " + p.as_posix(),
                strict=True,
            ),
        )
        for p in NOTEBOOKS
    ],
    ids=lambda p: p.stem,
)
def test_stored_notebooks_read_well_without_running(path):
    notebook = nbformat.read(path, as_version=4)
    assert missing_widget_models(notebook) == [], "a widget would show 'model not found'"
    widgets = [
        o.data
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.outputs
        if WIDGET_VIEW in o.get("data", {})
    ]
    for data in widgets:
        assert "text/html" in data, "no static view: untrusted, JupyterLab would show the raw repr"
        assert "(children=(" not in data["text/plain"]


# --- running notebooks (a real kernel) ---------------------------------------------------------

SMALL_NOTEBOOK = [
    "import os, torch, course_lib\n"
    "print(os.environ.get('COURSE_DEVICE'), course_lib.pick_device(), torch.get_num_threads())",
    "import ipywidgets as widgets\n"
    "import matplotlib.pyplot as plt\n"
    "def square(n=3):\n"
    "    print(f'{n} squared is {n * n}')\n"
    "    plt.plot([0, n], [0, n * n]); plt.show()\n"
    "widgets.interact(square, n=widgets.IntSlider(value=3, min=0, max=10));",
]


@pytest.fixture
def small_notebook(tmp_path):
    path = tmp_path / "small.ipynb"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in SMALL_NOTEBOOK])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)
    return path


def test_store_executes_with_the_fixed_environment_and_adds_static_views(small_notebook):
    assert notebooks.main(["store", "--timeout", "300", str(small_notebook)]) == 0
    stored = nbformat.read(small_notebook, as_version=4)
    assert stored.cells[0].outputs[0].text.split() == ["cpu", "cpu", "1"]  # COURSE_DEVICE, one thread
    assert missing_widget_models(stored) == []
    data = stored.cells[1].outputs[0].data
    assert "n = 3" in data["text/html"] and "3 squared is 9" in data["text/html"]
    assert "data:image/png;base64," in data["text/html"]  # the first view's picture


def test_run_reports_each_notebook_without_saving(small_notebook, tmp_path, capsys):
    broken = tmp_path / "broken.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 / 0")]), broken)
    before = small_notebook.read_text()
    copies = tmp_path / "copies"
    assert (
        notebooks.main(
            [
                "run",
                "--device",
                "cpu",
                "--timeout",
                "300",
                "--output",
                str(copies),
                str(small_notebook),
                str(broken),
            ]
        )
        == 1
    )
    printed = capsys.readouterr().out
    assert "ok   small.ipynb" in printed and "FAIL broken.ipynb" in printed and "ZeroDivisionError" in printed
    assert small_notebook.read_text() == before
    assert (copies / "small.ipynb").exists() and not (copies / "broken.ipynb").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_run_on_cuda_without_a_gpu_says_so(small_notebook, capsys):
    assert notebooks.main(["run", "--device", "cuda", str(small_notebook)]) == 2
    assert "no CUDA device" in capsys.readouterr().out
