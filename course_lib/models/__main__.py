"""``python -m course_lib.models --make-eviction-model``: build the weights shipped with course_lib."""

from __future__ import annotations

import argparse

import torch

from .eviction_model import EVICTION_MODEL_PATH, make_eviction_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m course_lib.models", description="Build the weights shipped with course_lib."
    )
    parser.add_argument("--make-eviction-model", action="store_true", help="train chapter 05's model")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for PyTorch")
    arguments = parser.parse_args(argv)
    if not arguments.make_eviction_model:
        parser.error("nothing to do: pass --make-eviction-model")
    torch.set_num_threads(arguments.threads)
    make_eviction_model(EVICTION_MODEL_PATH)
    print(f"saved {EVICTION_MODEL_PATH} ({EVICTION_MODEL_PATH.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
