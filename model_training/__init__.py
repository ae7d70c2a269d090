"""PyTorch side of the WBC segmenter: data, models, training, evaluation and ONNX export."""

from app.engine.contract import CLASS_NAMES

NUM_CLASSES = len(CLASS_NAMES)
