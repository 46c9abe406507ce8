"""A tiny decoder-only transformer with a pluggable attention, and a corpus that needs no download.

Small on purpose (nanoGPT-like): token embedding (+ learned positions, or RoPE inside attention),
``num_layers`` pre-norm blocks ``x + attention(norm(x))`` then ``x + mlp(norm(x))``, a final norm
and a head tied to the embedding. The attention of every block is built by name from
``ATTENTION_LAYERS`` ("mha", "mqa", "gqa", "mla" from chapter 04); later chapters register more
mixers with :func:`register_attention`. A mixer is an ``nn.Module`` with
``forward(x, *, cache=None, layer_index=0) -> (B, T, d_model)`` and
``make_cache(num_layers, batch_size, max_len, *, dtype, device)`` returning a cache object with
``length(layer_index)``, shared by all blocks (each uses its own ``layer_index``).

``forward(tokens)`` is the full causal pass; ``forward(new_tokens, cache=cache)`` continues from
what the cache holds, so generation prefills once and then feeds one token per step.
:func:`step_function` wraps that for :mod:`course_lib.decoding` (greedy, sampling, beam search).

The corpus (:func:`load_corpus`) is the Zen of Python followed by the docstrings of a fixed
list of standard-library modules, lower-cased and restricted to a fixed 49-character
vocabulary (:data:`VOCAB`): deterministic for a given Python version, and offline.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import importlib
import inspect
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .checks import check_bool, check_choice, check_float, check_int, check_tensor
from .kv_cache import GroupedQueryAttention, KVCache, MultiHeadLatentAttention, gqa_attention
from .standard import apply_rope

__all__ = [
    "ModelConfig",
    "ATTENTION_LAYERS",
    "register_attention",
    "TinyTransformer",
    "step_function",
    "attention_inputs",
    "forward_with_attention",
    "VOCAB",
    "encode",
    "decode",
    "load_corpus",
    "get_batch",
    "train",
    "evaluate_loss",
    "corpus_split",
    "eviction_model_config",
    "EVICTION_TRAINING",
    "EVICTION_MODEL_PATH",
    "make_eviction_model",
    "load_eviction_model",
]


# --- configuration ---------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Shape of a :class:`TinyTransformer`.

    ``attention`` names an entry of ``ATTENTION_LAYERS``; ``num_kv_heads`` is used by "gqa"
    (default ``num_heads // 2``); ``latent_dim`` and ``rope_dim`` by "mla". ``positions`` is
    "learned" (an embedding added to the tokens, at most ``max_len`` positions) or "rope"
    (queries and keys rotated inside attention; MLA always has its own decoupled RoPE key).
    """

    vocab_size: int
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    attention: str = "mha"
    num_kv_heads: int | None = None
    latent_dim: int = 16
    rope_dim: int = 8
    mla_mode: str = "absorbed"
    positions: str = "learned"
    max_len: int = 256
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        check_int(self.vocab_size, "vocab_size", min=1)
        check_int(self.d_model, "d_model", min=1)
        check_int(self.num_layers, "num_layers", min=1)
        check_int(self.num_heads, "num_heads", min=1)
        if self.d_model % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide d_model={self.d_model}")
        check_choice(self.attention, "attention", tuple(ATTENTION_LAYERS))
        check_choice(self.positions, "positions", ("learned", "rope"))
        check_choice(self.mla_mode, "mla_mode", ("naive", "absorbed"))
        check_int(self.max_len, "max_len", min=1)
        check_int(self.mlp_ratio, "mlp_ratio", min=1)
        if self.num_kv_heads is not None:
            check_int(self.num_kv_heads, "num_kv_heads", min=1)
            if self.num_heads % self.num_kv_heads:
                raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


# --- attention mixers --------------------------------------------------------------------------


class CachedGQA(GroupedQueryAttention):
    """Chapter 04's grouped-query layer plus what the model needs: a cache factory and optional RoPE."""

    def __init__(self, config: ModelConfig, num_kv_heads: int) -> None:
        super().__init__(config.d_model, config.num_heads, num_kv_heads)
        self.rope = config.positions == "rope"

    def make_cache(self, num_layers, batch_size, max_len, *, dtype=torch.float32, device=None) -> KVCache:
        return KVCache(
            num_layers, batch_size, self.num_kv_heads, max_len, self.head_dim, dtype=dtype, device=device
        )

    def queries_keys_values(
        self, x: torch.Tensor, *, start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project ``x (B, T, d_model)`` to what attention sees: ``q (B, H, T, D)``, ``k, v (B, H_kv, T, D)``.

        With RoPE, queries and keys are rotated at positions ``start .. start + T - 1``
        (``start`` is the number of tokens already cached).
        """
        check_tensor(x, "x", ndim=3, floating=True)
        B, T, width = x.shape
        if width != self.d_model:
            raise ValueError(f"x must have last dim d_model={self.d_model}, got shape {tuple(x.shape)}")
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rope:
            positions = torch.arange(start, start + T, device=x.device)
            q, k = apply_rope(q, positions), apply_rope(k, positions)
        return q, k, v

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """Per-head output ``(B, H, T, D)`` -> the layer output ``(B, T, d_model)``, through ``out_proj``."""
        B, H, T, D = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, T, H * D))

    # Set only inside forward_with_attention: replaces causal attention by attend(q, k, v).
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, *, cache=None, layer_index: int = 0) -> torch.Tensor:
        start = 0 if cache is None else cache.length(layer_index)
        q, k, v = self.queries_keys_values(x, start=start)
        if cache is not None:
            k, v = cache.append(layer_index, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        if self.attend is not None:
            return self.merge_heads(self.attend(q, k, v))
        return self.merge_heads(gqa_attention(q, k, v, causal=True))


class CachedMLA(MultiHeadLatentAttention):
    """Chapter 04's latent attention with the inference path (``mla_mode``) fixed by the config."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(
            config.d_model,
            config.num_heads,
            head_dim=config.head_dim,
            latent_dim=config.latent_dim,
            rope_dim=config.rope_dim,
        )
        self.mode = config.mla_mode

    def forward(self, x: torch.Tensor, *, cache=None, layer_index: int = 0) -> torch.Tensor:
        return super().forward(x, cache=cache, layer_index=layer_index, mode=self.mode)


# name -> constructor(config) -> mixer module. Chapters 07/08 add theirs with register_attention.
ATTENTION_LAYERS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "mha": lambda config: CachedGQA(config, config.num_heads),
    "gqa": lambda config: CachedGQA(config, config.num_kv_heads or max(config.num_heads // 2, 1)),
    "mqa": lambda config: CachedGQA(config, 1),
    "mla": CachedMLA,
}


def register_attention(name: str, constructor: Callable[[ModelConfig], nn.Module]) -> None:
    """Make ``ModelConfig(attention=name)`` build its mixers with ``constructor(config)``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if not callable(constructor):
        raise TypeError(f"constructor must be callable, got {type(constructor).__name__}")
    ATTENTION_LAYERS[name] = constructor


# --- the model ---------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.d_model)
        self.attention = ATTENTION_LAYERS[config.attention](config)
        self.mlp_norm = nn.LayerNorm(config.d_model)
        hidden = config.mlp_ratio * config.d_model
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, hidden), nn.GELU(), nn.Linear(hidden, config.d_model)
        )

    def forward(self, x: torch.Tensor, *, cache=None, layer_index: int = 0) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cache=cache, layer_index=layer_index)
        return x + self.mlp(self.mlp_norm(x))


class TinyTransformer(nn.Module):
    """A decoder-only language model: ``tokens (B, T) long -> logits (B, T, vocab_size)``."""

    def __init__(self, config: ModelConfig, *, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        with torch.random.fork_rng(devices=[]):  # seeded init without touching global RNG state
            torch.manual_seed(check_int(seed, "seed"))
            self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
            self.position_embedding = (
                nn.Embedding(config.max_len, config.d_model) if config.positions == "learned" else None
            )
            self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
            self.norm = nn.LayerNorm(config.d_model)
            self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
            self.head.weight = self.token_embedding.weight  # tied, as in GPT-2
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=0.02)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def make_cache(self, batch_size: int, max_len: int | None = None, *, dtype=torch.float32):
        """One cache for all layers, of the kind the attention needs (KVCache or LatentKVCache)."""
        max_len = self.config.max_len if max_len is None else check_int(max_len, "max_len", min=1)
        device = self.token_embedding.weight.device
        return self.blocks[0].attention.make_cache(
            self.config.num_layers, batch_size, max_len, dtype=dtype, device=device
        )

    def forward(self, tokens: torch.Tensor, *, cache=None) -> torch.Tensor:
        """Logits for every position of ``tokens (B, T)``; with ``cache``, ``tokens`` continue it."""
        check_tensor(tokens, "tokens", ndim=2, dtype=torch.long)
        B, T = tokens.shape
        if T < 1:
            raise ValueError("tokens must hold at least one token per row")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size:
            raise ValueError(f"tokens must lie in 0 .. vocab_size-1 = {self.config.vocab_size - 1}")
        start = 0 if cache is None else cache.length(0)
        x = self.token_embedding(tokens)
        if self.position_embedding is not None:
            if start + T > self.config.max_len:
                raise ValueError(
                    f"tokens reach position {start + T}, beyond max_len={self.config.max_len} "
                    "(learned positions)"
                )
            x = x + self.position_embedding(torch.arange(start, start + T, device=tokens.device))
        for index, block in enumerate(self.blocks):
            x = block(x, cache=cache, layer_index=index)
        return self.head(self.norm(x))


def _select_rows(cache, rows: torch.Tensor) -> None:
    """Keep (and reorder) the batch rows ``rows`` of a chapter-04 cache, in place (for beam search)."""
    for name in ("keys", "values", "latent", "rope_keys"):
        if hasattr(cache, name):
            setattr(cache, name, getattr(cache, name).index_select(1, rows))
    cache.batch_size = len(rows)


def step_function(model: TinyTransformer, *, use_cache: bool = True, max_len: int | None = None):
    """A ``step_fn(tokens (N, L)) -> logits (N, V)`` for :mod:`course_lib.decoding`.

    Without the cache every call runs the whole sequence again (O(L) work per token, O(L^2) for
    a generation). With it, the first call prefills a cache and each later call feeds only the
    tokens it has not seen. Beam search reorders and duplicates rows between calls; each row's
    parent is found by matching its prefix with the previous call's rows, and the cache rows are
    gathered accordingly (a cache miss falls back to a fresh prefill).
    """
    if not isinstance(model, TinyTransformer):
        raise TypeError(f"model must be a TinyTransformer, got {type(model).__name__}")
    check_bool(use_cache, "use_cache")
    state: dict = {"cache": None, "tokens": None}

    @torch.no_grad()
    def step(tokens: torch.Tensor) -> torch.Tensor:
        if not use_cache:
            return model(tokens)[:, -1]
        previous, cache = state["tokens"], state["cache"]
        reuse = previous is not None and tokens.shape[1] > previous.shape[1]
        if reuse:
            # Parent of each row: the previous row that is a prefix of it.
            prefix = tokens[:, : previous.shape[1]]
            matches = (prefix[:, None, :] == previous[None, :, :]).all(-1)  # (N, N_prev)
            reuse = bool(matches.any(-1).all())
        if reuse:
            parents = matches.float().argmax(-1)
            if parents.shape[0] != previous.shape[0] or not torch.equal(
                parents, torch.arange(len(parents), device=parents.device)
            ):
                _select_rows(cache, parents)
            logits = model(tokens[:, previous.shape[1] :], cache=cache)[:, -1]
        else:
            cache = model.make_cache(tokens.shape[0], max_len)
            logits = model(tokens, cache=cache)[:, -1]
        state["cache"], state["tokens"] = cache, tokens
        return logits

    return step


# --- looking inside the attention -------------------------------------------------------------------


def _attention_layers(model: object, name: str = "model") -> list[CachedGQA]:
    if not isinstance(model, TinyTransformer):
        raise TypeError(f"{name} must be a TinyTransformer, got {type(model).__name__}")
    layers = [block.attention for block in model.blocks]
    if not all(isinstance(layer, CachedGQA) for layer in layers):
        raise ValueError(
            f"{name} must use softmax attention with a key/value cache ('mha', 'mqa' or 'gqa'), "
            f"got attention={model.config.attention!r}"
        )
    return layers


def forward_with_attention(
    model: TinyTransformer,
    tokens: torch.Tensor,
    attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    cache: KVCache | None = None,
) -> torch.Tensor:
    """Logits ``(B, T, vocab_size)`` of ``tokens (B, T)`` with every layer's attention done by ``attend``.

    ``attend(layer_index, q, k, v)`` gets the layer's ``q (B, H, T, D)`` and ``k, v (B, H_kv, S, D)``
    (after RoPE when ``positions="rope"``) and returns the per-head output ``(B, H, T, D)``, which
    goes through the layer's ``out_proj`` as usual. Without ``cache``, ``S = T``; with a
    :class:`~course_lib.kv_cache.KVCache` that already holds ``P`` tokens, ``tokens`` continue it
    and ``S = P + T`` (the cached entries first). With ``attend = lambda i, q, k, v:
    gqa_attention(q, k, v, causal=True)`` this is ``model(tokens, cache=cache)``; other choices
    change what the attention may see (e.g. an evicted KV cache). Only for "mha", "mqa" and "gqa".
    """
    layers = _attention_layers(model)
    if not callable(attend):
        raise TypeError(f"attend must be callable, got {type(attend).__name__}")

    def checked(layer_index: int):
        def attend_layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = attend(layer_index, q, k, v)
            if not isinstance(out, torch.Tensor) or out.shape != q.shape:
                raise ValueError(
                    f"attend must return a tensor shaped like q {tuple(q.shape)}, "
                    f"got {getattr(out, 'shape', type(out).__name__)}"
                )
            return out

        return attend_layer

    for index, layer in enumerate(layers):
        layer.attend = checked(index)
    try:
        return model(tokens, cache=cache)
    finally:
        for layer in layers:
            layer.attend = None


def attention_inputs(
    model: TinyTransformer, tokens: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each layer's attention inputs on ``tokens (B, T)``, exactly as the layer's attention sees them.

    Returns one ``(q, k, v)`` per layer: ``q (B, H, T, D)``, ``k, v (B, H_kv, T, D)`` (``H_kv = H``
    for "mha", 1 for "mqa"), keys and queries rotated by RoPE when ``positions="rope"``.
    ``gqa_attention(q, k, v, causal=True)`` followed by the layer's ``out_proj`` is the layer's
    output. Only for "mha", "mqa" and "gqa" models.
    """
    captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def attend(layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        captured.append((q, k, v))
        return gqa_attention(q, k, v, causal=True)

    forward_with_attention(model, tokens, attend)
    return captured


# --- the corpus ----------------------------------------------------------------------------------

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


# --- training --------------------------------------------------------------------------------------


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


def _loss(model: TinyTransformer, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train(
    model: TinyTransformer,
    data: torch.Tensor,
    steps: int,
    *,
    batch_size: int = 16,
    context: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """AdamW on random windows of ``data`` for ``steps`` steps; returns the loss of every step.

    The learning rate warms up over the first 10 steps and decays with a cosine to a tenth.
    Batches come from a ``torch.Generator`` seeded by ``seed``, so a run is reproducible.
    """
    if not isinstance(model, TinyTransformer):
        raise TypeError(f"model must be a TinyTransformer, got {type(model).__name__}")
    steps = check_int(steps, "steps", min=1)
    lr = check_float(lr, "lr", min=0.0, min_open=True)
    if context > model.config.max_len and model.config.positions == "learned":
        raise ValueError(f"context={context} exceeds the model's max_len={model.config.max_len}")
    generator = torch.Generator().manual_seed(check_int(seed, "seed"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = min(10, steps)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_fraction = (step - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_fraction))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="train", disable=not progress, leave=False)
    for _ in bar:
        inputs, targets = get_batch(data, batch_size, context, generator=generator)
        loss = _loss(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses


@torch.no_grad()
def evaluate_loss(
    model: TinyTransformer,
    data: torch.Tensor,
    *,
    batches: int = 8,
    batch_size: int = 16,
    context: int = 64,
    seed: int = 1,
) -> float:
    """Mean cross-entropy (nats per character) on ``batches`` seeded random windows of ``data``."""
    generator = torch.Generator().manual_seed(check_int(seed, "seed"))
    batches = check_int(batches, "batches", min=1)
    total = 0.0
    for _ in range(batches):
        inputs, targets = get_batch(data, batch_size, context, generator=generator)
        total += _loss(model, inputs, targets).item()
    return total / batches


# --- a trained model for chapter 05's KV-cache eviction -----------------------------------------------

EVICTION_MODEL_PATH = Path(__file__).resolve().parent / "data" / "eviction_model.pt"
# How the shipped weights were trained: `python -m course_lib.models --make-eviction-model`.
EVICTION_TRAINING = {"steps": 1000, "batch_size": 8, "context": 320, "lr": 3e-3, "seed": 0}
HELD_OUT_FRACTION = 0.1


def eviction_model_config() -> ModelConfig:
    """The shape of chapter 05's model: 2 layers, 4 query heads sharing 2 key/value heads, RoPE."""
    return ModelConfig(
        vocab_size=len(VOCAB),
        d_model=64,
        num_layers=2,
        num_heads=4,
        attention="gqa",
        num_kv_heads=2,
        positions="rope",
        max_len=EVICTION_TRAINING["context"],
    )


def corpus_split(held_out_fraction: float = HELD_OUT_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole corpus encoded, cut into training tokens and the last ``held_out_fraction`` held out."""
    held_out_fraction = check_float(
        held_out_fraction, "held_out_fraction", min=0.0, max=1.0, min_open=True, max_open=True
    )
    data = encode(load_corpus(None))
    split = int(len(data) * (1 - held_out_fraction))
    return data[:split], data[split:]


def make_eviction_model(
    path: str | Path | None = EVICTION_MODEL_PATH, *, progress: bool = True
) -> TinyTransformer:
    """Train chapter 05's model with :data:`EVICTION_TRAINING` and save its weights to ``path``.

    Deterministic for a given machine and PyTorch version (seeded batches and initialisation);
    takes a few minutes on one CPU core. ``path=None`` trains without saving.
    """
    train_tokens, held_out = corpus_split()
    model = TinyTransformer(eviction_model_config(), seed=EVICTION_TRAINING["seed"])
    train(model, train_tokens, progress=progress, **EVICTION_TRAINING)
    if path is not None:
        context = EVICTION_TRAINING["context"]
        held_out_loss = evaluate_loss(model, held_out, batches=4, batch_size=8, context=context)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "state_dict": model.state_dict(),
                "training": dict(EVICTION_TRAINING),
                "held_out_loss": held_out_loss,
                "torch_version": str(torch.__version__),
            },
            path,
        )
    return model


@functools.cache
def _load_eviction_model(path: str) -> TinyTransformer:
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"no weights at {path}: run `python -m course_lib.models --make-eviction-model` to train them"
        )
    saved = torch.load(path, weights_only=True)
    model = TinyTransformer(eviction_model_config())
    model.load_state_dict(saved["state_dict"])
    return model.eval().requires_grad_(False)


def load_eviction_model(path: str | Path = EVICTION_MODEL_PATH) -> TinyTransformer:
    """Chapter 05's trained model, loaded from the shipped weights once per process (in eval mode).

    The model is shared by every caller: do not train or modify it (``copy.deepcopy`` it first).
    """
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    return _load_eviction_model(str(Path(path).resolve()))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build the weights shipped with course_lib.")
    parser.add_argument("--make-eviction-model", action="store_true", help="train chapter 05's model")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for PyTorch")
    arguments = parser.parse_args()
    if not arguments.make_eviction_model:
        parser.error("nothing to do: pass --make-eviction-model")
    torch.set_num_threads(arguments.threads)
    # Use the package's own module (not this __main__ copy), so the saved model is the library's class.
    from course_lib.models import EVICTION_MODEL_PATH as target
    from course_lib.models import make_eviction_model as make

    make(target)
    print(f"saved {target} ({target.stat().st_size / 1024:.0f} KiB)")
