"""Layer sensitivity: how much each layer suffers from each candidate precision.

* :func:`measured`: the loss change of quantizing one layer alone (forward passes, through an
  executor and a result store).
* :func:`hawq`: HAWQ-V2/V3's ``tr(H_l)/n_l · ‖Q(W_l) − W_l‖²`` with :func:`hutchinson_trace`.
* :func:`proxy`: the data-free ``‖Q(W_l) − W_l‖²``.
* :func:`blockwise`: :func:`measured` block by block on models of repeated blocks.
* :func:`pairwise`: CLADO's single and pairwise terms.

Measured scores carry their standard errors over the calibration batches (``se``, ``pairs_se``),
HAWQ's those of its Hutchinson samples.

All return a :class:`Sensitivity` table [L, C] that saves to safetensors.
"""

from mixq.sensitivity.blockwise import blockwise, find_blocks
from mixq.sensitivity.hessian import fisher_trace_samples, hawq, hutchinson_samples, hutchinson_trace
from mixq.sensitivity.pairs import pairwise
from mixq.sensitivity.perturb import measured
from mixq.sensitivity.proxies import proxy
from mixq.sensitivity.table import Sensitivity

__all__ = [
    "Sensitivity",
    "blockwise",
    "find_blocks",
    "fisher_trace_samples",
    "hawq",
    "hutchinson_samples",
    "hutchinson_trace",
    "measured",
    "pairwise",
    "proxy",
]
