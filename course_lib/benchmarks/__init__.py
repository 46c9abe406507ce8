"""Benchmark suites, one module per chapter, each with a ``SUITES`` dict (see ``course_lib.bench.suites``)."""
