"""mixq's benchmark scripts, each run as a module from the repository root: ``python -m bench.<name>``.

Every script writes ``bench/results/<name>.json`` with its provenance (``bench.common``).
"""
