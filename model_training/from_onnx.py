"""Rebuild a `wbc-train` checkpoint from an exported `model.onnx` + `model.json`.

The export folds every BatchNorm into the convolution before it: the ONNX graph holds, for each such
convolution, a weight `W' = W · γ/√(σ² + ε)` under the convolution's own name (`stem.0.weight`) and a
bias `b' = β + (b − μ) · γ/√(σ² + ε)` named after it (`stem.0.weight_bias`; left out where it is all
zeros, as for a BatchNorm at its initial state). The batch statistics are gone, so they cannot be
restored; instead each folded convolution gets `W'`, and the BatchNorm after it becomes an exact
identity in eval mode that carries the folded bias:

    weight 1, bias b' (or 0 where the convolution has a bias of its own, which then holds b'),
    running_mean 0, running_var 1 − ε  (so that √(running_var + ε) = 1).

In eval mode the rebuilt model computes what the ONNX graph computes (checked by `parity`). In
train mode its BatchNorms would normalise by batch statistics and compute something else: fine-tune
it with `wbc-train --init … --freeze-bn`, or give it statistics again with `--batch-statistics`.

`--batch-statistics` passes the run's training images (its recorded data folders and split,
oversampled as it trained, prepared as validation prepares them) through the rebuilt model and gives
each BatchNorm the mean μ and variance σ² of its input, changing its affine parameters so that the
eval-mode function stays the same (`reestimate_batchnorm`: γ' = γ·√(σ²+ε)/√(v+ε), β' = β + (μ − m)·γ/√(v+ε)
for the previous running mean m and variance v). Batches of training images then normalise much as
the running statistics do, so the checkpoint fine-tunes in train mode, as the original run did.

An ensemble's export (`model_training.ensemble`) holds its members side by side; `--member K`
rebuilds member K's checkpoint (the parity check covers the whole graph first).

Usage: `python -m model_training.from_onnx weights/model.onnx runs/shipped/best.pt`
(the metadata is read from beside the ONNX file, `<stem>.json` else `model.json`, as the service
reads it, unless `--metadata` names it);
`python -m model_training.from_onnx weights/model.onnx runs/member1.pt --member 1 --batch-statistics`.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from app.engine.contract import metadata_path as metadata_beside
from model_training import CLASS_NAMES
from model_training.data import oversample, parse_oversample
from model_training.ensemble import build_network
from model_training.export import PARITY_TOLERANCE, check_parity
from model_training.models import count_parameters
from model_training.train import TrainConfig, load_data
from model_training.transforms import input_transform, stain_of

logger = logging.getLogger(__name__)

CONV_OPS = ("Conv", "ConvTranspose")


class RebuildError(ValueError):
    """The ONNX graph does not fit the architecture of its metadata."""


def _following_batchnorms(model: nn.Module) -> dict[str, str]:
    """`{convolution name: name of the BatchNorm right after it}` within each `nn.Sequential`."""
    pairs: dict[str, str] = {}
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (name, child), (next_name, following) in itertools.pairwise(children):
            if isinstance(child, nn.modules.conv._ConvNd) and isinstance(
                    following, nn.modules.batchnorm._BatchNorm):
                prefix = f"{parent_name}." if parent_name else ""
                pairs[prefix + name] = prefix + next_name
    return pairs


def _set_identity_batchnorm(bn: nn.modules.batchnorm._BatchNorm, bias: torch.Tensor) -> None:
    """Make `bn` compute `x + bias` in eval mode."""
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.fill_(1.0)
        if bn.bias is not None:
            bn.bias.copy_(bias)
        elif bool(bias.abs().max() > 0):
            raise RebuildError("a BatchNorm without affine parameters cannot carry a folded bias")
        assert bn.running_mean is not None and bn.running_var is not None
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.zero_()


def load_folded_weights(model: nn.Module, onnx_path: Path | str) -> dict[str, int]:
    """Copy every convolution's weights out of the ONNX graph into `model` and turn the BatchNorms
    that were folded into them into identities (see the module docstring).

    Returns:
        Counts: `{"convolutions", "folded", "batchnorms"}`.

    Raises:
        RebuildError: when a convolution or BatchNorm of the model is not in the graph, a shape differs,
            or the graph holds a convolution the model lacks.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    unfolded = [n.name for n in graph.node if n.op_type == "BatchNormalization"]
    if unfolded:
        raise RebuildError(f"{onnx_path} holds {len(unfolded)} BatchNormalization nodes: only exports "
                           "that folded them into the convolutions are supported")
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    modules = dict(model.named_modules())
    following = _following_batchnorms(model)
    done_convs: set[str] = set()
    done_bns: set[str] = set()
    folded = 0

    def tensor(name: str, like: torch.Tensor) -> torch.Tensor:
        if name not in init:
            raise RebuildError(f"{name} is not an initializer of {onnx_path}")
        value = torch.from_numpy(np.array(init[name], dtype=np.float32))
        if value.shape != like.shape:
            raise RebuildError(f"{name}: shape {tuple(value.shape)} in the graph, {tuple(like.shape)} "
                               "in the model")
        return value

    for node in graph.node:
        if node.op_type not in CONV_OPS:
            continue
        weight_name = node.input[1]
        if not weight_name.endswith(".weight"):
            raise RebuildError(f"{node.name}: weight {weight_name!r} does not name a module")
        conv_name = weight_name[: -len(".weight")]
        conv = modules.get(conv_name)
        if not isinstance(conv, nn.modules.conv._ConvNd):
            raise RebuildError(f"{node.name}: {conv_name!r} is not a convolution of the model")
        with torch.no_grad():
            conv.weight.copy_(tensor(weight_name, conv.weight))
        bias_name = node.input[2] if len(node.input) > 2 else ""
        bn_name = following.get(conv_name)
        if bn_name is None:
            # Not followed by a BatchNorm: the graph holds the convolution as it was.
            if (conv.bias is None) != (not bias_name):
                raise RebuildError(f"{conv_name}: bias {bias_name!r} in the graph, model bias "
                                   f"{'absent' if conv.bias is None else 'present'}")
            if conv.bias is not None:
                with torch.no_grad():
                    conv.bias.copy_(tensor(bias_name, conv.bias))
        else:
            bn = modules[bn_name]
            assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
            # A folded bias of zeros (BatchNorm at its initial state) is left out of the graph.
            bias = (tensor(bias_name, torch.empty(conv.out_channels)) if bias_name
                    else torch.zeros(conv.out_channels))
            if conv.bias is not None:   # the convolution keeps the folded bias, the BatchNorm adds 0
                with torch.no_grad():
                    conv.bias.copy_(bias)
                bias = torch.zeros_like(bias)
            _set_identity_batchnorm(bn, bias)
            done_bns.add(bn_name)
            folded += 1
        done_convs.add(conv_name)

    convs = {n for n, m in modules.items() if isinstance(m, nn.modules.conv._ConvNd)}
    bns = {n for n, m in modules.items() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    if convs - done_convs:
        raise RebuildError(f"convolutions not in the graph: {sorted(convs - done_convs)}")
    if bns - done_bns:
        raise RebuildError(f"BatchNorms not folded into a convolution of the graph: {sorted(bns - done_bns)}")
    return {"convolutions": len(done_convs), "folded": folded, "batchnorms": len(done_bns)}


def train_config_from_metadata(meta: dict[str, Any], member: int | None = None) -> TrainConfig:
    """The `TrainConfig` recorded in `model.json`'s `training` (keys `TrainConfig` does not know, such
    as `best_epoch` or `val_names`, left out); for an ensemble, that of its member `member`: the
    settings the members share with the member's own over them.

    Raises:
        RebuildError: for an ensemble without `member` (or with one it lacks), a `member` of a single
            network, or an architecture that differs from `training.model`.
    """
    training = dict(meta.get("training") or {})
    members = training.pop("ensemble", None)
    known = {f.name for f in fields(TrainConfig)}
    if members is not None:
        if member is None:
            raise RebuildError(f"model.json: an ensemble of {len(members)} networks; rebuild one of them "
                               "(--member K)")
        if not 0 <= member < len(members):
            raise RebuildError(f"model.json: the ensemble has members 0 to {len(members) - 1}, not {member}")
        own = {k: v for k, v in members[member].items() if k in known and v is not None}
        return TrainConfig(**{**{k: v for k, v in training.items() if k in known}, **own})
    if member is not None:
        raise RebuildError(f"model.json: {meta.get('architecture')!r} is one network, not an ensemble")
    cfg = TrainConfig(**{k: v for k, v in training.items() if k in known})
    if meta.get("architecture") and meta["architecture"] != cfg.model:
        raise RebuildError(f"model.json: architecture {meta['architecture']!r} but training.model "
                           f"{cfg.model!r}")
    return cfg


def recorded_scores(meta: dict[str, Any]) -> dict[str, float]:
    """Validation Dice per region (and their mean) as `wbc-train` keeps them in `scores`, from the
    evaluation recorded in `model.json`; `{}` when there is none."""
    overall = (meta.get("evaluation") or {}).get("overall") or {}
    try:
        scores = {region: float(overall[region]["dice"]["mean"])
                  for region in ("nucleus", "cytoplasm", "cell")}
    except (KeyError, TypeError):
        return {}
    scores["mean"] = float(np.mean(list(scores.values())))
    return scores


def read_metadata(onnx_path: Path | str, metadata_path: Path | str | None = None) -> dict[str, Any]:
    """The metadata of an export: `metadata_path`, or the file the service would read beside the ONNX
    file (`<stem>.json`, else `model.json`)."""
    path = Path(metadata_path) if metadata_path else metadata_beside(Path(onnx_path))
    return dict(json.loads(path.read_text()))


def rebuild_graph(onnx_path: Path | str, meta: dict[str, Any]) -> nn.Module:
    """The whole network of an exported ONNX file (one network or an ensemble), in eval mode.

    Raises:
        RebuildError: when the graph does not fit the architecture `meta` records.
    """
    training = meta.get("training") or {}
    if "ensemble" in training:
        model = build_network(training)
    else:
        cfg = train_config_from_metadata(meta)
        model = build_network(asdict(cfg))
    counts = load_folded_weights(model, onnx_path)
    logger.info("rebuilt %s from %s: %d convolutions, %d BatchNorms folded", meta.get("architecture"),
                onnx_path, counts["convolutions"], counts["folded"])
    if "parameters" in meta and int(meta["parameters"]) != count_parameters(model):
        raise RebuildError(f"model.json records {meta['parameters']} parameters, the rebuilt model has "
                           f"{count_parameters(model)}")
    return model.eval()


def checkpoint_of(graph: nn.Module, meta: dict[str, Any],
                  member: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The network (`graph`, or its member `member` for an ensemble) and a checkpoint dict for it with
    the keys `train.save_checkpoint` writes.

    The epoch is the recorded best epoch (`best_epoch`, counted from 1 there, from 0 in a checkpoint),
    `best` the recorded `val_mean_dice`, the optimizer state that of a fresh Adam (as a fine-tuning run
    with `--init` starts anyway). A member's `scores` are empty: the evaluation recorded in `model.json`
    is the ensemble's.
    """
    cfg = train_config_from_metadata(meta, member)
    training = meta.get("training") or {}
    if member is None:
        model, recorded, scores = graph, training, recorded_scores(meta)
    else:
        assert isinstance(graph.members, nn.ModuleList)
        model, recorded, scores = graph.members[member], training["ensemble"][member], {}
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "epoch": int(recorded.get("best_epoch") or 1) - 1,
             "best": float(recorded.get("val_mean_dice") or -1.0), "config": asdict(cfg),
             "val_names": list(training.get("val_names", [])), "scores": scores,
             "classes": list(meta.get("classes") or CLASS_NAMES), "parameters": count_parameters(model)}
    return model, state


def rebuild(onnx_path: Path | str, metadata_path: Path | str | None = None,
            member: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of an exported ONNX file (or member `member` of an ensemble's), in eval mode,
    and its checkpoint dict (`checkpoint_of`)."""
    meta = read_metadata(onnx_path, metadata_path)
    train_config_from_metadata(meta, member)    # refuse a wrong `member` before reading the graph
    return checkpoint_of(rebuild_graph(onnx_path, meta), meta, member)


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, inputs: Iterable[np.ndarray | torch.Tensor],
                         batch_size: int = 8) -> int:
    """Give every BatchNorm of `model` the mean and variance of its input over `inputs` (`(3, h, w)`
    network inputs) as running statistics, and change its affine parameters so that the model computes
    in eval mode what it computed before (see the module docstring). Returns how many BatchNorms.

    Raises:
        ValueError: when `inputs` is empty.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    sums: dict[int, torch.Tensor] = {}
    squares: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def record(index: int) -> Any:
        def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().double().transpose(0, 1).flatten(1)     # (C, N·H·W)
            sums[index] = sums.get(index, 0) + x.sum(1)
            squares[index] = squares.get(index, 0) + (x * x).sum(1)
            counts[index] = counts.get(index, 0) + x.shape[1]
        return hook

    handles = [bn.register_forward_pre_hook(record(i)) for i, bn in enumerate(bns)]
    was_training = model.training
    model.eval()
    try:
        batch: list[torch.Tensor] = []
        for item in inputs:
            batch.append(torch.as_tensor(item, dtype=torch.float32))
            if len(batch) == batch_size:
                model(torch.stack(batch))
                batch = []
        if batch:
            model(torch.stack(batch))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if bns and not counts:
        raise ValueError("no inputs to estimate BatchNorm statistics from")
    for i, bn in enumerate(bns):
        assert bn.running_mean is not None and bn.running_var is not None
        mean = sums[i] / counts[i]
        var = (squares[i] / counts[i] - mean * mean).clamp_min(0)
        if bn.weight is None or bn.bias is None:
            raise RebuildError("a BatchNorm without affine parameters cannot keep its function with new "
                               "statistics")
        old_scale = torch.sqrt(bn.running_var.double() + bn.eps)
        new_scale = torch.sqrt(var + bn.eps)
        gamma = bn.weight.double()
        bn.bias.copy_(bn.bias.double() + (mean - bn.running_mean.double()) * gamma / old_scale)
        bn.weight.copy_(gamma * new_scale / old_scale)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    return len(bns)


def training_inputs(cfg: TrainConfig) -> list[np.ndarray]:
    """The network inputs of a run's training images: its split, oversampled as it trained, prepared at
    its input size with its stain normalisation, without augmentation."""
    train_set, _ = load_data(cfg)
    transform = input_transform(cfg.input_size, stain_of(asdict(cfg)))
    return [transform(s.image) for s in oversample(train_set, parse_oversample(cfg.oversample))]


def train_mode_gap(model: nn.Module, inputs: Sequence[np.ndarray], batch_size: int = 8) -> float:
    """Mean |train-mode − eval-mode| logit over the first batch of `inputs` (how far batch statistics
    take the model from what it computes in eval mode); the model's BatchNorm statistics are kept."""
    probe = copy.deepcopy(model)
    x = torch.stack([torch.as_tensor(a) for a in inputs[:batch_size]])
    with torch.no_grad():
        reference = probe.eval()(x)
        return float((probe.train()(x) - reference).abs().mean())


def parity(model: nn.Module, onnx_path: Path | str, input_size: int, seed: int = 0,
           tolerance: float = PARITY_TOLERANCE) -> float:
    """Largest |onnxruntime − PyTorch| logit over random inputs at the model size and an odd size (the
    export's own check, `export.check_parity`).

    Raises:
        ParityError: when it exceeds `tolerance`.
    """
    rng = np.random.default_rng(seed)
    inputs = [rng.standard_normal((2, 3, input_size, input_size), dtype=np.float32),
              rng.standard_normal((1, 3, 117, 101), dtype=np.float32)]
    return check_parity(model.eval(), onnx_path, inputs, tolerance)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_training.from_onnx", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("onnx", help="model.onnx written by wbc-export")
    p.add_argument("checkpoint", help="where to write the rebuilt checkpoint (e.g. runs/shipped/best.pt)")
    p.add_argument("--metadata", default=None,
                   help="the metadata (default: <stem>.json, else model.json, beside the ONNX file)")
    p.add_argument("--member", type=int, default=None, help="for an ensemble's export: the member to rebuild")
    p.add_argument("--batch-statistics", action="store_true",
                   help="re-estimate the BatchNorm statistics from the run's training images, so that the "
                        "checkpoint fine-tunes in train mode")
    p.add_argument("--data", nargs="+", default=None,
                   help="the dataset folders, where they are no longer where model.json records them")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--tolerance", type=float, default=PARITY_TOLERANCE)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = read_metadata(args.onnx, args.metadata)
    cfg = train_config_from_metadata(meta, args.member)   # refuses a wrong --member before the graph is read
    graph = rebuild_graph(args.onnx, meta)
    worst = parity(graph, args.onnx, cfg.input_size, tolerance=args.tolerance)
    model, state = checkpoint_of(graph, meta, args.member)
    note = ""
    if args.batch_statistics:
        if args.data:
            cfg.data = list(args.data)
        inputs = training_inputs(cfg)
        gap_before = train_mode_gap(model, inputs)
        count = reestimate_batchnorm(model, inputs)
        # `model` is `graph` or one of its members, changed in place: the graph must still be the ONNX file.
        after = parity(graph, args.onnx, cfg.input_size, tolerance=args.tolerance)
        state["model"] = model.state_dict()
        note = (f"; {count} BatchNorms re-estimated over {len(inputs)} training inputs (parity after "
                f"{after:.3g}; mean train-mode gap {gap_before:.3g} -> {train_mode_gap(model, inputs):.3g})")
    out = Path(args.checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(out)
    print(f"wrote {out}: {state['config']['model']} ({state['parameters']} parameters), epoch "
          f"{state['epoch'] + 1}, {len(state['val_names'])} val names, parity max abs diff {worst:.3g}{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
