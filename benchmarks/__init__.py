"""The benchmark scripts and what they share, a package so that tests and other scripts import
them by name (`from benchmarks import pytorch_baseline`) rather than by a path on sys.path."""
