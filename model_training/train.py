"""`wbc-train`: train a segmentation model on dataset folders (or synthetic data) and keep the best."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from app.engine.contract import StainNormalization
from app.engine.stain import reference_statistics
from app.engine.transform import InputTransform
from model_training import CLASS_NAMES
from model_training.data import MaskMap, Sample, load_folders, oversample, parse_oversample, split_samples
from model_training.losses import DICE_POOLING, DiceCELoss
from model_training.metrics import REGIONS, region_scores, summarize
from model_training.models import build_model, count_parameters
from model_training.predict import predict_labels
from model_training.synthetic import make_samples
from model_training.transforms import (
    Augment,
    AugmentConfig,
    input_transform,
    normalize,
    normalize_stain_tensor,
    stain_of,
    to_tensor,
)

logger = logging.getLogger(__name__)

#: The generated data set of `--synthetic` (fixed, so that evaluate can rebuild the same split).
SYNTHETIC_COUNT, SYNTHETIC_SIZE = 48, 96
#: Defaults of a `--synthetic` smoke run, where the user did not choose: short, and a rate that learns
#: something visible in two epochs (at 1e-4 the smoke run's loss barely moves).
SYNTHETIC_EPOCHS, SYNTHETIC_LR = 2, 3e-3

#: The cell's longer side as a fraction of its window side in the engine's per-cell windows: 2nd to 98th
#: percentile over the 273 cells of the BCCD fields (median 0.58); the Zheng crops' own medians are
#: 0.68 and 0.57 (`--window-scale`).
WINDOW_FRACTION = (0.47, 0.76)
LOG_FIELDS = ("epoch", "lr", "train_loss", "val_dice_nucleus", "val_dice_cytoplasm", "val_dice_cell",
              "val_mean_dice", "best", "seconds")
#: `average.csv`: the running weight average (`--average-from`) after each epoch it takes in.
AVERAGE_FIELDS = ("epoch", "averaged_epochs", "val_dice_nucleus", "val_dice_cytoplasm", "val_dice_cell",
                  "val_mean_dice")


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved in every checkpoint and in model.json."""

    data: list[str] = field(default_factory=list)
    mask_map: str | None = None
    synthetic: bool = False
    model: str = "attention_unet"
    base_channels: int = 16
    depth: int = 4
    input_size: int = 160
    epochs: int = 50
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_epochs: int = 2
    min_lr_ratio: float = 0.01
    val_fraction: float = 0.2
    oversample: list[str] = field(default_factory=list)  # SOURCE=K: repeat a source K times per epoch
    split_seed: int = 0
    seed: int = 0
    amp: str = "auto"              # auto | off | bf16 | fp16
    threads: int = 0               # 0 = torch default
    out: str = "runs/default"
    resume: str | None = None
    init: str | None = None        # checkpoint whose weights start a new run (fine-tuning)
    hed: float = 0.0               # HED stain jitter σ of the augmentation (0 = off)
    window_scale: bool = False     # crop as the engine's windows: cell WINDOW_FRACTION of the side
    freeze_bn: bool = False        # BatchNorm kept in eval mode: running statistics fixed, affine trains
    average_from: int = 0          # epoch (from 1) whose weights start a running mean, average.pt (0 = off)
    stain_norm: bool = False       # Reinhard stain normalisation of every network input (app.engine.stain)
    stain_reference: dict[str, Any] | None = None  # its reference: the training images' CIELAB statistics
    dice_pooling: str = "batch"    # the loss's soft Dice: pooled over the batch, or per image (losses.py)
    blur_max: float = 1.2          # largest blur σ of the augmentation, pixels at --input-size
    noise_std: float = 0.02        # largest sensor-noise σ of the augmentation (intensities in [0, 1])

    def model_kwargs(self) -> dict[str, Any]:
        return {"base_channels": self.base_channels, "depth": self.depth}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_samples(cfg: TrainConfig) -> list[Sample]:
    """Every sample of a config, before the split (dataset folders or synthetic)."""
    if cfg.synthetic:
        return make_samples(SYNTHETIC_COUNT, size=SYNTHETIC_SIZE, seed=cfg.split_seed)
    if not cfg.data:
        raise ValueError("no data: give --data FOLDER [FOLDER ...] or --synthetic")
    return load_folders(cfg.data, MaskMap.parse(cfg.mask_map))


def load_data(cfg: TrainConfig) -> tuple[list[Sample], list[Sample]]:
    """The train and validation samples of a config (dataset folders or synthetic).

    Raises:
        ValueError: when either side of the split is empty.
    """
    train_set, val_set = split_samples(load_samples(cfg), cfg.val_fraction, cfg.split_seed)
    if not train_set or not val_set:
        raise ValueError(f"split of {len(train_set) + len(val_set)} images at val_fraction "
                         f"{cfg.val_fraction} leaves {len(train_set)} train / {len(val_set)} val")
    return train_set, val_set


def make_batches(samples: Sequence[Sample], augment: Augment, batch_size: int,
                 rng: random.Random, stain: StainNormalization | None = None,
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled, augmented batches `((N, 3, S, S), (N, S, S))`; the last may be short. With
    `stain`, each augmented image is stain-normalised as the engine does to the network's input."""
    order = list(range(len(samples)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), batch_size):
        pairs = [augment(to_tensor(samples[i].image), torch.from_numpy(samples[i].label).long())
                 for i in order[start:start + batch_size]]
        images = [normalize_stain_tensor(p[0], stain) if stain else p[0] for p in pairs]
        batches.append((normalize(torch.stack(images)), torch.stack([p[1] for p in pairs])))
    return batches


def lr_factor(epoch: float, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio` of the base rate."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / (cfg.warmup_epochs + 1)
    span = max(1, cfg.epochs - cfg.warmup_epochs)
    progress = min(1.0, (epoch - cfg.warmup_epochs) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Mixed precision: fp16 on CUDA by default, bf16 on CPU only when asked."""
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "bf16":
        return torch.bfloat16
    return torch.float16


def freeze_batchnorm(model: nn.Module) -> int:
    """Put every BatchNorm of `model` in eval mode: it normalises by its running statistics and no
    longer updates them (its affine weight and bias still train). Returns how many there are.

    For models whose statistics cannot be re-estimated, e.g. one rebuilt from an export that folded
    them into the convolutions (`model_training.from_onnx`), or for batches too small to estimate them.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
            count += 1
    return count


def train_epoch(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], loss_fn: nn.Module,
                optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, device: torch.device,
                dtype: torch.dtype | None, progress: tqdm, freeze_bn: bool = False) -> float:
    """One pass over `batches`; returns the mean loss. `freeze_bn`: BatchNorms stay in eval mode."""
    model.train()
    if freeze_bn:
        freeze_batchnorm(model)
    total, count = 0.0, 0
    for images, labels in batches:
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += float(loss.detach()) * len(images)
        count += len(images)
        progress.update(1)
        progress.set_postfix(loss=f"{total / count:.4f}")
    return total / max(count, 1)


def validate(model: nn.Module, samples: Sequence[Sample], transform: InputTransform,
             device: torch.device) -> dict[str, float]:
    """Mean Dice per region over `samples` prepared by `transform`, scored at each image's original
    resolution."""
    per_image = [region_scores(predict_labels(model, s.image, transform, device), s.label) for s in samples]
    summary = summarize(per_image)
    dice = {region: summary[region]["dice"]["mean"] for region in REGIONS}
    dice["mean"] = float(np.mean(list(dice.values())))
    return dice


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                    best: float, cfg: TrainConfig, val_names: list[str], scores: dict[str, float],
                    **extra: Any) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "best": best, "config": asdict(cfg), "val_names": val_names, "scores": scores,
                "classes": list(CLASS_NAMES), "parameters": count_parameters(model), **extra}, tmp)
    tmp.replace(path)


def weight_average(cfg: TrainConfig, model: nn.Module, out: Path, start: int,
                   device: torch.device) -> AveragedModel | None:
    """The running mean of the weights after each epoch from `cfg.average_from` on (stochastic weight
    averaging, Izmailov et al. 2018), or None when off. BatchNorm statistics are averaged with the
    weights (`use_buffers`); with `--freeze-bn` they do not move at all.

    A resumed run picks up `average.pt` of `out` with the count of epochs it holds.
    """
    if cfg.average_from <= 0:
        return None
    averaged = AveragedModel(model, use_buffers=True)
    path = out / "average.pt"
    open_log(out / "average.csv", start, AVERAGE_FIELDS)
    if start > 0 and path.exists():
        state = torch.load(path, map_location=device, weights_only=False)
        if state["epoch"] < start:
            averaged.module.load_state_dict(state["model"])
            averaged.n_averaged.fill_(int(state["averaged_epochs"]))
    return averaged


def log_average(path: Path, epoch: int, averaged_epochs: int, scores: dict[str, float]) -> None:
    """Append the weight average's validation after `epoch` (from 0) to `average.csv`."""
    with path.open("a", newline="") as f:
        csv.writer(f).writerow([epoch + 1, averaged_epochs,
                                  *(f"{scores[k]:.5f}" for k in ("nucleus", "cytoplasm", "cell", "mean"))])
    tqdm.write(f"average of {averaged_epochs} epochs: dice nucleus {scores['nucleus']:.4f} "
               f"cytoplasm {scores['cytoplasm']:.4f} cell {scores['cell']:.4f}")


def init_weights(model: nn.Module, state: dict[str, Any], path: str) -> None:
    """Start from the weights of another run's checkpoint `state`, read from `path` (fine-tuning: new
    optimizer, schedule, input size and log; the architecture must be the same).

    Raises:
        ValueError: when the checkpoint holds another architecture or width.
    """
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: its weights do not fit this model ({exc})") from exc
    logger.info("initialised from %s (epoch %d of %s)", path, int(state["epoch"]) + 1,
                state["config"].get("out"))


def inherit_stain_reference(cfg: TrainConfig, initial: dict[str, Any] | None) -> None:
    """A run started (`--init`) from a stain-normalised checkpoint (`initial`, its loaded state) keeps
    that checkpoint's reference, the normalisation its weights learned, instead of taking a new one from
    this run's images.

    Raises:
        ValueError: when such a run is not asked for stain normalisation (`--stain-norm`).
    """
    if initial is None:
        return
    reference = initial["config"].get("stain_reference")
    if reference is None:
        return
    if not cfg.stain_norm:
        raise ValueError(f"{cfg.init} was trained with stain normalisation: fine-tune it with --stain-norm")
    if cfg.stain_reference is None:
        cfg.stain_reference = reference


def resume_state(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, out: Path,
                 device: torch.device) -> tuple[int, float, int, dict[str, float]]:
    """Load `cfg.resume` into the model and optimizer; recover the best result so far.

    The best is read from `best.pt` in `out`, or beside the resumed checkpoint (copied into `out`
    so that a run resumed into a new folder still ends with a `best.pt`).

    Returns:
        `(first epoch to run, best mean Dice, its epoch, its scores)`, epochs counted from 0.
    """
    if not cfg.resume:
        return 0, -1.0, -1, {}
    state = torch.load(cfg.resume, map_location=device, weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    start, best, best_epoch = state["epoch"] + 1, state["best"], state["epoch"]
    best_scores = state.get("scores", {})
    best_path = out / "best.pt"
    beside = Path(cfg.resume).with_name("best.pt")
    if not best_path.exists() and beside.exists():
        shutil.copy2(beside, best_path)
    if best_path.exists():
        best_state = torch.load(best_path, map_location="cpu", weights_only=False)
        best, best_epoch, best_scores = best_state["best"], best_state["epoch"], best_state["scores"]
    return start, best, best_epoch, best_scores


def open_log(path: Path, start: int, fields: Sequence[str] = LOG_FIELDS) -> None:
    """Start a per-epoch log (`log.csv`, `average.csv`: epoch counted from 1 first), or keep the rows of
    the epochs before `start` when resuming (dropping any later ones, written after the checkpoint that
    is resumed)."""
    rows: list[list[str]] = []
    if start > 0 and path.exists():
        with path.open(newline="") as f:
            rows = [r for r in list(csv.reader(f))[1:] if r and int(r[0]) <= start]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([list(fields), *rows])


def log_epoch(path: Path, epoch: int, lr: float, loss: float, scores: dict[str, float], improved: bool,
              seconds: float) -> None:
    """Append one row (epoch counted from 1) to `log.csv` and print it above the progress bars."""
    row = [epoch + 1, f"{lr:.3g}", f"{loss:.5f}",
           *(f"{scores[k]:.5f}" for k in ("nucleus", "cytoplasm", "cell", "mean")), int(improved),
           f"{seconds:.1f}"]
    with path.open("a", newline="") as f:
        csv.writer(f).writerow(row)
    tqdm.write(f"epoch {epoch + 1:3d}  loss {loss:.4f}  dice nucleus {scores['nucleus']:.4f} "
               f"cytoplasm {scores['cytoplasm']:.4f} cell {scores['cell']:.4f}"
               f"{'  *best' if improved else ''}")


def augment_config(cfg: TrainConfig) -> AugmentConfig:
    """The training augmentation a config asks for (with the defaults, `AugmentConfig()`'s)."""
    blur: dict[str, Any] = ({"blur_sigma": (min(0.3, cfg.blur_max), cfg.blur_max)} if cfg.blur_max > 0
                            else {"blur_p": 0.0})
    return AugmentConfig(hed=cfg.hed, window_fraction=WINDOW_FRACTION if cfg.window_scale else None,
                         noise_std=cfg.noise_std, **blur)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run a training; write `best.pt`, `last.pt`, `log.csv` and `config.json` under `cfg.out`.

    Returns:
        `{"best_epoch", "best_mean_dice", "best_scores", "epochs_run", "out"}`.
    """
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train_set, val_set = load_data(cfg)
    train_images = len(train_set)
    # The checkpoint a fine-tuning run starts from, read once: its stain reference, then its weights.
    initial = torch.load(cfg.init, map_location=device, weights_only=False) \
        if cfg.init and not cfg.resume else None
    inherit_stain_reference(cfg, initial)
    if cfg.stain_norm and cfg.stain_reference is None:
        cfg.stain_reference = reference_statistics(s.image for s in train_set).model_dump()
    stain = stain_of(asdict(cfg))
    transform = input_transform(cfg.input_size, stain)
    train_set = oversample(train_set, parse_oversample(cfg.oversample))
    model = build_model(cfg.model, **cfg.model_kwargs()).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    dtype = autocast_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if initial is not None:
        init_weights(model, initial, str(cfg.init))
    start, best, best_epoch, best_scores = resume_state(cfg, model, optimizer, out, device)
    averaged = weight_average(cfg, model, out, start, device)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    logger.info("%s: %d parameters, %d train images (%d samples an epoch) / %d val images, device %s",
                cfg.model, count_parameters(model), train_images, len(train_set), len(val_set), device)
    if cfg.freeze_bn or cfg.hed or stain:
        logger.info("BatchNorm %s, HED stain jitter %s, stain normalisation %s",
                    "frozen" if cfg.freeze_bn else "training", f"σ {cfg.hed:g}" if cfg.hed else "off",
                    f"Reinhard to CIELAB mean {stain.mean} sd {stain.std}" if stain else "off")
    augment = Augment(cfg.input_size, augment_config(cfg), generator=torch.Generator())
    val_names = [f"{s.source}/{s.name}" for s in val_set]
    open_log(out / "log.csv", start)
    loss_fn = DiceCELoss(dice_pooling=cfg.dice_pooling)
    steps = math.ceil(len(train_set) / cfg.batch_size)
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        lr = cfg.lr * lr_factor(epoch, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Seeded per epoch, so that a resumed run sees the batches an uninterrupted one would have.
        augment.rng.manual_seed(cfg.seed * 100_003 + epoch)
        batches = make_batches(train_set, augment, cfg.batch_size, random.Random(f"{cfg.seed}:{epoch}"),
                               stain)
        with tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False) as bar:
            loss = train_epoch(model, batches, loss_fn, optimizer, scaler, device, dtype, bar, cfg.freeze_bn)
        scores = validate(model, val_set, transform, device)
        improved = scores["mean"] > best
        if improved:
            best, best_epoch, best_scores = scores["mean"], epoch, scores
            save_checkpoint(out / "best.pt", model, optimizer, epoch, best, cfg, val_names, scores)
        save_checkpoint(out / "last.pt", model, optimizer, epoch, best, cfg, val_names, scores)
        log_epoch(out / "log.csv", epoch, lr, loss, scores, improved, time.perf_counter() - t0)
        if averaged is not None and epoch + 1 >= cfg.average_from:
            averaged.update_parameters(model)
            count = int(averaged.n_averaged)
            average_scores = validate(averaged.module, val_set, transform, device)
            save_checkpoint(out / "average.pt", averaged.module, optimizer, epoch, average_scores["mean"],
                            cfg, val_names, average_scores, averaged_epochs=count)
            log_average(out / "average.csv", epoch, count, average_scores)
    return {"best_epoch": best_epoch + 1, "best_mean_dice": best, "best_scores": best_scores,
            "epochs_run": max(0, cfg.epochs - start), "out": str(out)}


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="wbc-train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", nargs="+", default=[], help="dataset folders, each with images/ and masks/")
    p.add_argument("--mask-map", default=None, help="mask values → classes: 'grey:0,128,255' "
                   "(default), 'color:R,G,B=2;R,G,B=1;R,G,B=0[~TOL]' or JSON")
    p.add_argument("--synthetic", action="store_true",
                   help=f"train on generated data (smoke test); unless given, --epochs {SYNTHETIC_EPOCHS} "
                        f"and --lr {SYNTHETIC_LR:g}")
    p.add_argument("--model", default=defaults.model)
    for name in ("base_channels", "depth", "input_size", "batch_size", "warmup_epochs",
                 "split_seed", "seed", "threads"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("weight_decay", "min_lr_ratio", "val_fraction"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    # SUPPRESS: absent unless given, so that --synthetic can pick its own defaults.
    p.add_argument("--epochs", type=int, default=argparse.SUPPRESS,
                   help=f"{defaults.epochs}, or {SYNTHETIC_EPOCHS} with --synthetic")
    p.add_argument("--lr", type=float, default=argparse.SUPPRESS,
                   help=f"peak learning rate: {defaults.lr:g}, or {SYNTHETIC_LR:g} with --synthetic")
    p.add_argument("--oversample", nargs="*", default=[], metavar="SOURCE=K",
                   help="repeat the training images of a source (a dataset folder's name) K times per epoch")
    p.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default=defaults.amp,
                   help="mixed precision: auto = fp16 on CUDA, off on CPU")
    p.add_argument("--out", default=defaults.out, help="run folder for checkpoints and log")
    p.add_argument("--resume", default=None, help="checkpoint (last.pt) to continue from")
    p.add_argument("--init", default=None,
                   help="checkpoint whose weights start this run (fine-tuning with a fresh optimizer "
                        "and schedule, e.g. at a larger --input-size)")
    p.add_argument("--hed", type=float, default=defaults.hed,
                   help="HED stain jitter σ (Tellez et al.): gain U(1−σ, 1+σ) and optical-density shift "
                        "U(−σ, σ) per stain; 0 = off, 0.05 = light")
    p.add_argument("--window-scale", action="store_true",
                   help="scale augmentation as the service's per-cell windows: each crop becomes a square "
                        f"window around its cell, the cell {WINDOW_FRACTION[0]:g}-{WINDOW_FRACTION[1]:g} of "
                        "the side (replaces the random crop and zoom-out)")
    p.add_argument("--stain-norm", action="store_true",
                   help="Reinhard stain normalisation of every network input to the training images' "
                        "CIELAB statistics (recorded in the checkpoint and model.json; the service applies "
                        "it too)")
    p.add_argument("--freeze-bn", action="store_true",
                   help="keep BatchNorm in eval mode (running statistics fixed, affine parameters train); "
                        "needed to fine-tune a checkpoint rebuilt by model_training.from_onnx")
    p.add_argument("--average-from", type=int, default=defaults.average_from, metavar="EPOCH",
                   help="from this epoch (counted from 1) on, also keep the running mean of the weights "
                        "after each epoch (stochastic weight averaging): average.pt and average.csv; "
                        "0 = off. Pair it with a flat rate (--min-lr-ratio 1)")
    p.add_argument("--blur-max", type=float, default=defaults.blur_max,
                   help="largest Gaussian blur σ of the augmentation, in pixels at --input-size (a quarter "
                        "of the images are blurred, σ drawn from 0.3 up to this); 0 = no blur")
    p.add_argument("--noise-std", type=float, default=defaults.noise_std,
                   help="largest σ of the augmentation's per-pixel Gaussian noise, intensities in [0, 1] "
                        "(0.06 is about 15 grey levels); 0 = no noise")
    p.add_argument("--dice-pooling", choices=DICE_POOLING, default=defaults.dice_pooling,
                   help="the loss's soft Dice: 'batch' pools each class over the batch (large cells weigh "
                        "most); 'image' averages each image's Dice, as the evaluation does")
    args = vars(p.parse_args(argv))
    for name in ("blur_max", "noise_std"):
        if args[name] < 0:
            p.error(f"--{name.replace('_', '-')} must be 0 (off) or more, not {args[name]:g}")
    args.setdefault("epochs", SYNTHETIC_EPOCHS if args["synthetic"] else defaults.epochs)
    args.setdefault("lr", SYNTHETIC_LR if args["synthetic"] else defaults.lr)
    return TrainConfig(**args)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = train(parse_args(argv))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
