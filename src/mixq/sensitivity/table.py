"""The sensitivity table: one score per (layer, candidate), saved as safetensors with JSON metadata."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mixq.plan import parse_candidate

T = TypeVar("T")


def options_of(cls: type[T], given: dict[str, Any]) -> T:
    """Build the options dataclass ``cls`` from keyword arguments, naming unknown ones and the valid ones."""
    valid = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; valid: {', '.join(valid)}")
    return cls(**given)


SCHEMA = 1
_META_KEY = "mixq.sensitivity"
_META_FIELDS = {"schema", "layers", "candidates", "kind", "meta"}
_TENSORS = {"single", "pairs"}


def _check_names(names: Any, what: str) -> list[str]:
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{what} must be a list of strings, got {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} must be unique, got {names!r}")
    return names


@dataclass(frozen=True)
class Sensitivity:
    """Per-layer, per-candidate scores; lower means the layer tolerates the candidate better.

    Attributes:
        layers: exact module names (the L axis).
        candidates: candidate names such as ``"w4a8"`` (the C axis).
        single: scores [L, C] of each layer quantized alone.
        kind: how the scores were obtained ("measured", "hawq", "proxy", ...).
        pairs: optional pairwise scores [L, C, L, C].
        meta: JSON-serializable details (losses, traces, fingerprints, settings).
    """

    layers: list[str]
    candidates: list[str]
    single: torch.Tensor
    kind: str
    pairs: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_names(self.layers, "Sensitivity.layers")
        _check_names(self.candidates, "Sensitivity.candidates")
        for c in self.candidates:
            parse_candidate(c)  # raises naming the grammar
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"Sensitivity.kind must be a non-empty string, got {self.kind!r}")
        if not isinstance(self.meta, dict):
            raise ValueError(f"Sensitivity.meta must be a dict, got {type(self.meta).__name__}")
        shape = (len(self.layers), len(self.candidates))
        self._check_tensor("single", self.single, shape)
        if self.pairs is not None:
            self._check_tensor("pairs", self.pairs, shape + shape)

    @staticmethod
    def _check_tensor(name: str, t: Any, shape: tuple[int, ...]) -> None:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"Sensitivity.{name} must be a floating-point tensor, got {t!r}")
        if tuple(t.shape) != shape:
            raise ValueError(f"Sensitivity.{name} has shape {tuple(t.shape)}; expected {shape}")

    def score(self, layer: str, candidate: str) -> float:
        """Return the single score of one layer at one candidate."""
        return float(self.single[self.layers.index(layer), self.candidates.index(candidate)])

    def save(self, path: str | Path) -> None:
        """Write the tensors as safetensors, with names, kind and meta as JSON metadata."""
        header = {
            "schema": SCHEMA,
            "layers": self.layers,
            "candidates": self.candidates,
            "kind": self.kind,
            "meta": self.meta,
        }
        tensors = {"single": self.single.detach().cpu().contiguous()}
        if self.pairs is not None:
            tensors["pairs"] = self.pairs.detach().cpu().contiguous()
        save_file(tensors, str(path), metadata={_META_KEY: json.dumps(header)})

    @classmethod
    def load(cls, path: str | Path) -> Sensitivity:
        """Read a file written by :meth:`save`, strictly; anything unexpected raises a ValueError.

        Unknown tensors or metadata keys, a wrong schema, names that are not strings and
        shapes that do not match the names are all rejected. Nothing is unpickled.
        """
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                names = set(f.keys())
                tensors = {k: f.get_tensor(k) for k in names & _TENSORS}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"sensitivity file {path} is not a valid safetensors file: {e}") from None
        try:
            return cls._from_parts(metadata, names, tensors)
        except ValueError as e:
            raise ValueError(f"sensitivity file {path}: {e}") from None

    @classmethod
    def _from_parts(
        cls, metadata: dict[str, str], names: set[str], tensors: dict[str, torch.Tensor]
    ) -> Sensitivity:
        if set(metadata) != {_META_KEY}:
            raise ValueError(f"metadata keys {sorted(metadata)}; expected only [{_META_KEY!r}]")
        if names - _TENSORS or "single" not in names:
            raise ValueError(f"tensors {sorted(names)}; expected 'single' and optionally 'pairs'")
        try:
            header = json.loads(metadata[_META_KEY])
        except json.JSONDecodeError as e:
            raise ValueError(f"metadata is not valid JSON: {e}") from None
        if not isinstance(header, dict) or set(header) != _META_FIELDS:
            keys = sorted(header) if isinstance(header, dict) else header
            raise ValueError(f"metadata fields {keys!r}; expected {sorted(_META_FIELDS)}")
        if header["schema"] != SCHEMA:
            raise ValueError(f"unsupported schema {header['schema']!r}; this mixq reads {SCHEMA}")
        return cls(
            layers=header["layers"],
            candidates=header["candidates"],
            single=tensors["single"],
            kind=header["kind"],
            pairs=tensors.get("pairs"),
            meta=header["meta"],
        )
