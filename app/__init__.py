"""The WBC segmentation service: the engine (`app.engine`: numpy, Pillow, onnxruntime, never torch), the
HTTP API around it (`app.api`) and the folder command (`app.cli`)."""
