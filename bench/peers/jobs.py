"""The peer tools (how each installs, which driver runs it, its budget knob) and the default jobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Peer:
    """A peer tool: how to install it in its venv and which driver runs it."""

    dist: str  # distribution whose version is recorded
    install: tuple[tuple[str, ...], ...]  # pip argument lists, run in order
    driver: str  # module in bench/peers/drivers/
    knob: str  # the tool's own budget knob, for the table
    patch_torchvision: bool = False


PEERS: dict[str, Peer] = {
    "modelopt": Peer(
        "nvidia-modelopt",
        (("-c", "constraints.txt", "nvidia-modelopt==0.47.0", "requests"),),
        "modelopt_driver",
        "effective_bits = B",
    ),
    "mct": Peer(
        "model-compression-toolkit",
        (("-c", "constraints.txt", "model-compression-toolkit==2.6.1"), ("--no-deps", "torchvision==0.28.0")),
        "mct_driver",
        "weights_memory = n_weights * B / 8 bytes",
        patch_torchvision=True,
    ),
    "nncf": Peer(
        "nncf", (("-c", "constraints.txt", "nncf==3.4.0"),), "nncf_driver", "ratio = (8 - B) / 4 INT4 share"
    ),
    "aimet": Peer(
        "aimet-torch",
        (("-c", "constraints.txt", "aimet-torch==2.42.0"),),
        "aimet_driver",
        "allowed_accuracy_drop=None; the best walk point within n_weights * B bits",
        patch_torchvision=True,
    ),
    "nncf219": Peer(
        "nncf",
        (("-c", "constraints.txt", "nncf==2.19.0"),),
        "nncf219_driver",
        "HAWQ compression_ratio = BitOps(INT8) / BitOps(plan): the smallest that fits B",
    ),
}


@dataclass(frozen=True)
class Job:
    """One peer run: tool, task, target average weight bits, tool settings."""

    tool: str
    task: str
    budget: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in sorted(self.settings.items()))
        return f"{self.tool}|{self.task}|{self.budget:g}" + (f"|{extra}" if extra else "")


# The default jobs, in priority order: budgets matched to mixq's sweeps (mnist-cnn 2.5/3/4 average
# weight bits; minilm 4.5 and 6: with INT4 and INT8 candidates only, 4 is all-INT4).
JOBS: list[Job] = [
    *(Job("modelopt", "mnist-cnn", b) for b in (2.5, 3.0, 4.0)),
    *(Job("modelopt", "minilm", b) for b in (4.5, 6.0)),
    *(Job("mct", "mnist-cnn", b) for b in (2.5, 3.0, 4.0)),
    *(Job("nncf", "minilm", b) for b in (4.5, 6.0)),
    *(Job("modelopt", t, b) for t in ("fashion-resnet20", "fashion-mobilenetv2") for b in (3.0, 4.0)),
    *(Job("mct", t, b) for t in ("fashion-resnet20", "fashion-mobilenetv2") for b in (3.0, 4.0)),
    *(Job("aimet", "mnist-cnn", b) for b in (2.5, 3.0, 4.0)),
    *(Job("nncf219", "mnist-cnn", b) for b in (2.5, 3.0, 4.0)),
    *(Job("aimet", "fashion-resnet20", b) for b in (3.0, 4.0)),
    *(Job("nncf219", "fashion-resnet20", b) for b in (3.0, 4.0)),
    *(Job(t, "fashion-mobilenetv2", b) for t in ("aimet", "nncf219") for b in (3.0, 4.0)),
    # NNCF 3.x mixes INT4 and INT8 only: 4 average bits (all INT4) is its lowest target on the CNNs
    *(Job("nncf", t, 4.0) for t in ("mnist-cnn", "fashion-resnet20", "fashion-mobilenetv2")),
    *(Job(t, "minilm", b) for t in ("mct", "aimet", "nncf219") for b in (4.5, 6.0)),
]
