"""Format kinds: each representation of a quantized tensor as one object that answers for it.

A *kind* (integer grids, minifloats, MX blocks, multipoint points, SPARQ windows) owns every
decision that depends on the representation: the checks of a spec, its storage cost and the
element bits of its BOPs, fake quantization and the straight-through mask of a weight and an
activation, the calibration statistics it needs, the codes and tensors of the packed file and
its ONNX nodes. Generic code (the site in :mod:`mixq.nn`, :mod:`mixq.cost`, :mod:`mixq.plan`,
the packed file and the ONNX writer) asks ``kind_of(spec)`` and never tests which kind it is.
The numerics stay in :mod:`mixq.formats` and :mod:`mixq.quant`: a kind is a thin object that
calls them.

The registry is open: :func:`register` adds a kind (with :func:`mixq.formats.register` for a
new format name) without editing generic code; the kind registered last is asked first
(``tests/test_kinds.py`` adds a power-of-two kind that way).

The ONNX methods receive the writer's graph ``g`` (``mixq.export.qdq.Graph``): ``g.onnx`` the
onnx module, ``g.tp`` its TensorProto, ``g.int4_as_int8``, ``g.tensor(name, dtype, values,
share=True)`` and ``g.add(proto)`` to add initializers (returning their names), and
``g.weight_nodes(lx, out, vals)`` for a DequantizeLinear weight (``vals`` from
:meth:`Kind.onnx_weight`) or, with ``vals=None``, a float32 initializer.
"""

from mixq.kinds import base, integer, minifloat, multipoint, mx, sparq
from mixq.kinds.base import *  # noqa: F403 (the protocol and the registry: the names of base.__all__)

for _module in (integer, minifloat, mx, sparq, multipoint):  # the last registered is asked first
    base.register(_module.KIND)

__all__ = list(base.__all__)
