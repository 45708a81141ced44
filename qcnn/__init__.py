"""qcnn: quantization of convolutional neural networks.

>>> import qcnn
>>> qmodel = qcnn.quantize(model, qcnn.Recipe(method="uniform", w_bits=8, a_bits=8))
>>> with qcnn.calibrating(qmodel):
...     qmodel(calibration_images)
"""

from qcnn.calib import calibrating
from qcnn.methods import quantize
from qcnn.recipes import Override, Recipe, TrainSpec
from qcnn.transform import fold_bn

__version__ = "0.1.0"
__all__ = ["Override", "Recipe", "TrainSpec", "calibrating", "fold_bn", "quantize", "__version__"]
