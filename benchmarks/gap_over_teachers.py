"""The share of the teacher-minus-scratch gap that distillation recovers, over draws of the lab teacher.

    python -m benchmarks.gap_over_teachers [--teachers 0,1,2] [--rows cid_balanced,cid_rd,crd]
        [--seeds 0,1,2] [--run-dir runs/bench] [--out benchmarks/results/gap_over_teachers.json]

The gap recovered, (student - no_kd) / (teacher - no_kd) on test zero-shot top-1, divides by the
teacher's lead over the undistilled student, and two draws of one teacher recipe (another seed) differ
by more than any student's spread over seeds. This script measures it per draw and averages it.

Teacher seed 0 is the bench's own (`<run-dir>/teacher`, with its cache, balance and clusters in
`<run-dir>`): run `make bench` or `bench --only cid` first. Each other seed S trains
`<run-dir>/teacher_seed<S>`, the bench teacher's recipe with another seed (the ensemble's second teacher
is seed 1), and distils from it in a run dir of its own, `<run-dir>_t<S>`: embed, balance and cluster
from that teacher, then each row. `no_kd` reads no teacher: its runs in `<run-dir>` serve every draw.
Every finished stage and run is reused, so a killed run resumes. Rows are scored on the validation and
test splits; the gap is the test split's, as in the bench table. Writes one JSON (rewritten after each
teacher) and prints a table.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.screen_views import cache_cost  # noqa: E402

from clipdistill.checkpoint import write_json  # noqa: E402
from clipdistill.config import ConfigError, RunConfig, load_config, overridden, replace  # noqa: E402
from clipdistill.curate.stages import run_balance, run_cluster  # noqa: E402
from clipdistill.host import host_info  # noqa: E402
from clipdistill.lab import LAB_CONFIG, evaluated, row_config, summarize, train_teacher, val_zeroshot  # noqa: E402
from clipdistill.runs import model_dir  # noqa: E402
from clipdistill.train import train  # noqa: E402


def teacher_config(base: RunConfig, seed: int) -> tuple[RunConfig, str]:
    """The config whose cache holds teacher `seed`, and that teacher's folder in the bench run dir."""
    if seed == 0:
        train_teacher(base)
        return base, "teacher"
    name = f"teacher_seed{seed}"
    train_teacher(base, seed=seed, name=name)
    weights = str(model_dir(base, name) / "model.safetensors")
    return replace(base, {"run_dir": f"{base.run_dir}_t{seed}", "teacher.pretrained": weights}), name


def scores(cfg: RunConfig, row: str, seeds: list[int], overrides: dict) -> dict:
    """Validation and test zero-shot top-1 of `row` (with `overrides` over its own settings) trained
    (or reused) for each seed."""
    val, test = [], []
    for seed in seeds:
        run = replace(row_config(cfg, row, seed), overrides)
        train(run)
        test.append(evaluated(run, run.train.name)["zeroshot_top1"])
        val.append(val_zeroshot(run, run.train.name))
        print(f"{cfg.run_dir}/{run.train.name}: val {val[-1]:.2f}, test {test[-1]:.2f}", flush=True)
    return {"val_zeroshot_top1": summarize(val), "zeroshot_top1": summarize(test)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teachers", default="0,1,2", help="teacher seeds; 0 is the bench's teacher")
    parser.add_argument("--rows", default="cid_balanced,cid_rd,crd")
    parser.add_argument("--seeds", default="0,1,2", help="student seeds")
    parser.add_argument("--run-dir", default="runs/bench")
    parser.add_argument("--out", default="benchmarks/results/gap_over_teachers.json")
    args, overrides = parser.parse_known_args()  # the rest: `--section.key value` config overrides
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = args.rows.split(",")
    try:
        base = load_config(
            str(LAB_CONFIG), ["--run_dir", args.run_dir, "--lab.seeds", str(seeds), *overrides]
        )
    except ConfigError as e:
        parser.error(str(e))
    given = overridden(base, overrides)  # over each row's own settings, for every draw
    if any(key.startswith("teacher.") or key == "run_dir" for key in given):
        parser.error("the teacher and run dir of each draw are this script's: use --teachers and --run-dir")
    no_kd = scores(base, "no_kd", seeds, given)
    scratch = no_kd["zeroshot_top1"]["mean"]
    report = {"run_dir": args.run_dir, "host": host_info(), "student_seeds": seeds, "no_kd": no_kd}
    report["teachers"] = {}
    for teacher_seed in (int(s) for s in args.teachers.split(",")):
        cfg, name = teacher_config(base, teacher_seed)
        cache = cache_cost(cfg)  # built unless complete (rebuilding would overwrite its first build's cost)
        run_balance(cfg)
        run_cluster(cfg)
        teacher = evaluated(base, name)["zeroshot_top1"]
        draw = {"teacher": name, "run_dir": cfg.run_dir, "teacher_zeroshot_top1": teacher, "cache": cache}
        draw["rows"] = {}
        for row in rows:
            result = scores(cfg, row, seeds, given)
            result["gap_recovered"] = (result["zeroshot_top1"]["mean"] - scratch) / (teacher - scratch)
            draw["rows"][row] = result
        report["teachers"][str(teacher_seed)] = draw
        report["mean_gap_recovered"] = {
            row: summarize([d["rows"][row]["gap_recovered"] for d in report["teachers"].values()])
            for row in rows
        }
        write_json(Path(args.out), report)

    print(f"\nno_kd: test {scratch:.2f} ± {no_kd['zeroshot_top1']['std']:.2f}")
    print("| teacher seed | teacher | " + " | ".join(rows) + " |")
    print("|---|---|" + "---|" * len(rows))
    for teacher_seed, draw in report["teachers"].items():
        cells = [
            f"{r['zeroshot_top1']['mean']:.2f} ± {r['zeroshot_top1']['std']:.2f} ({r['gap_recovered']:.2f})"
            for r in draw["rows"].values()
        ]
        print(f"| {teacher_seed} | {draw['teacher_zeroshot_top1']:.2f} | " + " | ".join(cells) + " |")
    means = report["mean_gap_recovered"]
    cells = [f"{means[r]['mean']:.2f} ± {means[r]['std']:.2f}" for r in rows]
    print("| mean gap recovered | | " + " | ".join(cells) + " |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
