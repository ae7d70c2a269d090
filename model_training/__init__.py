"""PyTorch side of the WBC segmenter: data, models, training, evaluation and ONNX export."""

CLASS_NAMES: tuple[str, ...] = ("background", "cytoplasm", "nucleus")
NUM_CLASSES = len(CLASS_NAMES)
