"""A corpus that needs no download: the Zen of Python and standard-library docstrings.

:func:`load_corpus` is the Zen of Python followed by the docstrings of a fixed list of
standard-library modules, lower-cased and restricted to a fixed 49-character vocabulary
(:data:`VOCAB`): deterministic for a given Python version, and offline. :func:`encode` and
:func:`decode` map text to token indices and back; :func:`corpus_split` holds out the end, and
:func:`get_batch` draws random windows for training.
"""

from __future__ import annotations

import codecs
import contextlib
import importlib
import inspect
import io
import re

import torch

from ..checks import check_float, check_int, check_tensor

__all__ = [
    "VOCAB",
    "CORPUS_MODULES",
    "HELD_OUT_FRACTION",
    "encode",
    "decode",
    "load_corpus",
    "corpus_split",
    "get_batch",
]

VOCAB = "\n abcdefghijklmnopqrstuvwxyz0123456789.,:;'\"()-_="
_INDEX = {c: i for i, c in enumerate(VOCAB)}

# Fixed list of modules whose docstrings form the corpus (pure-Python modules of the standard library).
CORPUS_MODULES = (
    "textwrap",
    "string",
    "collections",
    "functools",
    "json",
    "random",
    "statistics",
    "heapq",
    "bisect",
    "fractions",
    "calendar",
    "shutil",
    "pathlib",
    "argparse",
    "logging",
    "dataclasses",
    "contextlib",
    "inspect",
    "difflib",
    "pprint",
    "tempfile",
    "zipfile",
    "csv",
    "enum",
    "doctest",
    "optparse",
    "configparser",
    "tarfile",
    "mailbox",
    "threading",
    "subprocess",
    "ipaddress",
    "uuid",
)


def encode(text: str) -> torch.Tensor:
    """Characters of ``text`` -> a long tensor of indices into :data:`VOCAB` (others raise)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    unknown = sorted(set(text) - set(_INDEX))
    if unknown:
        raise ValueError(f"text holds characters outside VOCAB: {''.join(unknown)[:20]!r}")
    return torch.tensor([_INDEX[c] for c in text], dtype=torch.long)


def decode(tokens) -> str:
    """Indices (a tensor or list) -> text."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.tolist()
    try:
        return "".join(VOCAB[i] for i in tokens)
    except (IndexError, TypeError):
        raise ValueError(f"tokens must be indices in 0 .. {len(VOCAB) - 1}") from None


def _clean(text: str) -> str:
    text = inspect.cleandoc(text).lower()
    text = "".join(c for c in text if c in _INDEX)
    text = re.sub(r" +", " ", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def load_corpus(max_chars: int | None = 150_000) -> str:
    """The Zen of Python plus the docstrings of :data:`CORPUS_MODULES`, in a fixed order.

    Module docstring first, then its public functions and classes sorted by name. Text is
    lower-cased, restricted to :data:`VOCAB` and cut at ``max_chars`` (``None``: all of it).
    The same Python version always gives the same text; other versions give similar text.
    """
    if max_chars is not None:
        max_chars = check_int(max_chars, "max_chars", min=1)
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen the first time
        import this

    pieces = [codecs.decode(this.s, "rot13")]
    for module_name in CORPUS_MODULES:
        module = importlib.import_module(module_name)
        docs = [module.__doc__ or ""]
        for name in sorted(vars(module)):
            obj = vars(module)[name]
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if getattr(obj, "__module__", None) != module_name:
                continue
            docs.append(obj.__doc__ or "")
        pieces.extend(_clean(d) for d in docs if d and d.strip())
    text = "\n\n".join(p for p in (_clean(pieces[0]), *pieces[1:]) if p)
    return text if max_chars is None else text[:max_chars]


HELD_OUT_FRACTION = 0.1


def corpus_split(held_out_fraction: float = HELD_OUT_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole corpus encoded, cut into training tokens and the last ``held_out_fraction`` held out."""
    held_out_fraction = check_float(
        held_out_fraction, "held_out_fraction", min=0.0, max=1.0, min_open=True, max_open=True
    )
    data = encode(load_corpus(None))
    split = int(len(data) * (1 - held_out_fraction))
    return data[:split], data[split:]


def get_batch(
    data: torch.Tensor, batch_size: int, context: int, *, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``data``: inputs ``(batch_size, context)`` and next-token targets."""
    check_tensor(data, "data", ndim=1, dtype=torch.long)
    batch_size = check_int(batch_size, "batch_size", min=1)
    context = check_int(context, "context", min=1)
    if data.shape[0] <= context:
        raise ValueError(f"data must hold more than context={context} tokens, got {data.shape[0]}")
    starts = torch.randint(0, data.shape[0] - context, (batch_size,), generator=generator)
    offsets = torch.arange(context)
    inputs = data[starts[:, None] + offsets]
    return inputs, data[starts[:, None] + offsets + 1]
