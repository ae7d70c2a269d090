"""The WBC segmentation service: FastAPI + onnxruntime + numpy + Pillow (never torch)."""

#: Class ids of the public API, in this order in every mask, response and report.
CLASS_NAMES: tuple[str, ...] = ("background", "cytoplasm", "nucleus")
