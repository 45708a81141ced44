"""Integer-only inference and export (Jacob et al., arXiv 1712.05877; FQN, CVPR 2019).

>>> im = to_integer(qmodel, example_batch)          # compile a calibrated / trained quantized model
>>> logits = im(x)                                  # integer-only forward (int64 tensors)
>>> im.save("resnet20_int")                         # resnet20_int.npz + resnet20_int.json
>>> to_onnx(im, "resnet20.onnx")                    # QDQ ONNX, ONNX Runtime fuses it to QLinearConv ...

See docs/integer.md (section "Module layout" for which file holds what).
"""

from __future__ import annotations

from qcnn.integer.bias import AccumulatorBias, add_bias_quantizers
from qcnn.integer.compiler import to_integer
from qcnn.integer.deploy import add_residual_quantizers, share_relu_grids
from qcnn.integer.evaluate import ENGINES, run_engine
from qcnn.integer.ir import ActGrid, Op
from qcnn.integer.kernels import int_conv2d
from qcnn.integer.requant import multiply_by_quantized_multiplier, quantize_multiplier
from qcnn.integer.runtime import IntegerModel

__all__ = ["ENGINES", "AccumulatorBias", "ActGrid", "IntegerModel", "Op", "add_bias_quantizers",
           "add_residual_quantizers", "int_conv2d", "multiply_by_quantized_multiplier", "quantize_multiplier",
           "run_engine", "share_relu_grids", "to_integer"]
