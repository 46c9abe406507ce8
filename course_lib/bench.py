"""The benchmark command: run one chapter's comparison, print its table, write JSON and a plot.

Command line::

    python -m course_lib.bench --help                   # the suites and what each measures
    python -m course_lib.bench standard                 # naive attention vs SDPA, T = 256 .. 4096
    python -m course_lib.bench standard --lengths 256 512 --json results.json --plot scaling.png

The suites are the ``SUITES`` dicts of the modules ``course_lib.benchmarks.ch*``. ``--help`` reads
their names and descriptions from the source, so it imports neither torch nor any suite; running
a suite imports only the module that defines it. The measuring itself (timing, peak memory,
sweeps, tables) is :mod:`course_lib.measure`.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["suites", "suite_descriptions", "load_suite", "describe_shape", "main"]

BENCHMARKS = Path(__file__).resolve().parent / "benchmarks"

# Names that lived here before the measuring moved to course_lib.measure: kept for one release.
_MOVED_TO_MEASURE = (
    "Measurement",
    "time_function",
    "peak_memory_bytes",
    "sweep",
    "format_table",
    "format_bytes",
    "loglog_slope",
    "environment_summary",
    "save_json",
    "random_qkv",
)


def __getattr__(name: str):
    """``course_lib.bench.sweep`` and the other measuring names still work (they are in measure)."""
    if name in _MOVED_TO_MEASURE:
        from . import measure

        return getattr(measure, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- finding the suites -------------------------------------------------------------------------


def _suites_in_source(path: Path) -> dict[str, str]:
    """``{suite: first line of its function's docstring}`` from the ``SUITES = {...}`` of one module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    found: dict[str, str] = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if not any(isinstance(t, ast.Name) and t.id == "SUITES" for t in targets):
            continue
        if not isinstance(node.value, ast.Dict):
            raise ValueError(f"{path}: SUITES must be a dict literal {{name: suite function}}")
        for key, value in zip(node.value.keys, node.value.values):
            if not (isinstance(key, ast.Constant) and isinstance(value, ast.Name)):
                raise ValueError(f"{path}: SUITES must map names (str) to functions of the module")
            docstring = ast.get_docstring(functions[value.id]) if value.id in functions else None
            found[key.value] = (docstring or "").strip().split("\n")[0]
    return found


def _suite_modules() -> dict[str, tuple[str, str]]:
    """``{suite: (module name, description)}`` for every suite, read from the source."""
    found: dict[str, tuple[str, str]] = {}
    for path in sorted(BENCHMARKS.glob("ch*.py")):
        module = f"{__package__}.benchmarks.{path.stem}"
        for name, description in _suites_in_source(path).items():
            found[name] = (module, description)
    return found


def suite_descriptions() -> dict[str, str]:
    """Every suite's name and the first line of its docstring (what it measures), without imports."""
    return {name: description for name, (_, description) in sorted(_suite_modules().items())}


def load_suite(name: str) -> Callable:
    """The suite ``name``, importing only the benchmark module that defines it."""
    modules = _suite_modules()
    if name not in modules:
        raise ValueError(f"name must be one of the suites {sorted(modules)}, got {name!r}")
    return importlib.import_module(modules[name][0]).SUITES[name]


class SuiteUnavailable(RuntimeError):
    """A suite cannot run here (e.g. chapter 09's kernels without a GPU); the message says why."""


def suites() -> dict[str, Callable]:
    """Every benchmark suite, collected from the ``SUITES`` dicts of ``course_lib.benchmarks.ch*``.

    A suite is called with a device and returns ``(methods, reference method, default lengths)``,
    where ``methods[name](T)`` returns the zero-argument callable to measure at length ``T``.
    Optional attributes of a suite change what the command line prints and plots:
    ``shape`` (a dict with the batch ``B``, heads ``H`` and head dim ``D`` of the run, printed
    above the table and stored in the JSON), ``table(results) -> str`` replaces
    :func:`course_lib.measure.format_table`, ``report(results) -> str`` is printed after the
    table, and ``plot(results, path)`` replaces the default log-log plot of time vs T.
    A suite that cannot run on this machine raises :class:`course_lib.measure.SuiteUnavailable`
    saying why; the command prints that reason in one line.
    """
    found: dict[str, Callable] = {}
    for module in sorted({module for module, _ in _suite_modules().values()}):
        found.update(importlib.import_module(module).SUITES)
    return found


def describe_shape(shape: dict | None) -> str:
    """``"B=1, H=8, D=64"`` for a suite's ``shape`` (other entries follow, e.g. the window)."""
    if not shape:
        return "B, H, D: not declared by the suite"
    return ", ".join(f"{key}={value}" for key, value in shape.items())


# --- the command --------------------------------------------------------------------------------


def _parser(descriptions: dict[str, str]) -> argparse.ArgumentParser:
    width = max(len(name) for name in descriptions)
    listing = "\n".join(f"  {name:<{width}}  {text}" for name, text in descriptions.items())
    parser = argparse.ArgumentParser(
        prog="python -m course_lib.bench",
        description="Measure time and peak memory of one chapter's comparison; print a table.",
        epilog=f"suites (what each measures):\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("suite", choices=list(descriptions), metavar="SUITE", help="the suite to run (below)")
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default: the suite's)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds of timing per point")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--plot", type=Path, help="write a log-log plot of time vs T here")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None):
    """Run the command line; returns the list of :class:`~course_lib.measure.Measurement`."""
    args = _parser(suite_descriptions()).parse_args(argv)
    # Imported only now: --help and argument errors need neither torch nor any suite.
    import torch

    from .checks import check_int
    from .measure import SuiteUnavailable, environment_summary, format_table, save_json, sweep

    if args.threads is not None:
        torch.set_num_threads(check_int(args.threads, "threads", min=1))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    suite = load_suite(args.suite)
    try:
        methods, reference, default_lengths = suite(device)
    except SuiteUnavailable as reason:  # a plain message, no traceback
        print(f"python -m course_lib.bench {args.suite}: {reason}", file=sys.stderr)
        raise SystemExit(1) from None
    lengths = args.lengths or default_lengths
    results = sweep(
        methods, lengths, device=device, min_run_time=args.min_run_time, progress=not args.no_progress
    )
    env = environment_summary(device)
    threads = env["threads"]
    shape = getattr(suite, "shape", None)
    print(
        f"suite {args.suite} on {env['device']} ({threads} thread{'' if threads == 1 else 's'}), "
        f"torch {env['torch']}\n{describe_shape(shape)}"
    )
    table = getattr(suite, "table", None)  # a suite may format its own tables
    print(table(results) if table is not None else format_table(results, reference=reference))
    report = getattr(suite, "report", None)  # a suite may add its own summary
    if report is not None:
        print(report(results))
    if args.json:
        print(f"wrote {save_json(results, args.json, suite=args.suite, device=device, shape=shape)}")
    plot = getattr(suite, "plot", None)  # a suite may draw its own figure
    if args.plot and plot is not None:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    elif args.plot:
        from .viz import plot_scaling

        series = {m: [r.seconds for r in results if r.method == m] for m in methods}
        ax = plot_scaling(lengths, series, ylabel="time per call (s)", title=f"{args.suite}: time vs T")
        ax.figure.savefig(args.plot, dpi=120, bbox_inches="tight")
        print(f"wrote {args.plot}")
    return results


if __name__ == "__main__":
    main()
