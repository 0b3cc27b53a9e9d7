"""mixq: mixed-precision quantization of PyTorch models, every method behind one interface.

import mixq
task = mixq.tasks.get("mnist-cnn")
res = mixq.run(task, method="uniform", candidates=["w4a8", "w8a8"],
               budget={"avg_weight_bits": 5})
res.plan.save("plan.json"); print(res.metrics)
"""

from mixq import cost, export, formats, kinds, sensitivity, tasks
from mixq.api import Result, evaluate, run
from mixq.cache import Cache
from mixq.metrics import Metrics
from mixq.options import Recipe, RunOptions
from mixq.plan import LayerSpec, Plan, QSpec, parse_candidate
from mixq.search.problem import InfeasibleBudgetError
from mixq.tasks import Task
from mixq.wrap import applied, apply, calibrate, float_layers, sites, unwrap, with_adds, wrap

__all__ = [
    "Cache",
    "InfeasibleBudgetError",
    "LayerSpec",
    "Metrics",
    "Plan",
    "QSpec",
    "Recipe",
    "Result",
    "RunOptions",
    "Task",
    "applied",
    "apply",
    "calibrate",
    "cost",
    "evaluate",
    "export",
    "float_layers",
    "formats",
    "kinds",
    "sensitivity",
    "parse_candidate",
    "run",
    "sites",
    "tasks",
    "unwrap",
    "with_adds",
    "wrap",
]
__version__ = "0.1.0"
