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
it with `wbc-train --init … --freeze-bn`.

Usage: `python -m model_training.from_onnx weights/model.onnx runs/shipped/best.pt`
(`model.json` is read from beside the ONNX file unless `--metadata` names it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model_training import CLASS_NAMES
from model_training.export import PARITY_TOLERANCE, check_parity
from model_training.models import build_model, count_parameters
from model_training.train import TrainConfig

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


def train_config_from_metadata(meta: dict[str, Any]) -> TrainConfig:
    """The `TrainConfig` recorded in `model.json`'s `training` (keys `TrainConfig` does not know, such
    as `best_epoch` or `val_names`, left out)."""
    training = dict(meta.get("training") or {})
    if "ensemble" in training:
        raise RebuildError("model.json: an ensemble's export is rebuilt from its members' checkpoints, "
                           "not from the ONNX file")
    known = {f.name for f in fields(TrainConfig)}
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


def rebuild(onnx_path: Path | str,
            metadata_path: Path | str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of an exported ONNX file, in eval mode, and a checkpoint dict for it with the
    keys `train.save_checkpoint` writes.

    The epoch is the recorded best epoch (`training.best_epoch`, counted from 1 there, from 0 in a
    checkpoint), `best` the recorded `val_mean_dice`, the optimizer state that of a fresh Adam (as a
    fine-tuning run with `--init` starts anyway).
    """
    onnx_path = Path(onnx_path)
    metadata_path = Path(metadata_path) if metadata_path else onnx_path.with_name("model.json")
    meta = json.loads(metadata_path.read_text())
    cfg = train_config_from_metadata(meta)
    model = build_model(cfg.model, **cfg.model_kwargs())
    counts = load_folded_weights(model, onnx_path)
    model.eval()
    training = meta.get("training") or {}
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "epoch": int(training.get("best_epoch", 1)) - 1,
             "best": float(training.get("val_mean_dice", -1.0)), "config": asdict(cfg),
             "val_names": list(training.get("val_names", [])), "scores": recorded_scores(meta),
             "classes": list(meta.get("classes") or CLASS_NAMES), "parameters": count_parameters(model)}
    if "parameters" in meta and int(meta["parameters"]) != state["parameters"]:
        raise RebuildError(f"model.json records {meta['parameters']} parameters, the rebuilt model has "
                           f"{state['parameters']}")
    logger.info("rebuilt %s from %s: %d convolutions, %d BatchNorms folded", cfg.model, onnx_path,
                counts["convolutions"], counts["folded"])
    return model, state


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
    p.add_argument("--metadata", default=None, help="model.json (default: beside the ONNX file)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the parity check")
    p.add_argument("--tolerance", type=float, default=PARITY_TOLERANCE)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, state = rebuild(args.onnx, args.metadata)
    worst = parity(model, args.onnx, int(state["config"]["input_size"]), tolerance=args.tolerance)
    out = Path(args.checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(out)
    print(f"wrote {out}: {state['config']['model']} ({state['parameters']} parameters), epoch "
          f"{state['epoch'] + 1}, {len(state['val_names'])} val names, parity max abs diff {worst:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
