"""Train the benchmark model zoo (``mixq.zoo``) on the real Fashion-MNIST data set, reproducibly.

Each model is trained from a fixed seed with a deterministic data order and augmentation (one
``torch.Generator``), SGD with Nesterov momentum, weight decay on conv/linear weights only, and a
per-step schedule: linear warm-up, then cosine decay to zero. After every epoch the model is
evaluated on the 10,000 test images and a checkpoint (model, optimizer, scheduler, RNG states,
history) is written to ``bench/results/zoo_ckpt/{name}.pt`` (git-ignored by a ``.gitignore`` the
script writes there), so an interrupted run continues with ``--resume``. At the end it writes
``{name}.safetensors`` (float32 eval-mode state dict) and ``{name}.json`` (the training record).

Usage::

    python -m bench.train_zoo --model all --epochs 8 --threads 1
    python -m bench.train_zoo --model fashion-resnet20 --epochs 8 --threads 1 --resume
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mixq.datasets import FASHION_MEAN, FASHION_STD, fashion_mnist
from mixq.progress import progress
from mixq.zoo import MODELS, build, count_macs

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "src" / "mixq" / "zoo"
DEFAULT_CKPT = ROOT / "bench" / "results" / "zoo_ckpt"
# Settings that must match between a checkpoint and the run resuming it.
RESUME_KEYS = (
    "model",
    "epochs",
    "seed",
    "batch_size",
    "lr",
    "warmup_epochs",
    "momentum",
    "weight_decay",
    "label_smoothing",
    "limit_train",
    "channels_last",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="all", choices=[*MODELS, "all"], help="model to train")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4, help="not applied to BN or biases")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train in channels-last memory format (faster on CPU; weights are saved contiguous)",
    )
    p.add_argument("--limit-train", type=int, default=0, help="use only the first N train images")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where weights + record go")
    p.add_argument("--ckpt-dir", type=Path, default=DEFAULT_CKPT)
    p.add_argument("--resume", action="store_true", help="continue from the epoch checkpoint")
    return p.parse_args(argv)


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop after ``pad`` pixels of background padding, and random horizontal flip.

    Args:
        x: Normalized images ``[B, 1, H, W]``.
        gen: Generator that draws the offsets and flips (so the augmentation is reproducible).
        pad: Padding on each side; offsets are uniform in ``[0, 2 * pad]``.

    Returns:
        Augmented images, same shape as ``x``.
    """
    b, _, h, w = x.shape
    background = -FASHION_MEAN / FASHION_STD  # a black pixel after normalization
    padded = F.pad(x, (pad, pad, pad, pad), value=background)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # [B, H, 1]
    cols = dx[:, None] + torch.arange(w)  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]  # [B, 1, W]
    out = padded[torch.arange(b)[:, None, None], 0, rows, cols]  # [B, H, W]
    return out.unsqueeze(1)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Return the top-1 accuracy in percent of ``model`` (put in eval mode) on ``x``, ``y``."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return 100.0 * correct / len(x)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from ``1/warmup_steps`` to 1, then cosine decay to 0 at ``total_steps``.

    The schedule of ``mixq.train.lr_factor``, but not that function: it rounds differently
    (``pi * min(1, progress)`` here, ``pi * (step - warmup) / span`` there), one ulp apart at 756
    of the zoo's 3,752 steps, and the committed zoo weights were trained with this one.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.SGD:
    """SGD (Nesterov) with weight decay on conv/linear weights only (not on BN or biases)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg["weight_decay"]},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=True)


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename it over ``path``."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def ensure_ckpt_dir(folder: Path) -> None:
    """Create the checkpoint folder with a ``.gitignore`` that ignores everything in it."""
    folder.mkdir(parents=True, exist_ok=True)
    ignore = folder / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# bench/train_zoo.py's epoch checkpoints: never committed\n*\n")


def train_one(name: str, args: argparse.Namespace, data: dict[str, torch.Tensor]) -> dict:
    """Train (or resume) ``name``, write its weights and training record, return the record."""
    from safetensors.torch import save_file

    cfg = {k: getattr(args, k) for k in RESUME_KEYS if k != "model"} | {"model": name}
    command = "python -m bench.train_zoo " + shlex.join(sys.argv[1:])
    ensure_ckpt_dir(args.ckpt_dir)
    ckpt_path = args.ckpt_dir / f"{name}.pt"

    torch.manual_seed(args.seed)
    model = build(name)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = make_optimizer(model, cfg)
    x_train, y_train = data["x_train"], data["y_train"]
    if args.limit_train:
        x_train, y_train = x_train[: args.limit_train], y_train[: args.limit_train]
    n = len(x_train)
    steps_per_epoch = math.ceil(n / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = max(1, round(args.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, total_steps)
    )
    gen = torch.Generator().manual_seed(args.seed)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    history: list[dict[str, float]] = []
    sessions = [{"command": command, "threads": args.threads, "start_epoch": 0}]
    start_epoch = 0

    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["config"] != cfg:
            old = ckpt["config"]
            diff = {k: (old.get(k), v) for k, v in cfg.items() if old.get(k) != v}
            raise SystemExit(f"{ckpt_path} was made with other settings (checkpoint, now): {diff}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        history, start_epoch = ckpt["history"], ckpt["epoch"]
        sessions = ckpt["sessions"] + [
            {"command": command, "threads": args.threads, "start_epoch": start_epoch}
        ]
        print(f"[{name}] resumed from {ckpt_path} after epoch {start_epoch}", flush=True)
    elif args.resume:
        print(f"[{name}] no checkpoint at {ckpt_path}; starting from scratch", flush=True)

    x_test = data["x_test"].contiguous(memory_format=memory_format)
    y_test = data["y_test"]
    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=gen)
        loss_sum, correct = 0.0, 0
        batches = progress(range(steps_per_epoch), f"{name} epoch {epoch + 1}/{args.epochs}", unit="step")
        for b in batches:
            idx = order[b * args.batch_size : (b + 1) * args.batch_size]
            xb = augment(x_train[idx], gen).contiguous(memory_format=memory_format)
            yb = y_train[idx]
            logits = model(xb)
            loss = criterion(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
        train_s = time.perf_counter() - t0
        test_acc = accuracy(model, x_test, y_test)
        seconds = time.perf_counter() - t0
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": round(loss_sum / n, 5),
                "train_acc": round(100.0 * correct / n, 3),
                "test_acc": round(test_acc, 3),
                "lr_end": scheduler.get_last_lr()[0],
                "train_seconds": round(train_s, 1),
                "seconds": round(seconds, 1),
            }
        )
        save_atomic(
            {
                "config": cfg,
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "history": history,
                "sessions": sessions,
            },
            ckpt_path,
        )
        print(
            f"[{name}] epoch {epoch + 1}/{args.epochs} loss {loss_sum / n:.4f} "
            f"train {100.0 * correct / n:.2f}% test {test_acc:.2f}% ({seconds:.0f} s)",
            flush=True,
        )

    model = model.to(memory_format=torch.contiguous_format).eval()
    final_acc = accuracy(model, data["x_test"], y_test)
    acc_1000 = accuracy(model, data["x_test"][:1000], y_test[:1000])
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model": name, "test_acc": f"{final_acc:.2f}", "record": f"{name}.json"}
    save_file(state, str(args.out / f"{name}.safetensors"), metadata=meta)
    record = {
        "model": name,
        "architecture": type(model).__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "macs_per_image": count_macs(model),
        "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist), 60,000 train / 10,000 test",
        "epochs": args.epochs,
        "seed": args.seed,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "train_images": n,
        "optimizer": {
            "type": "SGD",
            "momentum": args.momentum,
            "nesterov": True,
            "weight_decay": args.weight_decay,
            "weight_decay_on": "conv and linear weights (not BN, not biases)",
        },
        "lr_schedule": {
            "type": "linear warm-up, then cosine to 0; stepped every batch",
            "peak_lr": args.lr,
            "warmup_epochs": args.warmup_epochs,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
        },
        "augmentation": "random crop 28x28 from 2-pixel background padding, horizontal flip p=0.5",
        "label_smoothing": args.label_smoothing,
        "channels_last": args.channels_last,
        "history": history,
        "final_test_acc": round(final_acc, 3),
        "acc_first1000": round(acc_1000, 3),
        "total_wall_s": round(sum(h["seconds"] for h in history), 1),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": sessions[0]["command"],
        "sessions": sessions,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"[{name}] final test {final_acc:.2f}% (first 1000: {acc_1000:.1f}%), "
        f"{record['total_wall_s'] / 60:.1f} min -> {args.out / name}.{{safetensors,json}}",
        flush=True,
    )
    return record


def main(argv: list[str] | None = None) -> int:
    """Train the requested models one after another."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    x_train, y_train = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    data = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    names = list(MODELS) if args.model == "all" else [args.model]
    for name in names:
        train_one(name, args, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
