"""Experiments of the course: library code that widgets, figures and benchmarks call.

A study measures or trains something and returns the numbers; the leaves above it (widgets,
figures, the benchmark suites) only add controls, drawing or a command line. Import the module
you need (nothing is imported here):

- :mod:`.phases`: chapter 08's three phases (train, prefill, decode) of every catalogue mechanism, the
  FLOP/byte model and the "relative to standard attention" bars;
- :mod:`.guide`: chapter 08's decision guide, its rules and the findings (stored measurements and
  recall results) that back each recommendation;
- :mod:`.recall_study`: chapter 08's MQAR recall study (learning-rate sweep, runs to convergence,
  seeds, state sweep; cached, resumable) and the readers of its stored summary;
- :mod:`.recall_grid`: the quick 600-step grid of ``python -m course_lib.bench recall`` (one fixed
  learning rate; not stored, chapter 08 reads the study);
- :mod:`.gates`: chapter 07's forget and select gates followed through the recurrence;
- :mod:`.eviction`: chapter 05's KV-cache eviction study on a trained model and a synthetic one;
- :mod:`.sparse_kernels`: chapter 05's dense-masked vs skipping kernels, as timing methods;
- :mod:`.serving`: chapter 04b's serving engine experiments (static vs continuous batching, prefix
  caching, speculative decoding and its roofline);
- :mod:`.kv_sharing`: chapter 04's cross-layer KV sharing against MHA, GQA and MQA at one training budget.
- what a chapter's explorer and its static figures both draw: :mod:`.score_memory` (01, the
  score matrices' bytes), :mod:`.roofline` (02), :mod:`.tile_walk` (03, FlashAttention's schedule),
  :mod:`.paged_trace` (04, a paged KV cache replayed), :mod:`.sparse_patterns` (05, the mask
  gallery), :mod:`.linear_forms` (06, the three forms' schedule).
- :mod:`.positions`: chapter 01's train-short-test-long run of the six position schemes;
- :mod:`.score_mods`: chapter 03's score modifications inside the tiles and SageAttention2's errors.
"""
