"""Paired difference of two models' Dice over the same images, from one `wbc-evaluate` report.

    .venv/bin/python benchmarks/paired_gain.py runs/eval/report.json CANDIDATE BASELINE

For nucleus, cytoplasm, cell and the per-image mean of the three: the candidate's mean minus the
baseline's, its standard error over images (sd of the per-image differences / √n), and how many images
got better or worse. This is the test the model candidates in docs/cells.md were held to.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model_training.metrics import REGIONS


def per_image_dice(entry: dict[str, Any]) -> dict[tuple[str, str], dict[str, float]]:
    """`{(source, name): {region: Dice, "mean": mean of the three}}` of one report entry."""
    rows = {}
    for row in entry["per_image"]:
        dice = {region: float(row["scores"][region]["dice"]) for region in REGIONS}
        dice["mean"] = sum(dice.values()) / len(REGIONS)
        rows[(row["source"], row["name"])] = dice
    return rows


def paired(report: dict[str, Any], candidate: str, baseline: str) -> dict[str, dict[str, float]]:
    """`{region or "mean": {"candidate", "baseline", "gain", "se", "better", "worse", "n"}}`, Dice in
    points (×100), over the images both entries scored.

    Raises:
        KeyError: when a label is not in the report.
    """
    entries = {e["label"]: e for e in report["models"]}
    for label in (candidate, baseline):
        if label not in entries:
            raise KeyError(f"{label!r} is not in the report (it has {sorted(entries)})")
    a, b = per_image_dice(entries[candidate]), per_image_dice(entries[baseline])
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        raise ValueError("fewer than two images scored by both")
    out = {}
    for key in (*REGIONS, "mean"):
        diffs = [100 * (a[i][key] - b[i][key]) for i in common]
        n = len(diffs)
        gain = sum(diffs) / n
        sd = math.sqrt(sum((d - gain) ** 2 for d in diffs) / (n - 1))
        out[key] = {"candidate": 100 * sum(a[i][key] for i in common) / n,
                    "baseline": 100 * sum(b[i][key] for i in common) / n,
                    "gain": gain, "se": sd / math.sqrt(n), "n": n,
                    "better": sum(d > 0 for d in diffs), "worse": sum(d < 0 for d in diffs)}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", help="report.json written by wbc-evaluate with both models")
    p.add_argument("candidate", help="the candidate's label")
    p.add_argument("baseline", help="the baseline's label")
    args = p.parse_args(argv)
    result = paired(json.loads(Path(args.report).read_text()), args.candidate, args.baseline)
    print(f"{args.candidate} minus {args.baseline}, Dice points, {result['mean']['n']} images")
    print(f"{'':10} {'candidate':>9} {'baseline':>9} {'gain':>7} {'se':>6} {'gain/se':>7} better/worse")
    for key, r in result.items():
        ratio = r["gain"] / r["se"] if r["se"] > 0 else float("inf")
        print(f"{key:10} {r['candidate']:9.2f} {r['baseline']:9.2f} {r['gain']:+7.3f} {r['se']:6.3f} "
              f"{ratio:7.2f} {r['better']}/{r['worse']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
