"""Chapter 04's serving engine: the tiny model served the way vLLM-style systems serve large ones.

Read in this order:
``paged_cache`` (one pool of blocks for every layer; prefix caching by chained block hashes with
LRU eviction), ``runner`` (one model step over a ragged batch, attention read by block table),
``scheduler`` (continuous batching with chunked prefill and preemption, and the static batching it
replaces), ``speculative`` (a draft model proposes, the target verifies in one forward).
Everything runs on a CPU in seconds.
"""

from .paged_cache import PagedModelCache, block_hash
from .runner import paged_attention, paged_attention_reference, paged_forward
from .scheduler import Request, Scheduler, StaticScheduler, make_trace, serve
from .speculative import (
    DRAFT_MODEL_PATH,
    DRAFT_TRAINING,
    draft_model_config,
    load_draft_model,
    make_draft_model,
    residual_distribution,
    speculative_decode,
    truncated_model,
    verify_draft,
    verify_draft_greedy,
)

__all__ = [
    "PagedModelCache",
    "block_hash",
    "paged_attention",
    "paged_attention_reference",
    "paged_forward",
    "Request",
    "Scheduler",
    "StaticScheduler",
    "serve",
    "make_trace",
    "residual_distribution",
    "verify_draft",
    "verify_draft_greedy",
    "speculative_decode",
    "truncated_model",
    "draft_model_config",
    "DRAFT_TRAINING",
    "DRAFT_MODEL_PATH",
    "make_draft_model",
    "load_draft_model",
]
