"""Chapter 09 on a GPU in one go: the GPU twins of the kernel tests, then the kernels benchmark.

Run from the repository root on a machine with an NVIDIA GPU and the kernels extra installed::

    python -m course_lib.kernels.gpu_check                    # tests (pytest -m cuda) + benchmark
    python -m course_lib.kernels.gpu_check --notebook         # ... and notebook 09 under nbval
    python -m course_lib.kernels.gpu_check --lengths 1024 2048 --json results/kernels_gpu.json

Each step runs in its own process; the command prints what it ran, a summary, and exits non-zero if
a step failed. Without CUDA it says so and stops (the interpreter tests run with a plain ``pytest``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["main"]

REPOSITORY = Path(__file__).resolve().parents[2]


def _run(title: str, command: list[str]) -> tuple[str, int, float]:
    print(f"\n=== {title}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    code = subprocess.call(command, cwd=REPOSITORY)
    return title, code, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m course_lib.kernels.gpu_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--lengths", type=int, nargs="+", help="benchmark lengths (default: the suite's)")
    parser.add_argument("--json", default="bench_results/kernels_gpu.json", help="the benchmark's JSON file")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds of timing per point")
    parser.add_argument("--notebook", action="store_true", help="also run notebooks/09 under nbval")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print(
            "gpu_check needs an NVIDIA GPU (torch.cuda.is_available() is False). On a CPU, run the "
            "interpreter tests with `pytest tests/test_kernels.py`."
        )
        return 1
    import triton

    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    python = sys.executable
    steps = []
    if not args.skip_tests:
        steps.append(_run("GPU tests", [python, "-m", "pytest", "-q", "-m", "cuda", "tests/test_kernels.py"]))
    if not args.skip_bench:
        command = [python, "-m", "course_lib.bench", "kernels", "--no-progress", "--json", args.json]
        command += ["--min-run-time", str(args.min_run_time)]
        if args.lengths:
            command += ["--lengths", *map(str, args.lengths)]
        steps.append(_run("kernels benchmark", command))
    if args.notebook:
        notebook = "notebooks/09_kernels_in_triton.ipynb"
        steps.append(_run("notebook 09", [python, "-m", "pytest", "-q", "--nbval-lax", notebook]))

    print("\n=== summary")
    for title, code, seconds in steps:
        print(f"{title:>18}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {seconds:.0f} s")
    return 0 if all(code == 0 for _, code, _ in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
