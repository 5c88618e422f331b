"""Screen the reinforced cache on the lab, on the validation split: the number of views
(`embed.views`) and the teacher ensemble.

    python benchmarks/screen_views.py [--rows cid_views2,cid_views4,cid_ensemble] [--seeds 0,1,2]
        [--run-dir runs/bench] [--out benchmarks/results/screen_views.json]

It trains each lab row (`cid_views<N>`: CID on the balanced subset with an N-view cache;
`cid_balanced`: the plain cache; `cid_ensemble`: two teachers) for each seed, under the names the
bench gives them (`<row>_seed<S>`), so `bench --only reinforced` reuses them. Each model is evaluated
as the bench does (test split) and on the validation split's zero-shot top-1, the number N is chosen
by (the best `cid_views<N>` row); the test split only reports. It first makes what the rows need
(teacher, plain cache, balance, clusters, the second teacher: reused when there) and each row's
cache, recording the cost of every cache from its first build: the seconds and bytes in its
report.json (a cache already built is not embedded again, so its report is the first build's). Writes
one JSON with every number (rewritten after each row) and prints a summary.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


from clipdistill.cache import TeacherCache  # noqa: E402
from clipdistill.checkpoint import read_json, write_json  # noqa: E402
from clipdistill.config import ConfigError, load_config, overridden, replace  # noqa: E402
from clipdistill.curate.stages import run_balance, run_cluster  # noqa: E402
from clipdistill.embed import run_embed  # noqa: E402
from clipdistill.lab import LAB_CONFIG, evaluated, row_config, train_teacher, val_zeroshot  # noqa: E402
from clipdistill.lab.demo import SECOND_TEACHER  # noqa: E402
from clipdistill.runs import cache_dir  # noqa: E402
from clipdistill.train import train  # noqa: E402

METRICS = ("val_zeroshot_top1", "zeroshot_top1", "linear_probe_top1", "retrieval_i2t_r1", "train_seconds")


def cache_cost(cfg) -> dict:
    """Build the config's cache unless it is complete; its first build's seconds and bytes on disk."""
    try:
        TeacherCache(cache_dir(cfg))
    except FileNotFoundError:
        run_embed(cfg)
    report = read_json(cache_dir(cfg) / "report.json")
    disk = sum(f.stat().st_size for f in cache_dir(cfg).rglob("*") if f.is_file() and f.name != "report.json")
    return {
        "seconds": round(report["seconds"], 1),
        "disk_bytes": disk,
        "views": report.get("views", 1),
        "teachers": 1 + len(report.get("ensemble", [])),
        "reused_plain_cache": report.get("reused_plain_cache", False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="cid_views2,cid_views4,cid_ensemble")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--run-dir", default="runs/bench")
    parser.add_argument("--out", default="benchmarks/results/screen_views.json")
    args, overrides = parser.parse_known_args()  # the rest: `--section.key value` config overrides
    seeds = [int(s) for s in args.seeds.split(",")]
    try:
        base = load_config(
            str(LAB_CONFIG), ["--run_dir", args.run_dir, "--lab.seeds", str(seeds), *overrides]
        )
    except ConfigError as e:
        parser.error(str(e))
    train_teacher(base)
    costs = {"cache": cache_cost(base)}
    run_balance(base)
    run_cluster(base)
    results = {}
    given = overridden(base, overrides)  # over each row's own settings
    for row in args.rows.split(","):
        per_seed = []
        for seed in seeds:
            cfg = replace(row_config(base, row, seed), given)
            if cfg.embed.ensemble:
                train_teacher(base, seed=1, name=SECOND_TEACHER)
            costs[cache_dir(cfg).name] = cache_cost(cfg)
            train(cfg)
            metrics = dict(evaluated(cfg, cfg.train.name))
            metrics["val_zeroshot_top1"] = val_zeroshot(cfg, cfg.train.name)
            per_seed.append({key: metrics[key] for key in METRICS})
            print(cfg.train.name, {key: round(per_seed[-1][key], 2) for key in METRICS}, flush=True)
        results[row] = {"seeds": seeds, "cache": cache_dir(cfg).name} | {
            key: {
                "mean": statistics.fmean(m[key] for m in per_seed),
                "std": statistics.stdev(m[key] for m in per_seed) if len(per_seed) > 1 else 0.0,
                "values": [m[key] for m in per_seed],
            }
            for key in METRICS
        }
        views = [r for r in results if r.startswith("cid_views")]
        chosen = max(views, key=lambda r: results[r]["val_zeroshot_top1"]["mean"]) if views else None
        report = {
            "chosen_on_validation": chosen,
            "rows": results,
            "cache_cost": costs,
            "run_dir": args.run_dir,
        }
        write_json(Path(args.out), report)
    for row, r in results.items():
        line = ", ".join(f"{key} {r[key]['mean']:.2f} ± {r[key]['std']:.2f}" for key in METRICS)
        print(f"{row} ({r['cache']}): {line}")
    for name, cost in costs.items():
        print(f"{name}: {cost['seconds']} s, {cost['disk_bytes'] / 1e6:.1f} MB")
    print(f"cid_views chosen on validation: {chosen}; wrote {args.out}")


if __name__ == "__main__":
    main()
