"""The peer drivers: one module per tool, run inside that tool's own venv by ``bench.peers.runner``.

Each runs as ``python -m bench.peers.drivers.<tool>_driver`` with mixq's source tree and the
repository root on ``PYTHONPATH`` (the tool's venv has neither installed); ``_common`` holds the
task building and the JSON protocol they share.
"""
