"""The model being served."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import StateDep
from app.api.routes import problems
from app.api.schemas import InputInfo, ModelInfo, NormalizationInfo, StainInfo
from app.engine.contract import CLASS_NAMES

router = APIRouter(tags=["model"])


@router.get("/v1/model", response_model=ModelInfo, responses=problems(503), summary="Model metadata")
async def get_model(state: StateDep) -> ModelInfo:
    """Name, version, architecture, classes, input, normalisation (and stain normalisation, if the model
    has one), sha256, execution providers in use and the evaluation scores recorded at export."""
    model = state.require_runtime().engine.model
    meta = model.metadata
    return ModelInfo(
        name=meta.name, version=meta.version, architecture=meta.architecture, parameters=meta.parameters,
        classes=list(CLASS_NAMES),
        input=InputInfo(size=meta.input.size, color=meta.input.color, resize=meta.input.resize),
        normalization=NormalizationInfo(scale=meta.normalization.scale, mean=list(meta.normalization.mean),
                                        std=list(meta.normalization.std)),
        stain_normalization=None if meta.stain is None else StainInfo(
            method=meta.stain.method, space=meta.stain.space, mean=list(meta.stain.mean),
            std=list(meta.stain.std)),
        sha256=meta.sha256, opset=meta.opset, file=model.path.name,
        int8_agreement=model.int8_agreement, provider=model.provider,
        providers=model.providers, tta=model.tta,
        evaluation=meta.evaluation, created=meta.created,
    )
