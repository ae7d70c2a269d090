"""The leave-one-source-out table from `benchmarks/loso_study.sh`'s reports: Dice per region, cross-source
and in-source, mean ± sd over seeds, each recipe against today's (a).

    .venv/bin/python benchmarks/loso_table.py runs/loso
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

RECIPES = {"a": "today's", "b": "HED σ 0.2", "c": "Reinhard", "d": "HED σ 0.2 + Reinhard",
           "e": "Reinhard + window scale"}
REGIONS = ("nucleus", "cytoplasm", "cell")
RUN = re.compile(rf"^(dataset[12])-([{''.join(RECIPES)}])(?:-(unet))?-s(\d+)-(cross|in)$")
MODELS = {"attention_unet": "attention U-Net", "unet": "plain U-Net"}


def other_source(source: str) -> str:
    """The Zheng source a run trained on `source` is scored on across sources."""
    return "dataset2" if source == "dataset1" else "dataset1"


def dice(report: Path) -> dict[str, float]:
    overall = json.loads(report.read_text())["models"][0]["overall"]
    return {region: 100 * overall[region]["dice"]["mean"] for region in REGIONS}


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    # (source, recipe, model, side) → seed → Dice per region
    scores: dict[tuple[str, str, str, str], dict[int, dict[str, float]]] = defaultdict(dict)
    for report in sorted(args.folder.glob("*/report.json")):
        match = RUN.match(report.parent.name)
        if match:
            source, recipe, model, seed, side = match.groups()
            scores[(source, recipe, model or "attention_unet", side)][int(seed)] = dice(report)
    print("| trained on → scored on | model | recipe | seeds | cross: nucleus / cytoplasm / cell | in: "
          "nucleus / cytoplasm / cell | cytoplasm vs a: cross / in |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for source, model, (recipe, label) in itertools.product(("dataset1", "dataset2"), MODELS,
                                                              RECIPES.items()):
        other = other_source(source)
        cross = scores.get((source, recipe, model, "cross"), {})
        within = scores.get((source, recipe, model, "in"), {})
        seeds = sorted(set(cross) & set(within))
        if not seeds:
            continue
        cells = [" / ".join(fmt([side[s][r] for s in seeds]) for r in REGIONS)
                 for side in (cross, within)]
        base_cross = scores.get((source, "a", model, "cross"), {})
        base_in = scores.get((source, "a", model, "in"), {})
        paired = [s for s in seeds if s in base_cross and s in base_in]
        delta = "—"
        if recipe != "a" and paired:
            d_cross = [cross[s]["cytoplasm"] - base_cross[s]["cytoplasm"] for s in paired]
            d_in = [within[s]["cytoplasm"] - base_in[s]["cytoplasm"] for s in paired]
            delta = f"{statistics.mean(d_cross):+.1f} / {statistics.mean(d_in):+.1f} (seeds {paired})"
        print(f"| {source} → {other} | {MODELS[model]} | {label} | {len(seeds)} | {cells[0]} | {cells[1]} "
              f"| {delta} |")

    attention_vs_plain(scores)


def welch_t(a: list[float], b: list[float]) -> float:
    """Welch's t of mean(a) − mean(b); nan below two values a side."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
    return (statistics.mean(a) - statistics.mean(b)) / se if se else float("nan")


def attention_vs_plain(scores: dict[tuple[str, str, str, str], dict[int, dict[str, float]]]) -> None:
    """Attention minus plain U-Net, each recipe both were trained with: Dice difference of the means over
    seeds and Welch's t, per region, cross-source and in-source."""
    rows = []
    for source, recipe, side in itertools.product(("dataset1", "dataset2"), RECIPES, ("cross", "in")):
        attention = scores.get((source, recipe, "attention_unet", side), {})
        plain = scores.get((source, recipe, "unet", side), {})
        if len(attention) < 2 or len(plain) < 2:
            continue
        cells = []
        for region in REGIONS:
            a = [attention[s][region] for s in sorted(attention)]
            b = [plain[s][region] for s in sorted(plain)]
            cells.append(f"{statistics.mean(a) - statistics.mean(b):+.1f} (t {welch_t(a, b):+.2f})")
        rows.append(f"| {source} | {RECIPES[recipe]} | {side} | {len(attention)} / {len(plain)} | "
                    + " | ".join(cells) + " |")
    if rows:
        print("\nAttention U-Net minus plain U-Net (Dice points, difference of the means over seeds, "
              "Welch's t):\n")
        print("| trained on | recipe | scored | seeds attention / plain | nucleus | cytoplasm | cell |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
