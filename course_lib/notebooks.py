"""Run the course's notebooks top to bottom: store them for readers, or check them on a device.

Two commands for maintainers (the README's contributor part)::

    python -m course_lib.notebooks store notebooks/04_kv_cache_compression.ipynb   # one or more
    python -m course_lib.notebooks run --device cuda                               # every notebook

``store`` executes a notebook in a fresh kernel (one thread, the CPU, fixed seeds) and writes it
back with its outputs AND the state of its widgets, so that it reads well without running:

- opened *trusted* in JupyterLab (after ``jupyter trust``, or once a reader has run it), and in
  viewers that render widget state (nbviewer, nbconvert's HTML), every explorer shows its first
  view live from the stored state;
- opened *untrusted* (a fresh clone) or where widgets cannot render (static viewers of code
  hosts), JupyterLab shows only "safe" outputs and a widget would appear as its raw ``repr``
  (``interactive(children=(IntSlider(...``). So each widget output also gets a static view: HTML
  with the controls' values, the printed text and the picture of its first view, and a plain-text
  line saying what it is.

``run`` executes notebooks without saving them (``--output DIR`` keeps copies), on the device
given (``COURSE_DEVICE`` reaches :func:`course_lib.environment.pick_device` in the kernel), and
reports each notebook's time and first error: the command for the day a GPU is at hand.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import nbformat

__all__ = [
    "WIDGET_VIEW",
    "WIDGET_STATE",
    "STORE_ENVIRONMENT",
    "static_view",
    "add_static_views",
    "missing_widget_models",
    "execute_notebook",
    "store_notebook",
    "main",
]

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"

# A stored run is reproducible: one thread (reductions do not depend on the machine's cores), the
# CPU (stored numbers are the CPU's, whatever the maintainer's machine has), fixed hash seeds, and
# inline figures (a global Agg backend would remove them).
STORE_ENVIRONMENT = {
    "COURSE_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONHASHSEED": "0",
    "COURSE_DEVICE": "cpu",
    "MPLBACKEND": None,
}

# --- static views of stored widgets ------------------------------------------------------------------

_CONTROLS = {
    "IntSliderModel",
    "FloatSliderModel",
    "FloatLogSliderModel",
    "IntRangeSliderModel",
    "FloatRangeSliderModel",
    "SelectionSliderModel",
    "SelectionRangeSliderModel",
    "DropdownModel",
    "ToggleButtonsModel",
    "RadioButtonsModel",
    "SelectModel",
    "SelectMultipleModel",
    "CheckboxModel",
    "ToggleButtonModel",
    "TextModel",
    "TextareaModel",
    "IntTextModel",
    "FloatTextModel",
    "BoundedIntTextModel",
    "BoundedFloatTextModel",
}


def _model_id(reference: str) -> str:
    return reference.removeprefix("IPY_MODEL_")


def _hidden(state: Mapping[str, dict], model: dict) -> bool:
    layout = state.get(_model_id(model["state"].get("layout") or ""), {}).get("state", {})
    return layout.get("visibility") == "hidden" or layout.get("display") == "none"


def _control_value(model: dict) -> str:
    """What a control shows: its readout, the chosen option's label, or its value."""
    s = model["state"]
    name = model["model_name"]
    labels = s.get("_options_labels")
    if labels is not None and "index" in s:
        index = s["index"]
        if isinstance(index, list):
            chosen = [labels[i] for i in index if i is not None]
            if name.endswith("RangeSliderModel"):
                return " to ".join(chosen)
            return ", ".join(chosen) or "(none)"
        return labels[index] if index is not None else "(none)"
    value = s.get("value")
    if name in ("CheckboxModel", "ToggleButtonModel"):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return " to ".join(str(v) for v in value)
    return str(value)


def _output_html(output: dict) -> str:
    kind = output.get("output_type")
    if kind == "stream":
        return f"<pre>{html.escape(''.join(output.get('text', '')))}</pre>"
    if kind == "error":
        return f"<pre>{html.escape(output.get('ename', ''))}: {html.escape(output.get('evalue', ''))}</pre>"
    data = output.get("data", {})
    if "image/png" in data:
        png = "".join(data["image/png"]).replace("\n", "")
        return f'<img src="data:image/png;base64,{png}" style="max-width: 100%">'
    if "text/html" in data:
        return "".join(data["text/html"])
    if "text/plain" in data:
        return f"<pre>{html.escape(''.join(data['text/plain']))}</pre>"
    return ""


def _walk(state: Mapping[str, dict], model_id: str, controls: list[str], parts: list[str]) -> None:
    """Collect the controls' ``name: value`` and the HTML of what ``model_id`` shows, in order."""
    model = state.get(model_id)
    if model is None or _hidden(state, model):
        return
    name, s = model["model_name"], model["state"]
    if name in _CONTROLS:
        controls.append(f"{s.get('description') or name[:-5]} = {_control_value(model)}")
    elif name in ("HTMLModel", "HTMLMathModel", "LabelModel"):
        if s.get("value"):
            parts.append(s["value"] if name != "LabelModel" else html.escape(s["value"]))
    elif name == "OutputModel":
        parts.extend(filter(None, (_output_html(o) for o in s.get("outputs", []))))
    elif name in ("FloatProgressModel", "IntProgressModel"):
        parts.append(f"{s.get('description') or ''} {s.get('value')}/{s.get('max')}".strip())
    for child in s.get("children", []):
        _walk(state, _model_id(child), controls, parts)


def static_view(state: Mapping[str, dict], model_id: str) -> dict[str, str]:
    """A static picture of stored widget ``model_id``: ``{"text/html": ..., "text/plain": ...}``.

    ``state`` maps model ids to ``{"model_name", "state", ...}`` (a notebook's stored widget
    state). The HTML lists the controls and their values, then what the widget showed (printed
    text, pictures, HTML) in order; a hidden widget (a finished progress bar) shows nothing.
    """
    if model_id not in state:
        raise KeyError(f"model_id {model_id!r} is not in the stored widget state")
    controls: list[str] = []
    parts: list[str] = []
    _walk(state, model_id, controls, parts)
    if not controls and not parts:
        return {"text/plain": "", "text/html": ""}
    note = "the stored first view; run the notebook to move the controls"
    header = ""
    if controls:
        listed = ", ".join(html.escape(c) for c in controls)
        header = f"<p><b>Explorer</b> ({note}): {listed}</p>"
    plain = (
        (f"Explorer ({note}): " + ", ".join(controls)) if controls else "(widget: run the notebook to see it)"
    )
    return {"text/html": header + "\n".join(parts), "text/plain": plain}


def missing_widget_models(notebook: nbformat.NotebookNode) -> list[str]:
    """Model ids of widget outputs that the notebook's stored widget state does not hold (they
    would show "Error displaying widget: model not found")."""
    state = notebook.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    return [
        output.data[WIDGET_VIEW]["model_id"]
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if WIDGET_VIEW in output.get("data", {}) and output.data[WIDGET_VIEW]["model_id"] not in state
    ]


def add_static_views(notebook: nbformat.NotebookNode) -> int:
    """Give every widget output of ``notebook`` its :func:`static_view` (in place); return how many.

    Raises ``ValueError`` when a widget output's model is missing from the stored state.
    """
    missing = missing_widget_models(notebook)
    if missing:
        raise ValueError(f"notebook widget outputs without stored state: {missing}")
    state = notebook.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    count = 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else ():
            data = output.get("data", {})
            if WIDGET_VIEW in data:
                data.update(static_view(state, data[WIDGET_VIEW]["model_id"]))
                count += 1
    return count


# --- running notebooks ------------------------------------------------------------------------------


@contextlib.contextmanager
def _environment(values: Mapping[str, str | None]) -> Iterator[None]:
    """``os.environ`` updated with ``values`` (None removes a variable) inside the block."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def execute_notebook(
    path: str | Path,
    *,
    environment: Mapping[str, str | None] = STORE_ENVIRONMENT,
    timeout: int = 1800,
) -> nbformat.NotebookNode:
    """``path`` executed top to bottom in a fresh kernel (in the notebook's folder, with
    ``environment`` set), outputs and widget state stored; raises on the first error."""
    from nbclient import NotebookClient

    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name=notebook.metadata.get("kernelspec", {}).get("name", "python3"),
        resources={"metadata": {"path": str(path.parent.resolve())}},
        store_widget_state=True,
    )
    with _environment(environment):
        client.execute()
    return notebook


def store_notebook(path: str | Path, *, timeout: int = 1800) -> int:
    """Execute ``path`` with :data:`STORE_ENVIRONMENT` and write it back with outputs, widget
    state and static views; return the number of widget outputs."""
    notebook = execute_notebook(path, timeout=timeout)
    count = add_static_views(notebook)
    nbformat.write(notebook, path)
    return count


def _run(paths: Sequence[Path], device: str, output: Path | None, timeout: int) -> int:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"--device {device}: torch sees no CUDA device here (torch {torch.__version__})")
            return 2
    failures = 0
    for path in paths:
        start = time.perf_counter()
        try:
            notebook = execute_notebook(
                path,
                environment={**STORE_ENVIRONMENT, "COURSE_DEVICE": device, "COURSE_THREADS": None},
                timeout=timeout,
            )
        except Exception as error:  # noqa: BLE001 - report every notebook, then fail
            failures += 1
            first_line = str(error).strip().splitlines()[-1:] or [type(error).__name__]
            print(f"FAIL {path.name} ({time.perf_counter() - start:.0f} s): {first_line[0][:300]}")
            continue
        print(f"ok   {path.name} ({time.perf_counter() - start:.0f} s on {device})")
        if output is not None:
            output.mkdir(parents=True, exist_ok=True)
            nbformat.write(notebook, output / path.name)
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m course_lib.notebooks", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    store = commands.add_parser(
        "store", help="execute notebooks and store outputs, widget state, static views"
    )
    store.add_argument("notebooks", nargs="+", type=Path)
    store.add_argument("--timeout", type=int, default=1800, help="seconds per cell (default 1800)")
    run = commands.add_parser("run", help="execute notebooks on a device without saving them; report")
    run.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook of notebooks/")
    run.add_argument("--device", default="cuda", help="COURSE_DEVICE for the kernels (default cuda)")
    run.add_argument("--output", type=Path, help="folder for the executed copies (default: none kept)")
    run.add_argument("--timeout", type=int, default=1800, help="seconds per cell (default 1800)")
    args = parser.parse_args(argv)
    if args.command == "store":
        for path in args.notebooks:
            start = time.perf_counter()
            count = store_notebook(path, timeout=args.timeout)
            print(f"stored {path} ({count} widget outputs, {time.perf_counter() - start:.0f} s)")
        return 0
    paths = args.notebooks or sorted(Path("notebooks").glob("[0-9][0-9]*_*.ipynb"))
    if not paths:
        parser.error("no notebooks given and none in ./notebooks")
    return _run(paths, args.device, args.output, args.timeout)


if __name__ == "__main__":
    raise SystemExit(main())
