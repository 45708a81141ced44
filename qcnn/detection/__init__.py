"""Object detection: evaluation (:mod:`qcnn.detection.metrics`); the data sets are in :mod:`qcnn.data.detection`."""
