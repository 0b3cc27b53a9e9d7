"""A model's repeated blocks and their cached inputs, for block-by-block calibration.

Layer-wise methods (GPTQ, block-wise sensitivity) do not need a full forward pass per layer:
the float model runs once over the calibration batches, the inputs of its first repeated block
(a decoder layer, a ResNet stage's unit) are kept, and from then on each block runs alone on
its cached inputs, its outputs becoming the next block's inputs.

* :func:`find_blocks` finds the repeated blocks: the ``nn.ModuleList`` (or ``nn.Sequential``)
  of two or more children of one type that holds the most quantized layers (ties: the most
  children). None when the model has no such list (then a method falls back to whole-model
  forwards).
* :func:`capture_inputs` runs the model over the batches and keeps, per batch, the positional
  and keyword arguments the first block is called with (hidden states, attention masks,
  position embeddings, ...); the rest of each forward is skipped. A cache of past keys and
  values (a keyword value whose type name ends in ``Cache``) is replaced by None and
  ``use_cache`` set False, so running a block again on its inputs does not grow it.
* :func:`block_arguments` keeps, per batch, what *every* block is called with besides its hidden
  states: blocks need not share them (Gemma-3 alternates sliding-window and full-attention
  blocks, with different masks and position embeddings). A tensor passed to several blocks is
  kept once.
* :func:`run_block` runs one block on cached inputs and returns the next block's inputs
  (the block's output, or its first element when it returns a tuple, in place of the first
  positional argument, or of the keyword ``hidden_states`` when there is none), on the next
  block's own other arguments when they are given (:func:`block_arguments`).
  :func:`hidden_states` and :func:`with_hidden` read and replace the hidden states of one
  cached input.
* :func:`run_until` runs a callable until a module's forward pre-hook fires and hands its input
  to a callback (the layer's input, without computing the layer or anything after it);
  :func:`run_until_any` does so for several modules, the callback saying where to stop.

Memory: the cached inputs of one block plus the outputs of the block being run (two blocks'
activations); nothing else is kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class _Stop(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a pre-hook once the wanted module's input is recorded."""


@dataclass(frozen=True)
class Blocks:
    """The repeated blocks of a model: the list's module name and its children in order."""

    name: str
    modules: tuple[nn.Module, ...]

    def names(self) -> list[str]:
        """Module names of the blocks (``"model.layers.0"``, ...)."""
        return [f"{self.name}.{i}" if self.name else str(i) for i in range(len(self.modules))]


@dataclass
class BlockInput:
    """What one block is called with for one calibration batch."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def find_blocks(
    model: nn.Module,
    count: Callable[[nn.Module], int] | None = None,
    containers: tuple[type[nn.Module], ...] = (nn.ModuleList, nn.Sequential),
) -> Blocks | None:
    """Return the model's repeated blocks, or None.

    Args:
        model: the (wrapped or float) model.
        count: how much of a list counts (default: the number of parameters of two or more
            dimensions, i.e. the weights of the layers it holds); the list with the largest
            count wins, ties broken by the number of children.
        containers: the module types that may hold the blocks.
    """
    count = count or (lambda m: sum(1 for p in m.parameters() if p.dim() >= 2))
    best: tuple[tuple[int, int], Blocks] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, containers) or len(mod) < 2:
            continue
        children = list(mod)
        if len({type(c) for c in children}) != 1:
            continue
        key = (sum(count(c) for c in children), len(children))
        if key[0] > 0 and (best is None or key > best[0]):
            best = (key, Blocks(name, tuple(children)))
    return best[1] if best else None


def _detach(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detach(v) for v in x)
    if isinstance(x, list):
        return [_detach(v) for v in x]
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


CACHE_KEYS = ("past_key_values", "past_key_value", "layer_past", "cache")


def _is_cache(v: Any) -> bool:
    """A key-value cache object (transformers' ``Cache`` classes: ``DynamicCache`` ...)."""
    return any(c.__name__ == "Cache" for c in type(v).__mro__) or type(v).__name__.endswith("Cache")


def _clean(kwargs: dict[str, Any], keep: Callable[[Any], Any]) -> dict[str, Any]:
    """Keyword arguments with a cache (by type or by name) as None, ``use_cache`` False, the rest
    passed through ``keep``."""
    out = {k: (None if k in CACHE_KEYS or _is_cache(v) else keep(v)) for k, v in kwargs.items()}
    if "use_cache" in out:
        out["use_cache"] = False
    return out


def run_until(run: Callable[[], Any], module: nn.Module, record: Callable[[tuple, dict], None]) -> bool:
    """Call ``run()`` until ``module`` is about to run; ``record(args, kwargs)`` gets its inputs.

    Returns whether the module ran (False: ``run`` finished without calling it).
    """

    def rec(_name: str, args: tuple, kwargs: dict) -> bool:
        record(args, kwargs)
        return True

    return bool(run_until_any(run, {"": module}, rec))


def run_until_any(
    run: Callable[[], Any], modules: dict[str, nn.Module], record: Callable[[str, tuple, dict], bool]
) -> list[str]:
    """Call ``run()``; as each of ``modules`` is about to run, ``record(name, args, kwargs)`` gets
    its inputs and returns whether to stop there (the module and the rest are not run).

    Returns the names of the modules whose inputs were recorded, in order.
    """
    fired: list[str] = []

    def hook(name: str) -> Callable:
        def fn(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            fired.append(name)
            if record(name, args, kwargs):
                raise _Stop

        return fn

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in modules.items()]
    try:
        with torch.no_grad():
            run()
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return fired


@contextlib.contextmanager
def no_cache(model: nn.Module) -> Iterator[None]:
    """Turn off a transformers model's key/value cache (``config.use_cache``) inside the block."""
    config = getattr(model, "config", None)
    old = getattr(config, "use_cache", None)
    if old is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if old is not None:
            config.use_cache = old


def capture_inputs(
    model: nn.Module, block: nn.Module, batches: Sequence[Any], forward: Callable[[nn.Module, Any], Any]
) -> list[BlockInput]:
    """Run ``forward(model, batch)`` per batch and return what ``block`` is called with.

    Raises:
        ValueError: ``block`` never ran on a batch.
    """
    out: list[BlockInput] = []

    def record(args: tuple, kwargs: dict) -> None:
        out.append(BlockInput(tuple(_detach(a) for a in args), _clean(kwargs, _detach)))

    model.eval()
    with no_cache(model):
        for i, batch in enumerate(batches):
            if not run_until(lambda b=batch: forward(model, b), block, record):
                raise ValueError(f"the block {type(block).__name__} never ran on calibration batch {i}")
    return out


def block_arguments(
    model: nn.Module, modules: Sequence[nn.Module], run: Callable[[], Any]
) -> list[BlockInput]:
    """What each of ``modules`` is first called with during ``run()``, hidden states left out.

    The hidden states (the first positional argument, else the keyword ``hidden_states``) are
    None in the result; a cache object is None and ``use_cache`` False (as in
    :func:`capture_inputs`). A tensor passed to several blocks is copied once and shared. The
    forward stops after the last block's call.

    Raises:
        ValueError: a block never ran.
    """
    memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            hit = memo.get(id(x))
            if hit is None or hit[0] is not x:  # the original is held, so its id is not reused
                hit = memo[id(x)] = (x, x.detach().clone())
            return hit[1]
        if type(x) in (tuple, list):
            return type(x)(keep(v) for v in x)
        if type(x) is dict:
            return {k: keep(v) for k, v in x.items()}
        return x

    seen: dict[int, BlockInput] = {}

    def record(name: str, args: tuple, kwargs: dict) -> bool:
        k = int(name)
        if k not in seen:
            args, kwargs = tuple(args), dict(kwargs)
            if args:
                args = (None, *args[1:])
            elif "hidden_states" in kwargs:
                kwargs["hidden_states"] = None
            seen[k] = BlockInput(tuple(keep(a) for a in args), _clean(kwargs, keep))
        return k == len(modules) - 1  # stop after the last block's arguments

    try:
        run_until_any(run, {str(k): m for k, m in enumerate(modules)}, record)
    finally:
        memo.clear()
    missing = [k for k in range(len(modules)) if k not in seen]
    if missing:
        raise ValueError(f"block(s) {missing[:3]} of {len(modules)} never ran")
    return [seen[k] for k in range(len(modules))]


def first_tensor(y: Any) -> torch.Tensor:
    """The block's hidden states: ``y`` itself, or the first element of a tuple or list output."""
    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, (tuple, list)) and y and isinstance(y[0], torch.Tensor):
        return y[0]
    raise TypeError(f"a block returned {type(y).__name__}; expected a tensor or a tuple starting with one")


def hidden_states(inp: BlockInput) -> Any:
    """The hidden states of a cached input: its first positional argument, else ``hidden_states=``."""
    if inp.args:
        return inp.args[0]
    if "hidden_states" in inp.kwargs:
        return inp.kwargs["hidden_states"]
    raise ValueError(
        f"cannot tell the hidden states among the block's keywords {sorted(inp.kwargs)} "
        "(no positional input nor hidden_states=)"
    )


def with_hidden(inp: BlockInput, hidden: Any) -> BlockInput:
    """``inp`` with its hidden states (:func:`hidden_states`) replaced by ``hidden``."""
    if inp.args:
        return BlockInput((hidden, *inp.args[1:]), inp.kwargs)
    if "hidden_states" in inp.kwargs:
        return BlockInput((), {**inp.kwargs, "hidden_states": hidden})
    raise ValueError(
        f"cannot tell the hidden states among the block's keywords {sorted(inp.kwargs)} "
        "(no positional input nor hidden_states=)"
    )


def call(block: nn.Module, inp: BlockInput) -> Any:
    """Run ``block`` on one cached input (no gradient)."""
    with torch.no_grad():
        return block(*inp.args, **inp.kwargs)


def run_block(
    block: nn.Module, inputs: Sequence[BlockInput], following: Sequence[BlockInput] | None = None
) -> list[BlockInput]:
    """Run ``block`` on each cached input; return the next block's inputs: its output as the
    hidden states, on ``following`` (the next block's own arguments per batch,
    :func:`block_arguments`), else on this block's other arguments."""
    out = []
    for i, inp in enumerate(inputs):
        y = first_tensor(call(block, inp)).detach()
        out.append(with_hidden(following[i] if following is not None else inp, y))
    return out
