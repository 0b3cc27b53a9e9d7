"""The sensitivity table: one score per (layer, candidate), saved as safetensors with JSON metadata."""

from __future__ import annotations

import dataclasses
import json
import math
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


def mean_se(values: Any, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error of the mean of per-batch estimates along ``dim``.

    ``se = s / √n`` with ``s`` the sample standard deviation (``n − 1`` in the denominator);
    NaN with fewer than two estimates, where the spread is unknown.

    >>> m, s = mean_se(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    >>> float(m), round(float(s), 6)
    (3.0, 1.080123)
    """
    x = torch.as_tensor(values, dtype=torch.float64)
    n = x.shape[dim]
    mean = x.mean(dim)
    if n < 2:
        return mean, torch.full_like(mean, math.nan)
    return mean, x.std(dim, correction=1) / math.sqrt(n)


SCHEMA = 1
_META_KEY = "mixq.sensitivity"
_META_FIELDS = {"schema", "layers", "candidates", "kind", "meta"}
_TENSORS = {"single", "pairs", "se", "pairs_se"}


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
        se: optional standard errors of ``single`` [L, C] over the calibration batches (or
            the Hutchinson samples); NaN where unknown (one batch, a table of an older mixq).
        pairs_se: optional standard errors of ``pairs`` [L, C, L, C], the same way.
    """

    layers: list[str]
    candidates: list[str]
    single: torch.Tensor
    kind: str
    pairs: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    se: torch.Tensor | None = None
    pairs_se: torch.Tensor | None = None

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
        if self.se is not None:
            self._check_tensor("se", self.se, shape)
        if self.pairs_se is not None:
            if self.pairs is None:
                raise ValueError("Sensitivity.pairs_se needs Sensitivity.pairs")
            self._check_tensor("pairs_se", self.pairs_se, shape + shape)

    @staticmethod
    def _check_tensor(name: str, t: Any, shape: tuple[int, ...]) -> None:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"Sensitivity.{name} must be a floating-point tensor, got {t!r}")
        if tuple(t.shape) != shape:
            raise ValueError(f"Sensitivity.{name} has shape {tuple(t.shape)}; expected {shape}")

    def score(self, layer: str, candidate: str) -> float:
        """Return the single score of one layer at one candidate."""
        return float(self.single[self.layers.index(layer), self.candidates.index(candidate)])

    def error(self, layer: str, candidate: str) -> float:
        """Return the standard error of one single score (NaN when unknown)."""
        if self.se is None:
            return math.nan
        return float(self.se[self.layers.index(layer), self.candidates.index(candidate)])

    def below_noise(self, k: float = 2.0) -> list[dict[str, Any]]:
        """The (layer, candidate) scores negative beyond noise: ``single < −k·se``.

        A loss change below zero by more than ``k`` standard errors says the layer works
        *better* quantized on the calibration data: an over-fitted float model or a wrong
        objective, worth a look before trusting a plan built on it.
        """
        if self.se is None:
            return []
        hits = (self.single < -k * self.se.nan_to_num(nan=math.inf)).nonzero().tolist()
        return [
            {
                "layer": self.layers[i],
                "candidate": self.candidates[j],
                "score": float(self.single[i, j]),
                "se": float(self.se[i, j]),
            }
            for i, j in hits
        ]

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
        for name in ("pairs", "se", "pairs_se"):
            t = getattr(self, name)
            if t is not None:
                tensors[name] = t.detach().cpu().contiguous()
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
            raise ValueError(
                f"tensors {sorted(names)}; expected 'single' and optionally 'pairs', 'se', 'pairs_se'"
            )
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
            se=tensors.get("se"),
            pairs_se=tensors.get("pairs_se"),
        )
