"""A result store: finished jobs in one SQLite file, so an interrupted run resumes where it stopped.

Every row is keyed by (model fingerprint, data fingerprint, job key) and holds a JSON value and
the time it was written. Each :meth:`Store.put` commits at once, and the file runs in WAL mode,
so a process killed at any point loses at most the job it was computing, and other processes
can read the store while one writes to it.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    model_fp TEXT NOT NULL,
    data_fp TEXT NOT NULL,
    job_key TEXT NOT NULL,
    value TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (model_fp, data_fp, job_key)
)
"""


def _tensor_bytes(t: torch.Tensor) -> bytes:
    # view as bytes so every dtype (bfloat16, float8 included) hashes without numpy support
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _update_tensor(h: Any, t: torch.Tensor) -> None:
    h.update(f"tensor:{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(_tensor_bytes(t))


def fingerprint_model(model: nn.Module) -> str:
    """Return the sha256 hex digest of a model's parameter and buffer names, shapes and bytes.

    Two models with equal weights have equal fingerprints, whatever objects hold them.

    >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    >>> _ = b.load_state_dict(a.state_dict())
    >>> fingerprint_model(a) == fingerprint_model(b)
    True
    """
    h = hashlib.sha256()
    for kind, named in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            h.update(f"{kind}:{name}:".encode())
            _update_tensor(h, t)
    return h.hexdigest()


def _update_data(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        _update_tensor(h, obj)
    elif isinstance(obj, Mapping):
        h.update(f"dict:{len(obj)}:".encode())
        for k in sorted(obj, key=str):
            h.update(f"key:{k!s}:".encode())
            _update_data(h, obj[k])
    elif isinstance(obj, (tuple, list)):
        h.update(f"seq:{len(obj)}:".encode())
        for item in obj:
            _update_data(h, item)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(f"scalar:{type(obj).__name__}:{obj!r}:".encode())
    else:
        raise TypeError(
            f"cannot fingerprint a batch element of type {type(obj).__name__}; batches may hold "
            "tensors, dicts, tuples, lists and plain scalars"
        )


def fingerprint_data(batches: Iterable[Any]) -> str:
    """Return the sha256 hex digest of a sequence of batches (tensors in dicts, tuples, lists).

    >>> x = torch.ones(2, 3)
    >>> fingerprint_data([(x, x)]) == fingerprint_data([(x.clone(), x.clone())])
    True
    >>> fingerprint_data([{"a": x}]) == fingerprint_data([{"a": x + 1}])
    False
    """
    h = hashlib.sha256()
    n = 0
    for batch in batches:
        h.update(f"batch:{n}:".encode())
        _update_data(h, batch)
        n += 1
    h.update(f"batches:{n}".encode())
    return h.hexdigest()


class Store:
    """Finished job results in a SQLite file, keyed by (model_fp, data_fp, job_key).

    Args:
        path: the SQLite file; created with its parent directory if missing.

    Values are JSON (numbers, strings, lists, dicts); NaN and infinities are kept.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=60.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(_SCHEMA)
        self._conn.commit()

    def get(self, model_fp: str, data_fp: str, key: str) -> Any:
        """Return the stored value of a job; a job not in the store raises a KeyError."""
        row = self._conn.execute(
            "SELECT value FROM jobs WHERE model_fp = ? AND data_fp = ? AND job_key = ?",
            (model_fp, data_fp, key),
        ).fetchone()
        if row is None:
            raise KeyError(key)
        return json.loads(row[0])

    def put(self, model_fp: str, data_fp: str, key: str, value: Any) -> None:
        """Store (or replace) a job's value and commit at once."""
        text = json.dumps(value)
        with self._conn:  # one transaction, committed on exit
            self._conn.execute(
                "INSERT OR REPLACE INTO jobs (model_fp, data_fp, job_key, value, created) "
                "VALUES (?, ?, ?, ?, ?)",
                (model_fp, data_fp, key, text, time.time()),
            )

    def keys(self, model_fp: str, data_fp: str) -> list[str]:
        """Return the job keys stored for one model and data, oldest first."""
        rows = self._conn.execute(
            "SELECT job_key FROM jobs WHERE model_fp = ? AND data_fp = ? ORDER BY created, job_key",
            (model_fp, data_fp),
        ).fetchall()
        return [r[0] for r in rows]

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])

    def scope(self, model_fp: str, data_fp: str) -> Scope:
        """Return a view of the store bound to one model and data, as executors take it."""
        return Scope(self, model_fp, data_fp)

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Scope:
    """A :class:`Store` bound to one (model_fp, data_fp): ``get(key)``, ``put(key, v)``, ``keys()``."""

    store: Store
    model_fp: str
    data_fp: str

    def get(self, key: str) -> Any:
        """Return a job's stored value (KeyError if absent)."""
        return self.store.get(self.model_fp, self.data_fp, key)

    def put(self, key: str, value: Any) -> None:
        """Store a job's value and commit."""
        self.store.put(self.model_fp, self.data_fp, key, value)

    def keys(self) -> list[str]:
        """Return the stored job keys."""
        return self.store.keys(self.model_fp, self.data_fp)
