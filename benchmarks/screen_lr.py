"""Screen the student learning rate of every grid row on the lab, scored on validation.

    python -m benchmarks.screen_lr [--run-dir runs/bench] [--rows no_kd,fd,...] [--lrs 0.001,0.002,0.003]
        [--seeds 0,1,2] [--out benchmarks/results/screen_lr] [--section.key value ...]

The grid trains every row at one shared learning rate (`train.lr` in configs/lab.yaml). This screen
gives each row the same small grid of rates, over the same seeds and the bench's budget (steps,
batch), each row at its bench setting (the baselines at their validation-chosen weights), and
picks per row the rate with the best mean zero-shot accuracy on the validation split, unless it leads
the shared rate by no more than one seed-std (then the shared rate stays); the test split is
evaluated as the bench does and only reported.

Needs a bench run dir (`make bench`, or `bench --only cid` and `--only baselines`): its teacher,
cache, balanced subset and clusters are reused. A point at the row's own rate (the shared
`train.lr`, or the rate the row sets) is the grid's run itself (`<row>_seed<S>`), scored again on
validation; the others train as `lr<rate>_<row>_seed<S>`. Finished runs are reused, so a killed
screen continues, and two screens over disjoint `--rows` can run side by side (one thread each);
a final call over every row then only collects. `<out>.json` and `<out>.md` are rewritten after
each run.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.screen_baselines import summary  # noqa: E402

from clipdistill.checkpoint import write_json  # noqa: E402
from clipdistill.config import ConfigError, load_config, replace  # noqa: E402
from clipdistill.lab import LAB_CONFIG, evaluated, row_config, val_zeroshot  # noqa: E402
from clipdistill.runs import model_dir  # noqa: E402
from clipdistill.train import train  # noqa: E402

GRID_ROWS = ("no_kd", "fd", "crd", "icl", "tinyclip_affinity", "cid_balanced")
TITLE = "# The student learning rate of each grid row, screened on validation"
KEYS = ("val_zeroshot_top1", "zeroshot_top1", "linear_probe_top1")


def run_point(base, row: str, lr: float, seed: int) -> dict:
    """Train (or reuse) one row at one rate and seed; its validation and test metrics."""
    cfg = row_config(base, row, seed)
    if lr != cfg.train.lr:  # the row's own rate is the grid's run itself
        cfg = replace(cfg, {"train.name": f"lr{lr:g}_{row}_seed{seed}", "train.lr": lr})
    train(cfg)
    metrics = evaluated(cfg, cfg.train.name) | {"val_zeroshot_top1": val_zeroshot(cfg, cfg.train.name)}
    return {"seed": seed, **{key: metrics[key] for key in KEYS}}


def table(report: dict) -> str:
    """One line per (row, rate); each row's chosen rate in bold."""
    lines = [
        "| row | lr | validation zero-shot | test zero-shot | linear probe | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for row, by_lr in report["points"].items():
        for lr, entry in sorted(by_lr.items(), key=lambda item: float(item[0])):
            s = entry["summary"]
            cells = [f"{s[k]['mean']:.2f} ± {s[k]['std']:.2f}" if k in s else "" for k in KEYS]
            chosen = report["chosen"].get(row) == lr
            label = f"**{lr}**" if chosen else lr
            lines.append(f"| {row} | {label} | " + " | ".join(cells) + f" | {len(entry['runs'])} |")
    return "\n".join(lines)


def choose(report: dict) -> dict[str, str]:
    """Per row, the rate with the best mean validation zero-shot over all seeds, unless its lead over
    the shared rate is within one seed-std (the larger of the two): such a tie keeps the shared
    rate, so that rows differ in their rate only where the screen can tell rates apart."""
    chosen = {}
    for row, by_lr in report["points"].items():
        full = {
            lr: e["summary"]["val_zeroshot_top1"]
            for lr, e in by_lr.items()
            if len(e["runs"]) == len(report["seeds"])
        }
        if not full:
            continue
        best, shared = max(full, key=lambda lr: full[lr]["mean"]), report["shared_lr"]
        if shared in full:
            lead = full[best]["mean"] - full[shared]["mean"]
            best = shared if lead <= max(full[best]["std"], full[shared]["std"]) else best
        chosen[row] = best
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", default="runs/bench")
    parser.add_argument("--rows", default=",".join(GRID_ROWS))
    parser.add_argument("--lrs", default="0.001,0.002,0.003")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="benchmarks/results/screen_lr")
    args, overrides = parser.parse_known_args()  # the rest: `--section.key value` config overrides
    fixed = ["--run_dir", args.run_dir, "--lab.seeds", "[0, 1, 2]", "--lab.grad_share", "false"]
    try:
        base = load_config(str(LAB_CONFIG), [*fixed, *overrides])
    except ConfigError as e:
        parser.error(str(e))
    if not model_dir(base, "cache").is_dir():
        parser.error(f"{args.run_dir} has no teacher cache: run `make bench` (or `bench --only cid`) first")
    seeds = [int(s) for s in args.seeds.split(",")]
    shared = f"{base.train.lr:g}"
    report = {"seeds": seeds, "overrides": overrides, "shared_lr": shared, "points": {}, "chosen": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for row in args.rows.split(","):
        for lr in (float(v) for v in args.lrs.split(",")):
            entry = report["points"].setdefault(row, {}).setdefault(f"{lr:g}", {"runs": []})
            for seed in seeds:
                entry["runs"].append(run_point(base, row, lr, seed))
                entry["summary"] = summary(entry["runs"])
                report["chosen"] = choose(report)
                print(row, f"lr {lr:g}", {k: round(v, 2) for k, v in entry["runs"][-1].items()}, flush=True)
                write_json(out.with_suffix(".json"), report)
                out.with_suffix(".md").write_text(f"{TITLE}\n\n{table(report)}\n")
    print(table(report))


if __name__ == "__main__":
    main()
