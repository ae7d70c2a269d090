"""`wbc-evaluate`: score checkpoints or exported ONNX models side by side, per region and per source.

Every image is predicted exactly as the service does it (`predict.predict_labels`: resize to the model
size, logits resized back, argmax) and scored at its original resolution. The report gives, for the
nucleus, the cytoplasm and the whole cell, Dice, IoU, precision, recall and pixel accuracy as mean ± sd
over images, overall and per source, with the average evaluation score (`metrics.average_score`).
Runs of one model over several seeds form a group, reported as mean ± sd across seeds and compared.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from app.engine.augment import MODES, Mode
from model_training.data import Sample, split_samples
from model_training.loading import LoadedModel, load_model
from model_training.metrics import average_score, region_scores, summarize
from model_training.predict import predict_labels, predict_primary_cell
from model_training.report import (
    AVERAGE_SCORE_DEFINITION,
    Example,
    compare_groups,
    format_table,
    group_runs,
    render_markdown,
    write_figure,
)
from model_training.train import TrainConfig, load_samples

logger = logging.getLogger(__name__)

SPLITS = ("val", "train", "all")
GROUP_BY = ("prefix", "architecture", "none")
#: A trailing seed tag that `--group-by prefix` strips from a label: `unet-s0`, `unet_seed2`, `unet-3`.
SEED_SUFFIX = re.compile(r"[-_.](?:seed|s)?\d+$")


@dataclass
class EvaluateConfig:
    """What `wbc-evaluate` scores, on which images, and where the report goes."""

    models: list[str]                       # "[LABEL=]PATH": best.pt, a run folder, or model.onnx
    data: list[str] = field(default_factory=list)   # default: each checkpoint's own data
    mask_map: str | None = None             # default: each checkpoint's own
    synthetic: bool = False
    split: str = "val"
    out: str = "runs/evaluation"
    group_by: str = "prefix"
    examples: int = 3
    device: str = "auto"
    threads: int = 0
    per_cell: bool = False                  # score the primary cell of the per-cell path
    tta: Mode = "none"                      # the engine's test-time augmentation (app.engine.augment)


def data_config(model: LoadedModel, cfg: EvaluateConfig) -> TrainConfig:
    """The model's training config with the data of `cfg` (`--data`, `--mask-map`, `--synthetic`)."""
    known = {f.name for f in fields(TrainConfig)}
    train_cfg = TrainConfig(**{k: v for k, v in model.train_config.items() if k in known})
    if cfg.synthetic:
        train_cfg.synthetic = True
    elif cfg.data:
        train_cfg.synthetic, train_cfg.data = False, list(cfg.data)
    if cfg.mask_map is not None:
        train_cfg.mask_map = cfg.mask_map
    return train_cfg


def data_description(train_cfg: TrainConfig) -> dict[str, Any]:
    """What a model is scored on, as the report records it: the folders as absolute paths, so that one
    folder named two ways (relative on the command line, absolute in an export's metadata) is one data
    set, loaded once and not flagged as different images."""
    folders = [] if train_cfg.synthetic else [str(Path(f).resolve()) for f in train_cfg.data]
    return {"synthetic": train_cfg.synthetic, "folders": folders, "mask_map": train_cfg.mask_map,
            "split_seed": train_cfg.split_seed}


def select_split(samples: Sequence[Sample], split: str, train_cfg: TrainConfig,
                 val_names: Sequence[str] | None) -> list[Sample]:
    """The samples of `split`: by the checkpoint's `val_names` where they name any of these samples,
    else by `split_samples` with the checkpoint's seed and fraction.

    Args:
        samples: every sample of the data.
        split: "val", "train" (every sample not in val) or "all".
        train_cfg: the checkpoint's training config (`split_seed`, `val_fraction`).
        val_names: the checkpoint's validation images, `"source/name"` each, if it recorded them.

    Raises:
        ValueError: when the split holds no image.
    """
    if split == "all":
        return list(samples)
    names = set(val_names or ())
    if names & {f"{s.source}/{s.name}" for s in samples}:
        val = [s for s in samples if f"{s.source}/{s.name}" in names]
        train = [s for s in samples if f"{s.source}/{s.name}" not in names]
        if len(val) < len(names):
            logger.warning("%d of the %d validation images are not in the data", len(names) - len(val),
                           len(names))
    else:
        if names:
            logger.warning("no validation image of the checkpoint is in the data: splitting it with "
                           "split_seed %d, val_fraction %g", train_cfg.split_seed, train_cfg.val_fraction)
        train, val = split_samples(samples, train_cfg.val_fraction, train_cfg.split_seed)
    chosen = val if split == "val" else train
    if not chosen:
        raise ValueError(f"the {split} split is empty; try --split all")
    return chosen


def score_model(model: LoadedModel, samples: Sequence[Sample], device: torch.device,
                per_cell: bool = False, tta: Mode = "none") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Predict and score every sample at its own resolution, as the service would return its mask.

    Args:
        model: the loaded model and its input size.
        samples: images `(H, W, 3)` uint8 with labels `(H, W)`.
        device: where the model runs.
        per_cell: score the primary cell of the service's per-cell path instead of the whole image
            (the expert masks hold the crop's centred cell).
        tta: the engine's test-time augmentation (`app.engine.augment`).

    Returns:
        The model's report entry (overall and per-source summaries, per-image scores) and its
        predictions `{"source/name": (H, W) uint8}`.
    """
    per_image, predictions = [], {}
    for s in tqdm(samples, desc=model.label, unit="img", leave=False):
        predict = predict_primary_cell if per_cell else predict_labels
        pred = predict(model.module, s.image, model.transform, device, tta)
        scores = region_scores(pred, s.label, surface=True)
        predictions[f"{s.source}/{s.name}"] = pred
        per_image.append({"source": s.source, "name": s.name, "height": int(s.label.shape[0]),
                          "width": int(s.label.shape[1]), "average": average_score(scores), "scores": scores})
    sources = sorted({row["source"] for row in per_image})
    entry = {"label": model.label, "kind": model.kind, "path": str(model.path), **model.info, "tta": tta,
             "input_size": model.input_size, "image_count": len(per_image),
             "image_counts": {src: sum(r["source"] == src for r in per_image) for src in sources},
             "overall": summarize(r["scores"] for r in per_image),
             "per_source": {src: summarize(r["scores"] for r in per_image if r["source"] == src)
                            for src in sources},
             "per_image": per_image}
    return entry, predictions


def group_name(entry: dict[str, Any], group_by: str) -> str:
    """The group a run belongs to: its label without the seed tag, its architecture, or itself."""
    if group_by == "architecture":
        return str(entry.get("architecture") or entry["label"])
    if group_by == "prefix":
        return SEED_SUFFIX.sub("", entry["label"]) or entry["label"]
    return entry["label"]


def pick_examples(entries: list[dict[str, Any]], samples: dict[str, Sample],
                  predictions: list[dict[str, np.ndarray]], count: int) -> list[Example]:
    """`count` images common to every model, from the first model's worst to its best."""
    if count <= 0:
        return []
    common = set.intersection(*(set(p) for p in predictions))
    rows = sorted((r for r in entries[0]["per_image"] if f"{r['source']}/{r['name']}" in common),
                  key=lambda r: (r["average"], r["source"], r["name"]))
    if not rows:
        return []
    picks = sorted({round(i) for i in np.linspace(0, len(rows) - 1, min(count, len(rows)))})
    keys = [f"{rows[i]['source']}/{rows[i]['name']}" for i in picks]
    return [Example(key, samples[key].image, samples[key].label,
                    {e["label"]: p[key] for e, p in zip(entries, predictions, strict=True)}) for key in keys]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def score_all(cfg: EvaluateConfig, device: torch.device) -> tuple[list[dict[str, Any]], list[Example]]:
    """Load and score every model of `cfg`, each on its split of its data (loaded once per data set).

    Returns:
        The models' report entries, in the order given, and the example images for the figure.
    """
    entries: list[dict[str, Any]] = []
    predictions: list[dict[str, np.ndarray]] = []
    first_samples: dict[str, Sample] = {}
    cache: dict[str, list[Sample]] = {}
    for spec in cfg.models:
        model = load_model(spec, device)
        model.label = _unique(model.label, [e["label"] for e in entries])
        train_cfg = data_config(model, cfg)
        data = data_description(train_cfg)
        key = json.dumps(data)
        if key not in cache:
            cache[key] = load_samples(train_cfg)
        samples = select_split(cache[key], cfg.split, train_cfg, model.val_names)
        entry, preds = score_model(model, samples, device, cfg.per_cell, cfg.tta)
        entries.append({**entry, "split": cfg.split, "data": data, "group": group_name(entry, cfg.group_by)})
        predictions.append(preds)
        first_samples = first_samples or {f"{s.source}/{s.name}": s for s in samples}
    return entries, pick_examples(entries, first_samples, predictions, cfg.examples)


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Score every model of `cfg` and write `report.json`, `report.md` and `figure.png` to `cfg.out`.

    Args:
        cfg: the models (`[LABEL=]PATH` each), the data and split to score them on, the output folder.

    Returns:
        The report, as written to report.json: `{"schema_version", "created", "split", "average_score",
        "warnings", "models", "groups", "comparisons"}`; each model holds `overall` and `per_source`
        summaries (`{region: {metric: {"mean", "sd"}}}`) and `per_image` scores.

    Raises:
        ValueError: for an unknown split, grouping or augmentation, no model, or both `data` and
            `synthetic`.
    """
    if cfg.split not in SPLITS or cfg.group_by not in GROUP_BY or cfg.tta not in MODES:
        raise ValueError(f"split must be one of {SPLITS}, group_by one of {GROUP_BY} and tta one of {MODES}")
    if not cfg.models:
        raise ValueError("no model to evaluate")
    if cfg.data and cfg.synthetic:
        raise ValueError("give data folders or synthetic, not both")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    entries, examples = score_all(cfg, _device(cfg.device))
    groups = group_runs(entries)
    report = {"schema_version": 1, "created": _now(), "split": cfg.split, "per_cell": cfg.per_cell,
              "tta": cfg.tta,
              "average_score": AVERAGE_SCORE_DEFINITION, "warnings": _warnings(entries), "models": entries,
              "groups": groups, "comparisons": compare_groups(groups)}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(render_markdown(report, figure="figure.png"))
    write_figure(report, examples, out / "figure.png")
    return report


def _unique(label: str, others: list[str]) -> str:
    if label not in others:
        return label
    n = 2
    while f"{label}-{n}" in others:
        n += 1
    return f"{label}-{n}"


def _warnings(entries: list[dict[str, Any]]) -> list[str]:
    """Say so when the models were not scored on the same images: the comparison is then not like for like."""
    images = {e["label"]: frozenset((r["source"], r["name"]) for r in e["per_image"]) for e in entries}
    data = {json.dumps(e["data"]) for e in entries}
    if len(set(images.values())) > 1 or len(data) > 1:
        counts = ", ".join(f"{label}: {len(s)}" for label, s in images.items())
        return [f"the models were scored on different images ({counts} images; data "
                f"{' vs '.join(sorted(data))}); compare them with care"]
    return []


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_args(argv: Sequence[str] | None = None) -> EvaluateConfig:
    """Parse the command line of `wbc-evaluate` into an `EvaluateConfig`."""
    p = argparse.ArgumentParser(prog="wbc-evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="[LABEL=]PATH",
                   help="best.pt of wbc-train, a run folder, or model.onnx with its model.json beside it")
    p.add_argument("--data", nargs="+", default=[], help="dataset folders (default: each model's own)")
    p.add_argument("--mask-map", default=None,
                   help="mask values → classes, as in wbc-train (default: the model's own)")
    p.add_argument("--synthetic", action="store_true", help="score on wbc-train's generated data")
    p.add_argument("--split", choices=SPLITS, default="val",
                   help="the images each checkpoint recorded for validation, the rest, or all (default: val)")
    p.add_argument("--out", default=EvaluateConfig.out,
                   help=f"folder for report.md, report.json and figure.png (default: {EvaluateConfig.out})")
    p.add_argument("--group-by", choices=GROUP_BY, default="prefix",
                   help="pool runs over seeds: label without its seed tag (unet-s0, unet-s1 → unet), "
                        "architecture, or none (default: prefix)")
    p.add_argument("--examples", type=int, default=3, help="example overlays in the figure (default: 3)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for PyTorch (default: its own)")
    p.add_argument("--per-cell", action="store_true",
                   help="score the primary cell the service finds (finder, windows at the model's scale, "
                        "stitching) instead of the whole-image mask")
    p.add_argument("--tta", choices=MODES, default="none",
                   help="the engine's test-time augmentation: mirror (4 runs) or dihedral (8 runs)")
    return EvaluateConfig(**vars(p.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_args(argv)
    report = evaluate(cfg)
    print(format_table(report))
    print(f"wrote {Path(cfg.out) / 'report.md'}, report.json and figure.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
