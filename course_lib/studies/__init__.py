"""Experiments of the course: library code that widgets, figures and benchmarks call.

A study measures or trains something and returns the numbers; the leaves above it (widgets,
figures, the benchmark suites) only add controls, drawing or a command line. Import the module
you need (nothing is imported here):

- :mod:`.inputs`: the seeded inputs every mechanism of the chapter 07/08 timings reads;
- :mod:`.phases`: chapter 08's three phases (train, prefill, decode) of every mechanism, the
  FLOP/byte model and the "relative to standard attention" bars;
- :mod:`.recall_grid`: chapter 08's grid of MQAR recall runs (task per length, one grid point);
- :mod:`.gates`: chapter 07's forget and select gates followed through the recurrence;
- :mod:`.eviction`: chapter 05's KV-cache eviction study on a trained model and a synthetic one;
- :mod:`.sparse_kernels`: chapter 05's dense-masked vs skipping kernels, as timing methods (NSA and
  MoBA among them, with the blocks their kernels count);
- :mod:`.positions`: chapter 01's train-short-test-long run of the six position schemes.
"""
