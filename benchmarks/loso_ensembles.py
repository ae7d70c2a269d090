"""Does averaging two networks help on a lab neither was trained on? The leave-one-source-out runs of
`benchmarks/loso_study.sh` (one Zheng source each, seeds 0-2), combined two seeds at a time with
`model_training.ensemble` and scored as the single runs are: every image of the other source ("cross")
and the own source's validation split ("in").

    SEEDS="0 1 2" RECIPES="a c" bash benchmarks/loso_study.sh
    .venv/bin/python benchmarks/loso_ensembles.py runs/loso --recipes a c

Writes `<source>-<recipe>-ens<i><j>.pt` and its `-cross`/`-in` reports beside the runs (kept when
already there) and prints a Markdown table: each recipe's single networks and its two-seed ensembles,
mean ± sd over seeds or seed pairs, and each ensemble minus the mean of its two members.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loso_table import REGIONS, dice, fmt, other_source  # noqa: E402

SOURCES = ("dataset1", "dataset2")


def score(name: str, checkpoint: Path, folder: Path, data: Path, source: str) -> dict[str, dict[str, float]]:
    """Dice per region of `checkpoint` cross-source and in-source, evaluating what is not there yet."""
    scores = {}
    sides = (("cross", ["--data", str(data / other_source(source)), "--split", "all"]),
             ("in", ["--split", "val"]))
    for side, extra in sides:
        out = folder / f"{name}-{side}"
        if not (out / "report.json").exists():
            subprocess.run([str(ROOT / ".venv/bin/wbc-evaluate"), f"{name}={checkpoint}", *extra,
                            "--out", str(out), "--group-by", "none", "--examples", "0", "--threads", "1"],
                           check=True, stdout=subprocess.DEVNULL)
        scores[side] = dice(out / "report.json")
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--recipes", nargs="+", default=["a", "c"])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/datasets/wbc-zheng2018")
    args = parser.parse_args()
    print("| trained on → scored on | recipe | networks | runs | cross: nucleus / cytoplasm / cell "
          "| in: nucleus / cytoplasm / cell | ensemble minus its members, cytoplasm: cross / in |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for source, recipe in itertools.product(SOURCES, args.recipes):
        seeds = sorted(int(p.parent.name.rsplit("-s", 1)[1])
                       for p in args.folder.glob(f"{source}-{recipe}-s*/best.pt"))
        if len(seeds) < 2:
            print(f"{source}-{recipe}: {len(seeds)} seed(s), need two", file=sys.stderr)
            continue
        singles = {s: score(f"{source}-{recipe}-s{s}", args.folder / f"{source}-{recipe}-s{s}/best.pt",
                            args.folder, args.data, source) for s in seeds}
        pairs, gains = {}, []
        for i, j in itertools.combinations(seeds, 2):
            name = f"{source}-{recipe}-ens{i}{j}"
            checkpoint = args.folder / f"{name}.pt"
            if not checkpoint.exists():
                members = [str(args.folder / f"{source}-{recipe}-s{k}/best.pt") for k in (i, j)]
                subprocess.run([sys.executable, "-m", "model_training.ensemble", *members,
                                "--out", str(checkpoint)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            pairs[(i, j)] = score(name, checkpoint, args.folder, args.data, source)
            gains.append({side: pairs[(i, j)][side]["cytoplasm"]
                          - (singles[i][side]["cytoplasm"] + singles[j][side]["cytoplasm"]) / 2
                          for side in ("cross", "in")})
        for label, runs in (("single", list(singles.values())), ("two, averaged", list(pairs.values()))):
            cells = [" / ".join(fmt([run[side][r] for run in runs]) for r in REGIONS)
                     for side in ("cross", "in")]
            gain = "—" if label == "single" else " / ".join(
                f"{statistics.mean(g[side] for g in gains):+.1f}" for side in ("cross", "in"))
            print(f"| {source} → {other_source(source)} | {recipe} | {label} | {len(runs)} | {cells[0]} "
                  f"| {cells[1]} | {gain} |")


if __name__ == "__main__":
    main()
