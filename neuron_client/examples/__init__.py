"""Models from the seed pages, ready to trace or script: used by the tests, the benchmarks and the docs."""
