"""Screen each distillation baseline's main weight or temperature on the lab, scored on validation.

    python benchmarks/screen_baselines.py [--run-dir runs/screen_baselines] [--seeds 0,1,2]
        [--only fd,crd] [--out benchmarks/results/screen_baselines] [--section.key value ...]

The same effort CLIP-CID's K got (benchmarks/screen_cid.py): a small grid per baseline that holds the
value of the method's own code (docs/methods.md, "Each baseline at its origin's settings"), each point
trained over the seeds with the bench's budget and chosen by zero-shot accuracy on the validation
split (5,000 held-out train images); the test split is evaluated as the bench does and only reported.
`no_kd` is screened alongside as the reference. Every run logs its per-term gradient shares
(`--train.grad_share true`), reported as `kd_share`: the distillation terms' share of the gradient.

The lab teacher and its cache are trained and built in the run dir unless already there (copy a
trained `teacher/` in to reuse it). Runs are named `screen_<point>_seed<S>` and reused when finished, so
a killed screen continues; `<out>.json` (every run's metrics) and `<out>.md` (the table, the chosen
value per baseline in bold) are rewritten after each run. Extra `--section.key value` pairs apply to
every run (e.g. `--train.steps 20` for a smoke run).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


from clipdistill.checkpoint import write_json  # noqa: E402
from clipdistill.config import BASELINE_ORIGINS, ConfigError, DistillConfig, load_config, replace  # noqa: E402
from clipdistill.embed import run_embed  # noqa: E402
from clipdistill.lab import LAB_CONFIG, evaluated, row_config, train_teacher, val_zeroshot  # noqa: E402
from clipdistill.train import train  # noqa: E402

# Baseline -> its points, each the overrides of one run. Each grid holds the origin's settings (the
# method's defaults, `DistillConfig().for_method`) and spans its main knob by about 3x (10x for fd's
# weight, whose origin value is specific to CLIP-KD's widths). A grid goes one step further where its
# edge won (TinyCLIP's lowest scale, crd's highest weight at the teacher's own logit scale). crd is also
# screened at the teacher logit scale 100 that it ran at before the cache recorded the teacher's own.
GRID: dict[str, list[dict[str, float]]] = {
    "fd": [{"distill.weight": w} for w in (200.0, 2000.0, 20000.0)],
    "crd": [{"distill.weight": w, "distill.teacher_logit_scale": 0.0} for w in (0.3, 1.0, 3.0, 10.0)]
    + [{"distill.weight": w, "distill.teacher_logit_scale": 100.0} for w in (0.3, 1.0, 3.0)],
    "icl": [{"distill.weight": w} for w in (0.3, 1.0, 3.0)],
    "tinyclip_affinity": [{"distill.affinity_logit_scale": s} for s in (6.25, 12.5, 25.0, 50.0, 100.0)],
}
# in the runs' names: crd_w1 (the teacher's own scale, 0, goes unnamed), crd_w1_t100
SHORT = {"distill.weight": "w", "distill.affinity_logit_scale": "scale", "distill.teacher_logit_scale": "t"}
KEYS = ("val_zeroshot_top1", "zeroshot_top1", "linear_probe_top1", "retrieval_i2t_r1", "kd_share")


def is_origin(row: str, overrides: dict[str, float]) -> bool:
    """Whether `overrides` are `row`'s origin settings (what its unset keys resolve to)."""
    origin = DistillConfig().for_method(row)
    return row in BASELINE_ORIGINS and all(
        getattr(origin, k.split(".")[1]) == v for k, v in overrides.items()
    )


def points(only: list[str]) -> list[tuple[str, str, dict]]:
    """(point name, lab row, overrides) of the screen: every baseline's origin first (baselines in the
    order of `only`), then the other points taking turns across baselines in their grids' order,
    `no_kd` last unless listed first (a cut-short screen has whole points that matter)."""
    grids = []
    for row in [row for row in only if row in GRID]:  # in the order given
        origin_first = sorted(GRID[row], key=lambda overrides, row=row: not is_origin(row, overrides))
        grids.append([(row, overrides) for overrides in origin_first])
    ordered = [grid[i] for i in range(max(map(len, grids), default=0)) for grid in grids if i < len(grid)]
    out = [(point_name(row, overrides), row, overrides) for row, overrides in ordered]
    if "no_kd" not in only:
        return out
    return [("no_kd", "no_kd", {}), *out] if only[0] == "no_kd" else [*out, ("no_kd", "no_kd", {})]


def point_name(row: str, overrides: dict[str, float]) -> str:
    return "_".join([row, *(f"{SHORT[key]}{value:g}" for key, value in named(overrides).items())])


def named(overrides: dict[str, float]) -> dict[str, float]:
    """The overrides a point is named and shown by: the teacher's own logit scale (0) is the default,
    set only so that the lab row's own value cannot replace it."""
    return {k: v for k, v in overrides.items() if (k, v) != ("distill.teacher_logit_scale", 0.0)}


def kd_share(metrics: dict) -> float | None:
    """The distillation terms' share of the gradient: 1 - the CLIP term's share (1 without a CLIP term)."""
    shares = {k: v for k, v in metrics.items() if k.startswith("grad_share/")}
    if not shares:
        return None
    return 1.0 - shares.get("grad_share/clip", 0.0)


def summary(runs: list[dict]) -> dict[str, dict]:
    """mean and std over seeds of each key the runs have."""
    out = {}
    for key in KEYS:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            out[key] = {"mean": statistics.fmean(values), "std": spread, "values": values}
    return out


def table(report: dict) -> str:
    """The screen as Markdown: one line per point, the chosen value per baseline in bold."""
    lines = [
        "| baseline | setting | validation zero-shot | test zero-shot | linear probe | i2t R@1 | kd_share "
        "| seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = ["no_kd", *GRID]
    by_row = sorted(  # a baseline's points at another teacher logit scale after its own-scale ones
        report["points"].items(),
        key=lambda p: (
            order.index(p[1]["row"]),
            p[1]["overrides"].get("distill.teacher_logit_scale", 0.0),
            *p[1]["overrides"].values(),
        ),
    )
    for point, entry in by_row:
        s = entry["summary"]
        cells = [
            f"{s[k]['mean']:.2f} ± {s[k]['std']:.2f}" if k in s and k != "kd_share"
            else (f"{s[k]['mean']:.2f}" if k in s else "")
            for k in KEYS
        ]  # fmt: skip
        setting = ", ".join(f"{k.split('.')[1]} {v:g}" for k, v in named(entry["overrides"]).items()) or "-"
        setting += " (origin)" if is_origin(entry["row"], entry["overrides"]) else ""
        chosen = report["chosen"].get(entry["row"]) == point
        name = f"**{entry['row']}**" if chosen else entry["row"]
        lines.append(f"| {name} | {setting} | " + " | ".join(cells) + f" | {len(entry['runs'])} |")
    return "\n".join(lines)


def choose(report: dict) -> dict[str, str]:
    """Per baseline, the point with the best mean validation zero-shot over full seeds; on an exact tie
    the origin, else the point earlier in its grid (whatever order the report lists them in)."""
    best: dict[str, tuple[tuple, str]] = {}
    for point, entry in report["points"].items():
        val = entry["summary"].get("val_zeroshot_top1")
        row, overrides = entry["row"], entry["overrides"]
        if row == "no_kd" or val is None or len(entry["runs"]) < len(report["seeds"]):
            continue
        position = GRID[row].index(overrides) if overrides in GRID.get(row, []) else len(GRID.get(row, []))
        rank = (val["mean"], is_origin(row, overrides), -position)
        if row not in best or rank > best[row][0]:
            best[row] = (rank, point)
    return {row: point for row, (_, point) in best.items()}


def document(report: dict) -> str:
    """`<out>.md`: a title naming the seeds and the command's extra overrides, then the table."""
    extra = " ".join(report["overrides"])
    seeds = ", ".join(map(str, report["seeds"]))
    title = f"# Baselines screened on validation (seeds {seeds}{'; ' + extra if extra else ''})"
    return f"{title}\n\n{table(report)}\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", default="runs/screen_baselines")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default=",".join(["no_kd", *GRID]))
    parser.add_argument("--out", default="benchmarks/results/screen_baselines")
    args, overrides = parser.parse_known_args()  # the rest: `--section.key value` config overrides
    try:
        base = load_config(str(LAB_CONFIG), ["--run_dir", args.run_dir, *overrides])
    except ConfigError as e:
        parser.error(str(e))
    seeds = [int(s) for s in args.seeds.split(",")]
    train_teacher(base)  # reused when the run dir holds it
    run_embed(base)
    report = {"seeds": seeds, "overrides": overrides, "grid": GRID}
    report["points"], report["chosen"] = {}, {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for point, row, settings in points(args.only.split(",")):
        entry = report["points"].setdefault(point, {"row": row, "overrides": settings, "runs": []})
        for seed in seeds:
            name = f"screen_{point}_seed{seed}"
            cfg = replace(row_config(base, row, seed), {"train.name": name, **settings})
            train(cfg)
            metrics = dict(evaluated(cfg, name))
            metrics["val_zeroshot_top1"] = val_zeroshot(cfg, name)
            metrics["kd_share"] = kd_share(metrics) if row != "no_kd" else None
            entry["runs"].append({"seed": seed, **{k: metrics[k] for k in KEYS}})
            entry["summary"] = summary(entry["runs"])
            report["chosen"] = choose(report)
            print(name, {k: round(v, 3) for k, v in entry["runs"][-1].items() if v is not None}, flush=True)
            write_json(out.with_suffix(".json"), report)
            out.with_suffix(".md").write_text(document(report))
    print(table(report))


if __name__ == "__main__":
    main()
