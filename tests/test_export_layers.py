"""Packed and ONNX export of the layers a QCall or QConv1d site wraps: nn.Conv1d, a subclass of
nn.Linear with its own forward, and nn.Embedding (weight-only).

Oracles: the packed file loaded into a fresh float model computes the simulated model's outputs
bit for bit; ONNX Runtime runs the ONNX file and its outputs equal ``mixq.export.emulate``'s
(float32 tolerance: the float pooling sums in another order) and share the simulation's top-1.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixq
from mixq import export
from mixq.nn import QCall, QConv1d


class ScaledLinear(nn.Linear):
    """A Linear subclass with a forward of its own (a fixed output scale)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * F.linear(x, self.weight, self.bias)


class SeqNet(nn.Module):
    """Token embedding, a Conv1d over the sequence, ReLU, a Linear subclass, mean over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.conv = nn.Conv1d(16, 24, 3, padding=1)
        self.head = ScaledLinear(24, 6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(self.emb(ids).transpose(1, 2)))
        return self.head(h.transpose(1, 2)).mean(1)


def seq_net() -> nn.Module:
    torch.manual_seed(0)
    return SeqNet().eval()


def batches(n: int, seed: int, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(40, (size, 12), generator=g), torch.randint(6, (size,), generator=g)) for _ in range(n)
    ]


@pytest.fixture(scope="module", params=["w8a8", "w4a8"])
def result(request) -> tuple[mixq.Task, mixq.Result]:
    task = mixq.Task(seq_net(), batches(2, 1), batches(1, 2), name="seq")
    res = mixq.run(task, "uniform", [request.param], embeddings=True)
    return task, res


def test_the_sites_are_the_ones_named(result):
    _, res = result
    sites = mixq.sites(res.model)
    assert isinstance(sites["conv"], QConv1d)
    assert isinstance(sites["head"], QCall) and isinstance(sites["emb"], QCall)
    assert sites["emb"].weight_quant.spec is not None  # embeddings=True: a quantized table


def test_packed_file_loads_into_a_float_model_bit_for_bit(result, tmp_path):
    task, res = result
    path = export.save(res, tmp_path / "m.safetensors")
    model = export.load(path, model=seq_net())
    x = batches(1, 7, 32)[0][0]
    with torch.no_grad():
        sim = res.model(x)
        assert torch.equal(model(x), sim)
        assert not torch.equal(sim, seq_net()(x))  # the plan changes the model
    assert {type(m).__name__ for n, m in model.named_modules() if n in ("emb", "conv", "head")} == {
        "DeployCall"
    }


def test_onnx_runs_in_ort_as_the_emulation_and_the_simulation(result, tmp_path):
    task, res = result
    path = export.save(res, tmp_path / "m.onnx", format="onnx", task=task)
    x = batches(1, 9, 1000)[0][0]
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = s.run(None, {"input": x.numpy()})[0]
    emu = export.emulate(res, task)
    assert not emu.not_emulated
    with torch.no_grad():
        em, sim = emu(x).numpy(), res.model(x).numpy()
    np.testing.assert_allclose(y, em, rtol=1e-5, atol=1e-6)
    assert float((y.argmax(1) == sim.argmax(1)).mean()) >= 0.995
    np.testing.assert_allclose(y, sim, rtol=1e-3, atol=1e-3)
