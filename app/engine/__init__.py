"""The runtime every way of running the model goes through: plain Python, numpy, Pillow, OpenCV and
onnxruntime, with no HTTP and no torch.

- `contract`: `model.json` (`ModelMetadata`), class and region names, the training normalisation
- `imaging`: decode uploads, encode masks and overlays
- `transform`: `InputTransform`, the preprocessing shared with training
- `session`: which file to serve (int8 on the CPU), the onnxruntime session, runs
- `labels`: logits → class ids at the image's size
- `measure`: areas, fractions, N:C ratio
- `pipeline`: `Engine.segment` / `segment_many`, the entry points
- `report`: result documents, the results CSV, the batch ZIP
"""

from app.engine.contract import CLASS_NAMES, REGIONS, ModelMetadata
from app.engine.pipeline import Decoded, Engine, Failure, Options, Result, Upload, decode_upload
from app.engine.session import Model, ModelConfig

__all__ = ["CLASS_NAMES", "REGIONS", "Decoded", "Engine", "Failure", "Model", "ModelConfig", "ModelMetadata",
           "Options", "Result", "Upload", "decode_upload"]
