"""The evaluation report: runs pooled over seeds, their differences, Markdown, a console table, a figure."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.engine.imaging import overlay
from model_training.metrics import METRICS, REGIONS, SURFACE_METRICS, SURFACE_TOLERANCES, surface_metrics_in

AVERAGE_SCORE_DEFINITION = ("mean of Dice, IoU, precision, recall and pixel accuracy over nucleus, cytoplasm "
                            "and cell (15 numbers) per image, then mean ± sd over images")
#: Statistics compared between groups: the average score, then every region × metric.
COMPARED: tuple[tuple[str, str], ...] = (("average", "score"),
                                         *((r, m) for r in REGIONS for m in METRICS))
#: Overlay colours (RGB) of cytoplasm and nucleus: away from the stains' pinks and purples.
METRIC_NAMES = {"dice": "Dice", "iou": "IoU", "precision": "precision", "recall": "recall",
                "accuracy": "accuracy",
                **{m: f"surface Dice {t} px"
                   for m, t in zip(SURFACE_METRICS, SURFACE_TOLERANCES, strict=True)}}
#: Largest number of runs per comparison for the exact permutation test (C(20, 10) = 184,756 splits).
MAX_PERMUTATION_RUNS = 20

Summary = dict[str, dict[str, dict[str, Any]]]


@dataclass
class Example:
    """One image of the figure: the image, its ground truth and each model's prediction."""

    key: str                                 # "source/name"
    image: np.ndarray                        # (H, W, 3) uint8
    truth: np.ndarray                        # (H, W) class indices
    predictions: dict[str, np.ndarray]       # label → (H, W) class indices


def _stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample sd (None for one value) and the values themselves."""
    arr = np.asarray(values, dtype=float)
    sd = float(arr.std(ddof=1)) if arr.size > 1 else None
    return {"mean": float(arr.mean()), "sd": sd, "values": [float(v) for v in arr]}


def _across(summaries: Sequence[Summary]) -> Summary:
    """Mean ± sd across runs of each run's mean (over images), for every statistic in `COMPARED`."""
    out: Summary = {}
    for region, metric in COMPARED:
        out.setdefault(region, {})[metric] = _stats([s[region][metric]["mean"] for s in summaries])
    return out


def group_runs(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pool the models of each `group` (runs over seeds): mean ± sd across runs, overall and per source.

    Returns:
        One `{"name", "labels", "runs", "overall", "per_source"}` per group, in order of appearance;
        `overall[region][metric]` is `{"mean", "sd", "values"}` with one value per run.
    """
    groups = []
    for name in dict.fromkeys(e["group"] for e in entries):
        runs = [e for e in entries if e["group"] == name]
        sources = sorted({src for e in runs for src in e["per_source"]})
        groups.append({"name": name, "labels": [e["label"] for e in runs], "runs": len(runs),
                       "overall": _across([e["overall"] for e in runs]),
                       "per_source": {src: _across([e["per_source"][src] for e in runs
                                                    if src in e["per_source"]]) for src in sources}})
    return groups


def permutation_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Exact two-sided permutation p-value of the difference of means of two small samples.

    With 3 runs against 3 the smallest possible value is 2/20 = 0.1. None when either side has fewer
    than 2 runs, or when there are too many runs to enumerate.
    """
    if len(a) < 2 or len(b) < 2 or len(a) + len(b) > MAX_PERMUTATION_RUNS:
        return None
    pooled = np.asarray([*a, *b], dtype=float)
    observed = abs(np.mean(a) - np.mean(b))
    hits = total = 0
    for idx in itertools.combinations(range(len(pooled)), len(a)):
        mask = np.zeros(len(pooled), bool)
        mask[list(idx)] = True
        hits += abs(pooled[mask].mean() - pooled[~mask].mean()) >= observed - 1e-12
        total += 1
    return hits / total


def compare_groups(groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pair of groups, on every statistic: difference of the run means and the seed noise around it.

    Returns:
        `{"a", "b", "region", "metric", "mean_a", "sd_a", "n_a", "mean_b", "sd_b", "n_b", "difference",
        "se", "t", "p_permutation", "separated"}` per pair and statistic. `se` is the standard error of the
        difference from the seed-to-seed sd of each group (Welch), `t = difference / se`, and `separated`
        says whether every run of one group beats every run of the other (both with 2 runs or more).
    """
    rows = []
    for ga, gb in itertools.combinations(groups, 2):
        for region, metric in COMPARED:
            a, b = ga["overall"][region][metric], gb["overall"][region][metric]
            va, vb = a["values"], b["values"]
            se = (math.sqrt(a["sd"] ** 2 / len(va) + b["sd"] ** 2 / len(vb))
                  if a["sd"] is not None and b["sd"] is not None else None)
            diff = a["mean"] - b["mean"]
            separated = len(va) > 1 and len(vb) > 1 and (min(va) > max(vb) or min(vb) > max(va))
            rows.append({"a": ga["name"], "b": gb["name"], "region": region, "metric": metric,
                         "mean_a": a["mean"], "sd_a": a["sd"], "n_a": len(va),
                         "mean_b": b["mean"], "sd_b": b["sd"], "n_b": len(vb), "difference": diff,
                         "se": se, "t": diff / se if se else None, "p_permutation": permutation_p(va, vb),
                         "separated": separated})
    return rows


def _pct(stat: dict[str, Any] | None, sd: bool = True) -> str:
    """`95.12 ± 1.30` (in %) for a `{"mean", "sd"}` statistic."""
    if stat is None:
        return "–"
    text = f"{100 * stat['mean']:.2f}"
    if sd:
        text += " ± –" if stat.get("sd") is None else f" ± {100 * stat['sd']:.2f}"
    return text


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table under a title line (a heading or a sentence), with blank lines around."""
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return [*lines, *("| " + " | ".join(row) + " |" for row in rows), ""]


DICE_IOU = [(m, r) for m in ("dice", "iou") for r in REGIONS]
DICE_IOU_HEADER = [f"{METRIC_NAMES[m]} {r}" for m, r in DICE_IOU]


def _markdown_models(report: dict[str, Any]) -> list[str]:
    models = report["models"]
    lines = _table("## Models", ["model", "group", "kind", "architecture", "parameters", "epoch", "images",
                                 "average score"],
                   [[m["label"], m["group"], m["kind"], str(m.get("architecture")),
                     f"{m.get('parameters') or 0:,}", str(m.get("epoch")), str(m["image_count"]),
                     _pct(m["overall"]["average"]["score"])] for m in models])
    lines += ["## Overall (mean ± sd over images, %)", ""]
    for region in REGIONS:
        lines += _table(f"### {region}", ["model", *(METRIC_NAMES[m] for m in METRICS)],
                        [[m["label"], *(_pct(m["overall"][region][k]) for k in METRICS)] for m in models])
    lines += _markdown_surface(models)
    lines += ["## Per source (mean ± sd over images, %)", ""]
    for src in sorted({s for m in models for s in m["per_source"]}):
        rows = [[m["label"], str(m["image_counts"][src]), _pct(m["per_source"][src]["average"]["score"]),
                 *(_pct(m["per_source"][src][r][k]) for k, r in DICE_IOU)]
                for m in models if src in m["per_source"]]
        lines += _table(f"### {src}", ["model", "images", "average score", *DICE_IOU_HEADER], rows)
    return lines


def _with_surface(models: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    """The models whose overall summary has surface Dice, and the surface metrics of the first of them."""
    models = [m for m in models if surface_metrics_in([m["overall"]])]
    return models, surface_metrics_in([models[0]["overall"]]) if models else ()


def _markdown_surface(models: Sequence[dict[str, Any]]) -> list[str]:
    """Surface Dice per region, overall and per source, for the models that have it."""
    models, metrics = _with_surface(models)
    if not models:
        return []
    header = ["model", "source", *(f"{r}, {METRIC_NAMES[k]}" for r in REGIONS for k in metrics)]
    rows = []
    for m in models:
        for name, summary in [("all", m["overall"]), *sorted(m["per_source"].items())]:
            rows.append([m["label"], name, *(_pct(summary[r][k]) for r in REGIONS for k in metrics)])
    return ["## Outlines (mean ± sd over images, %)", "",
            *_table("Surface Dice: the share of the predicted and the expert outlines that lies within the "
                    "tolerance of the other outline (pixels of the scored image). An outline drawn a pixel "
                    "off scores 100 at 1 px, however thin the region.", header, rows)]


def _comparison_row(c: dict[str, Any]) -> list[str]:
    name = "average score" if c["region"] == "average" else f"{METRIC_NAMES[c['metric']]} {c['region']}"
    return [c["a"], c["b"], name, _pct({"mean": c["mean_a"], "sd": c["sd_a"]}),
            _pct({"mean": c["mean_b"], "sd": c["sd_b"]}), f"{100 * c['difference']:+.2f}", _num(c["se"], 100),
            _num(c["t"]), _num(c["p_permutation"]), "yes" if c["separated"] else "no"]


def _markdown_seeds(report: dict[str, Any]) -> list[str]:
    groups, models = report["groups"], report["models"]
    if len(groups) < 2 and all(g["runs"] == 1 for g in groups):
        return []
    lines = ["## Across seeds (each run's mean over images, then mean ± sd over runs, %)", ""]
    lines += _table("Per run:", ["run", "group", "average score", *DICE_IOU_HEADER],
                    [[m["label"], m["group"], _pct(m["overall"]["average"]["score"], sd=False),
                      *(_pct(m["overall"][r][k], sd=False) for k, r in DICE_IOU)] for m in models])
    lines += _table("Per group:", ["group", "runs", "average score", *DICE_IOU_HEADER],
                    [[g["name"], str(g["runs"]), _pct(g["overall"]["average"]["score"]),
                      *(_pct(g["overall"][r][k]) for k, r in DICE_IOU)] for g in groups])
    wanted = [("average", "score"), *((r, m) for m, r in DICE_IOU)]
    shown = [c for c in report["comparisons"] if (c["region"], c["metric"]) in wanted]
    if shown:
        lines += _table("Differences (A − B, in percentage points; A and B as mean ± sd over runs):",
                        ["A", "B", "statistic", "A", "B", "A − B", "SE", "t", "p (permutation)",
                         "runs separate"], [_comparison_row(c) for c in shown])
        lines += ["SE is the standard error of the difference from each group's seed-to-seed sd (Welch); "
                  "p is the exact permutation test over the runs' means (with 3 runs against 3 it cannot go "
                  "below 0.10). A difference exceeds seed-to-seed noise when the runs separate (every run "
                  "of one model beats every run of the other) and |t| is well above 2; otherwise it is "
                  "within the noise of training.", ""]
    return lines


def _num(value: float | None, scale: float = 1.0) -> str:
    return "–" if value is None else f"{scale * value:.2f}"


def render_markdown(report: dict[str, Any], figure: str | None = "figure.png") -> str:
    """The Markdown report of `evaluate`'s result."""
    lines = ["# Evaluation report", "",
             f"Split: **{report['split']}**. Each image is predicted as the service does it and scored at "
             "its original resolution. Regions: nucleus, cytoplasm, and cell = nucleus ∪ cytoplasm.",
             "", f"Average evaluation score: {report['average_score']}.", ""]
    lines += [f"> **Warning:** {w}" for w in report.get("warnings", [])] + [""] * bool(report.get("warnings"))
    lines += _markdown_models(report) + _markdown_seeds(report)
    if figure:
        lines += ["## Figure", "", f"![Dice and IoU per region, and example overlays]({figure})", ""]
    return "\n".join(lines)


def format_table(report: dict[str, Any]) -> str:
    """A short plain-text table for the console: Dice per region and the average score, in %."""
    width = max(12, *(len(m["label"]) for m in report["models"]), *(len(g["name"]) for g in report["groups"]))
    head = f"{'model':<{width}} {'images':>6} {'nucleus':>8} {'cytoplasm':>9} {'cell':>8} {'average':>8}"
    lines = ["Dice per region and average score (%, mean over images)", head]
    for m in report["models"]:
        o = {r: 100 * m["overall"][r]["dice"]["mean"] for r in REGIONS}
        average = 100 * m["overall"]["average"]["score"]["mean"]
        lines.append(f"{m['label']:<{width}} {m['image_count']:>6} {o['nucleus']:>8.2f} "
                     f"{o['cytoplasm']:>9.2f} {o['cell']:>8.2f} {average:>8.2f}")
    surface, metrics = _with_surface(report["models"])
    if surface:
        lines += ["", f"Surface Dice at {' / '.join(f'{t} px' for t in SURFACE_TOLERANCES)} (%)",
                  f"{'model':<{width}} {'':>6} {'nucleus':>13} {'cytoplasm':>13} {'cell':>13}"]
        for m in surface:
            cells = [" / ".join(f"{100 * m['overall'][r][k]['mean']:.1f}" for k in metrics) for r in REGIONS]
            lines.append(f"{m['label']:<{width}} {'':>6} " + " ".join(f"{c:>13}" for c in cells))
    pooled = [g for g in report["groups"] if g["runs"] > 1]
    if pooled:
        lines += ["", "mean ± sd across runs (%)", f"{'group':<{width}} {'runs':>6} {'Dice nucleus':>15} "
                  f"{'Dice cytoplasm':>15} {'Dice cell':>15} {'average':>15}"]
        for g in pooled:
            o = g["overall"]
            lines.append(f"{g['name']:<{width}} {g['runs']:>6} " + " ".join(
                f"{_pct(s):>15}" for s in (o["nucleus"]["dice"], o["cytoplasm"]["dice"], o["cell"]["dice"],
                                          o["average"]["score"])))
    return "\n".join(lines)


def _bars(ax: Any, groups: Sequence[dict[str, Any]], metric: str) -> None:
    regions = list(REGIONS)
    x = np.arange(len(regions))
    width = 0.8 / len(groups)
    lowest = 1.0
    for i, g in enumerate(groups):
        stats = [g["overall"][r][metric] for r in regions]
        pos = x - 0.4 + width * (i + 0.5)
        yerr = [s["sd"] or 0.0 for s in stats] if g["runs"] > 1 else None
        ax.bar(pos, [s["mean"] for s in stats], width, yerr=yerr, capsize=3, label=g["name"])
        for p, s in zip(pos, stats, strict=True):
            ax.plot([p] * len(s["values"]), s["values"], "o", markersize=3, mfc="white", mec="black")
            lowest = min(lowest, *s["values"])
    floor = max(0.0, math.floor(10 * lowest - 0.5) / 10)
    ax.set_ylim(floor, 1.0)
    ax.set_xticks(x, regions)
    ax.set_title(f"{METRIC_NAMES[metric]} (axis from {floor:.1f}; dots: runs; error bars: sd over runs)",
                 fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def write_figure(report: dict[str, Any], examples: Sequence[Example], path: Path | str,
                 max_models: int = 4) -> None:
    """Grouped bars of Dice and IoU per region per group, then one row of overlays per example."""
    from matplotlib.figure import Figure  # Figure alone renders with Agg: no pyplot, no global state

    groups = report["groups"]
    labels = [m["label"] for m in report["models"]]
    if len(labels) > max_models:
        labels = [g["labels"][0] for g in groups][:max_models]
    cols = 2 + len(labels)
    fig = Figure(figsize=(max(9.0, 2.4 * cols), 3.6 + 2.4 * len(examples)), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[3.6, max(2.4 * len(examples), 0.01)],
                                 squeeze=False)[:, 0]
    axes = top.subplots(1, 2)
    for ax, metric in zip(axes, ("dice", "iou"), strict=True):
        _bars(ax, groups, metric)
    axes[1].legend(fontsize=8, loc="lower right")
    if examples:
        bottom.suptitle("overlays (as the service draws them): cytoplasm blue, nucleus amber; "
                        "(n) = the image's average score, %",
                        fontsize=9)
        grid = np.atleast_2d(bottom.subplots(len(examples), cols))
        averages = {m["label"]: {f"{r['source']}/{r['name']}": r["average"] for r in m["per_image"]}
                    for m in report["models"]}
        for row, ex in zip(grid, examples, strict=True):
            panels = [(ex.image, ex.key), (overlay(ex.image, ex.truth), "ground truth")]
            panels += [(overlay(ex.image, ex.predictions[lb]), f"{lb} ({100 * averages[lb][ex.key]:.1f})")
                       for lb in labels]
            for ax, (img, title) in zip(row, panels, strict=True):
                ax.imshow(img)
                ax.set_title(title, fontsize=8)
                ax.axis("off")
    fig.savefig(path, dpi=90)

