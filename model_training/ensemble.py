"""Ensembles: several trained networks as one model, the mean of their logits (as nnU-Net averages the
networks of its folds).

`python -m model_training.ensemble a.pt b.pt --out ensemble.pt` writes a checkpoint that
`wbc-evaluate`, `wbc-export` and `wbc-quantize` take like any other. Its export is one ONNX graph with
the members side by side, so the engine runs an ensemble exactly as it runs one network: one session,
one batch of windows, one `model.json` (whose `training.ensemble` lists the members).

The members must be interchangeable at the input: the same input size, the same stain normalisation
and reference, the same classes and the same validation split (otherwise the recorded validation
scores would mix images some member trained on).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.engine.contract import sha256_file
from model_training.models import build_model, count_parameters

#: Training settings every member must share: what the input looks like and which images are validation.
SHARED = ("input_size", "stain_norm", "val_fraction", "split_seed", "mask_map", "synthetic")
#: What `training.ensemble` of model.json keeps of each member's training run: every setting that shapes
#: the trained network.
MEMBER_KEYS = ("model", "base_channels", "depth", "input_size", "epochs", "batch_size", "lr", "weight_decay",
               "warmup_epochs", "min_lr_ratio", "amp", "oversample", "seed", "init", "out", "stain_norm",
               "hed", "window_scale", "freeze_bn", "average_from", "dice_pooling", "blur_max", "noise_std")
#: Training settings not kept per member: the split and masks all members share (`SHARED`), the model's
#: own stain reference, and what does not shape the network (where the data lay, CPU threads, a resumed run).
NOT_PER_MEMBER = (*(k for k in SHARED if k not in MEMBER_KEYS), "stain_reference", "data", "threads",
                  "resume")


class Ensemble(nn.Module):
    """The mean of its members' logits; every member sees the same input."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.members[0](x)
        for member in self.members[1:]:
            logits = logits + member(x)
        return logits / len(self.members)


def build_network(cfg: dict[str, Any]) -> nn.Module:
    """The untrained network a training config describes: one architecture of `build_model`, or, for an
    ensemble's config (`cfg["ensemble"]`), the `Ensemble` of its members'."""
    if "ensemble" in cfg:
        return Ensemble([build_network(member) for member in cfg["ensemble"]])
    return build_model(cfg["model"], base_channels=cfg["base_channels"], depth=cfg["depth"])


def _same_reference(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.get("method") == b.get("method") and all(
        math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)
        for key in ("mean", "std") for x, y in zip(a[key], b[key], strict=True))


def check_members(states: Sequence[dict[str, Any]], paths: Sequence[str]) -> None:
    """Refuse members that would not see the same input or were validated on different images.

    Raises:
        ValueError: naming the member and the setting that differs.
    """
    for state, path in zip(states, paths, strict=True):
        if "ensemble" in state["config"]:
            raise ValueError(f"{path}: is an ensemble already; give its members instead")
    first, first_path = states[0], paths[0]
    for state, path in zip(states[1:], paths[1:], strict=True):
        for key in SHARED:
            if state["config"].get(key) != first["config"].get(key):
                raise ValueError(f"{path}: {key} {state['config'].get(key)!r} differs from "
                                 f"{first_path}'s {first['config'].get(key)!r}")
        reference = state["config"].get("stain_reference")
        if not _same_reference(reference, first["config"].get("stain_reference")):
            raise ValueError(f"{path}: its stain reference differs from {first_path}'s")
        if list(state.get("classes", [])) != list(first.get("classes", [])):
            raise ValueError(f"{path}: classes {state.get('classes')} differ from {first.get('classes')}")
        if sorted(state.get("val_names") or []) != sorted(first.get("val_names") or []):
            raise ValueError(f"{path}: validated on other images than {first_path}")


def combine(paths: Sequence[str]) -> dict[str, Any]:
    """The checkpoint of the ensemble of the `wbc-train` checkpoints at `paths` (at least two).

    Its `config` is the first member's with `model` "ensemble" and `ensemble`, one entry per member
    (its architecture and training settings, best epoch, validation score and checkpoint sha256);
    `epoch` is -1, as no epoch of one run describes it.

    Raises:
        ValueError: for fewer than two members or members that do not fit together (`check_members`).
    """
    if len(paths) < 2:
        raise ValueError("an ensemble needs at least two checkpoints")
    states = [torch.load(path, map_location="cpu", weights_only=False) for path in paths]
    check_members(states, paths)
    members = []
    for state in states:
        member = build_network(state["config"])
        member.load_state_dict(state["model"])
        members.append(member)
    model = Ensemble(members).eval()
    summaries = [{**{k: state["config"].get(k) for k in MEMBER_KEYS}, "best_epoch": int(state["epoch"]) + 1,
                  "val_mean_dice": float(state["best"]), "checkpoint_sha256": sha256_file(Path(path))}
                 for state, path in zip(states, paths, strict=True)]
    config = {**states[0]["config"], "model": "ensemble", "ensemble": summaries}
    return {"model": model.state_dict(), "epoch": -1, "best": -1.0, "config": config,
            "val_names": list(states[0].get("val_names") or []), "scores": {},
            "classes": list(states[0].get("classes", [])), "parameters": count_parameters(model)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_training.ensemble", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="two or more wbc-train checkpoints (best.pt, last.pt, ...)")
    p.add_argument("--out", required=True, help="where to write the ensemble's checkpoint")
    args = p.parse_args(argv)
    state = combine(args.checkpoints)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    print(f"wrote {out}: {len(args.checkpoints)} members, {state['parameters']} parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
