"""ONNX export of an :class:`~qcnn.integer.runtime.IntegerModel`: :func:`to_onnx` and its forms.

Every form is built with ``onnx.helper`` directly from the compiled integer model, so what is exported is
exactly the integer model (same grids, int8 weights, int32 biases):

* ``form="qdq"`` (default, portable, opset 13; :mod:`qcnn.integer.onnx_qdq`): 8-bit codes between
  ``QuantizeLinear`` / ``DequantizeLinear``, which ONNX Runtime fuses into QLinearConv, QLinearAdd, QGemm;
* ``form="qlinear"`` (:mod:`qcnn.integer.onnx_qlinear`): ``com.microsoft`` QLinearConv (``channels_last=1``) /
  QLinearAdd / QLinearGlobalAveragePool on uint8 codes in NHWC from the first layer to the last;
* ``form="integer"`` (:mod:`qcnn.integer.onnx_integer`): the engine's own integer arithmetic in standard
  operators (``ConvInteger``, ``MatMulInteger``, int64 requantization), bit-exact with the engine.

The ONNX Runtime helpers (:class:`OrtModel`, :func:`ort_codes`, :func:`optimized_op_counts`) live in
:mod:`qcnn.integer.onnx_runtime` and are importable from here too.
"""

from __future__ import annotations

from pathlib import Path

from qcnn.integer.onnx_builder import OPSET, GraphBuilder, write_model
from qcnn.integer.onnx_integer import IntegerBuilder
from qcnn.integer.onnx_qdq import QDQBuilder
from qcnn.integer.onnx_qlinear import QLinearBuilder
from qcnn.integer.onnx_runtime import OrtModel, optimized_op_counts, ort_codes
from qcnn.integer.runtime import IntegerModel

#: form name -> builder
BUILDERS: dict[str, type[GraphBuilder]] = {"qdq": QDQBuilder, "qlinear": QLinearBuilder, "integer": IntegerBuilder}
FORMS = tuple(BUILDERS)


def to_onnx(im: IntegerModel, path: str | Path | None = None, with_codes: bool = False, forced: bool = False,
            form: str = "qdq"):
    """ONNX model of ``im`` (an ``onnx.ModelProto``; written to ``path`` if given).

    ``form="qdq"`` (default): portable QDQ graph (opset 13) that any runtime can fuse. ``form="qlinear"``: the
    QOperator form for ONNX Runtime's CPU kernels (``com.microsoft`` QLinearConv/QLinearAdd, channels-last
    uint8 activations, no transposes between layers; see :class:`~qcnn.integer.onnx_qlinear.QLinearBuilder`),
    the fastest on x86. ``form="integer"``: the engine's own integer arithmetic in standard operators
    (``ConvInteger``, ``MatMulInteger``, int64 requantization; :mod:`qcnn.integer.onnx_integer`), bit-exact
    with the engine.

    ``with_codes`` adds the codes of every quantizer point as extra graph outputs and returns
    ``(model, point -> output name)``. ``forced`` (with ``with_codes``) also makes every point's consumers read
    its codes from an extra graph input ``force:<point>`` (teacher forcing: each layer can then be checked on
    exactly the simulation's input codes). Use :func:`ort_codes` to run such a model: codes of the QLinear form
    are stored with an offset (signed grids as uint8)."""
    if form not in BUILDERS:
        raise ValueError(f"form={form!r}: choose one of {FORMS}")
    builder = BUILDERS[form](im)
    model, names = builder.build(im.points if with_codes else None, forced=forced and with_codes)
    if path is not None:
        write_model(model, path)
    return (model, names) if with_codes else model


__all__ = ["BUILDERS", "FORMS", "OPSET", "OrtModel", "optimized_op_counts", "ort_codes", "to_onnx"]
