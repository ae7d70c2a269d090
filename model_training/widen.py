"""Widen a trained U-Net checkpoint: the same function with twice the channels (Net2WiderNet).

Chen, Goodfellow and Shlens (2016), "Net2Net": a wider network can start from a narrower trained one
and compute exactly what it computed, so that further training begins where the narrow run ended
instead of from random weights. Here every hidden channel `c` of a level of width `C` becomes the
two channels `c` and `c + C`:

- a convolution's (or transposed convolution's) output channel, its bias and the BatchNorm after it
  are copied to both;
- every weight that reads a copied channel is split between the two copies, `r·w` and `(1 − r)·w`,
  with `r` drawn uniformly from [0.25, 0.75] per weight, so the sum the next layer computes is
  unchanged. The copies then get different gradients and grow apart in training (with an even split
  they would stay identical for ever);
- the decoder's concatenation `[upsampled, skip]` is mapped part by part.

The CBAM spatial attention pools the channel mean and max, both unchanged by copying, and keeps its
weights; the RGB input and the class logits keep their width. Batch statistics of a copied channel
equal the original's, so the widened model matches in training mode too (checked by `check`).

Usage: `python -m model_training.widen runs/v2/reinhard-224/best.pt runs/wide/init.pt`, then
`wbc-train --init runs/wide/init.pt --base-channels 32 ...`.
"""

from __future__ import annotations

import argparse
import copy
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model_training.models import build_model, count_parameters

logger = logging.getLogger(__name__)

_DECODER_INPUT = re.compile(r"^decoder\.(\d+)\.conv\.0$")


def _channel_map(old: int, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of `new` channels: the old channel it copies and which copy it is (0 or 1)."""
    if new == old:
        return torch.arange(old), torch.zeros(old, dtype=torch.long)
    if new != 2 * old:
        raise ValueError(f"can only double a width, not {old} -> {new}")
    index = torch.arange(new)
    return index % old, index // old


def _input_map(name: str, old_in: int, new_in: int,
               old_model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The old input channel and copy number of each input channel of convolution `name`."""
    match = _DECODER_INPUT.match(name)
    if match is None or new_in == old_in:
        return _channel_map(old_in, new_in)
    block = old_model.decoder[int(match.group(1))]  # type: ignore[index]
    up = block.up.out_channels
    skip = old_in - up
    up_source, up_copy = _channel_map(up, 2 * up)
    skip_source, skip_copy = _channel_map(skip, 2 * skip)
    return torch.cat([up_source, skip_source + up]), torch.cat([up_copy, skip_copy])


def _widen_weight(weight: torch.Tensor, out_map: torch.Tensor, in_source: torch.Tensor,
                  in_copy: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`weight` as `(out, in, kh, kw)`: rows copied, columns copied and, where the input was widened,
    split between their copies."""
    wide = weight[out_map][:, in_source].clone()
    if len(in_source) != weight.shape[1]:
        share = torch.empty(wide.shape[0], weight.shape[1], *wide.shape[2:]).uniform_(
            0.25, 0.75, generator=generator)[:, in_source]
        wide *= torch.where(in_copy.view(1, -1, 1, 1) == 0, share, 1 - share)
    return wide


def widen_model(old: nn.Module, new: nn.Module, seed: int = 0) -> None:
    """Load into `new` (the same architecture at twice the base width) the function of `old`."""
    generator = torch.Generator().manual_seed(seed)
    new_modules = dict(new.named_modules())
    last_width: int | None = None  # output channels of the last convolution, for the BatchNorm after it
    with torch.no_grad():
        for name, module in old.named_modules():
            target = new_modules[name]
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                transposed = isinstance(module, nn.ConvTranspose2d)
                weight = module.weight.transpose(0, 1) if transposed else module.weight
                new_weight = target.weight.transpose(0, 1) if transposed else target.weight
                out_map, _ = _channel_map(weight.shape[0], new_weight.shape[0])
                in_source, in_copy = _input_map(name, weight.shape[1], new_weight.shape[1], old)
                new_weight.copy_(_widen_weight(weight, out_map, in_source, in_copy, generator))
                if module.bias is not None:
                    target.bias.copy_(module.bias[out_map])
                last_width = len(out_map)
            elif isinstance(module, nn.BatchNorm2d):
                out_map, _ = _channel_map(module.num_features, target.num_features)
                if last_width is not None and last_width != len(out_map):
                    raise ValueError(f"{name}: does not follow a convolution of its width")
                for attribute in ("weight", "bias", "running_mean", "running_var"):
                    getattr(target, attribute).copy_(getattr(module, attribute)[out_map])
                target.num_batches_tracked.copy_(module.num_batches_tracked)


def check(old: nn.Module, new: nn.Module, size: int = 64, seed: int = 0) -> float:
    """Largest absolute difference of the logits of `old` and `new` on random inputs, in eval mode
    and in training mode (batch statistics), on copies so the running statistics stay as they were."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    worst = 0.0
    for train in (False, True):
        a, b = copy.deepcopy(old).train(train), copy.deepcopy(new).train(train)
        with torch.no_grad():
            worst = max(worst, float((a(x) - b(x)).abs().max()))
    return worst


def widen_checkpoint(source: Path, target: Path, seed: int = 0) -> dict[str, Any]:
    """Write to `target` a `wbc-train` checkpoint of `source`'s model at twice its base width, for
    `wbc-train --init`. Returns the new checkpoint."""
    state = torch.load(source, map_location="cpu", weights_only=False)
    config = dict(state["config"])
    kwargs = {"base_channels": config["base_channels"], "depth": config["depth"]}
    old = build_model(config["model"], **kwargs)
    old.load_state_dict(state["model"])
    kwargs["base_channels"] *= 2
    new = build_model(config["model"], **kwargs)
    widen_model(old, new, seed)
    difference = check(old, new)
    logger.info("widened %s: %d -> %d parameters; largest logit difference %.2e",
                source, count_parameters(old), count_parameters(new), difference)
    config["base_channels"] = kwargs["base_channels"]
    config["widened_from"] = str(source)
    wide = {**state, "model": new.state_dict(), "config": config, "optimizer": None,
            "parameters": count_parameters(new)}
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(wide, target)
    return wide


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("source", type=Path, help="a wbc-train checkpoint (best.pt)")
    parser.add_argument("target", type=Path, help="where the widened checkpoint goes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weight splits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    widen_checkpoint(args.source, args.target, args.seed)


if __name__ == "__main__":
    main()
