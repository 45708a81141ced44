"""qcnn: quantization of convolutional neural networks.

>>> import qcnn
>>> qmodel = qcnn.quantize(model, qcnn.Recipe(method="uniform", w_bits=8, a_bits=8))
>>> qcnn.calibrate(qmodel, calibration_loader)      # or: with qcnn.calibrating(qmodel): qmodel(images)
>>> qcnn.save_model("q.pt", qmodel, recipe=recipe)   # reload: qcnn.load_model("q.pt", model=MyNet())
"""

from qcnn.calib import calibrating
from qcnn.checkpoint import load_model, save_model
from qcnn.methods import calibrate, quantize
from qcnn.recipes import Override, Recipe, TrainSpec, load_recipe
from qcnn.transform import fold_bn

__version__ = "0.1.0"
__all__ = ["Override", "Recipe", "TrainSpec", "calibrate", "calibrating", "fold_bn", "load_model", "load_recipe",
           "quantize", "save_model", "__version__"]
