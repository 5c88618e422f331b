"""Screen one CLIP-CID setting on the lab over seeds, scored on the validation split.

    python benchmarks/screen_cid.py NAME [--section.key value ...] [--run-dir runs/bench] [--seeds 0,1,2]
        [--row cid_balanced]

Needs a bench run dir (teacher, cache, balance: `make bench` or `bench --only cid` first). Trains the
`cid_balanced` row (or another lab row, `--row`) with the given config overrides (typed and checked as
on the `clipdistill` command line, and set over the row's own settings) as `screen_<NAME>_seed<S>`,
evaluates it as the bench does (test split) and adds zero-shot accuracy on the validation split, the
number settings are chosen by: the test split only reports.
`cluster` runs first and is reused when its settings are unchanged; give a new clustering its own
folder with `--cid.clusters`. Prints one line per seed and a mean ± std summary.

Example (the K sweep of benchmarks/README.md, run two at a time with one thread each; CPU results are
reproducible for a fixed thread count):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/screen_cid.py k3000 \\
        --cluster.n_clusters 3000 --cid.clusters cluster_k3000
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")


from clipdistill.config import ConfigError, load_config, overridden, replace  # noqa: E402
from clipdistill.curate.stages import run_cluster  # noqa: E402
from clipdistill.lab import LAB_CONFIG, evaluated, row_config, val_zeroshot  # noqa: E402
from clipdistill.train import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name")
    parser.add_argument("--run-dir", default="runs/bench")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--row", default="cid_balanced", help="the lab row the overrides apply to")
    args, overrides = parser.parse_known_args()  # the rest: `--section.key value` config overrides

    try:
        base = load_config(str(LAB_CONFIG), ["--run_dir", args.run_dir, *overrides])
    except ConfigError as e:
        parser.error(str(e))
    print("cluster", run_cluster(base), flush=True)
    scores = []
    given = overridden(base, overrides)  # over the row's own settings
    for seed in (int(s) for s in args.seeds.split(",")):
        name = f"screen_{args.name}_seed{seed}"
        cfg = replace(row_config(base, args.row, seed), given | {"train.name": name})
        train(cfg)
        metrics = dict(evaluated(cfg, name))
        metrics["val_zeroshot_top1"] = val_zeroshot(cfg, name)
        scores.append(metrics)
        keys = ("val_zeroshot_top1", "zeroshot_top1", "linear_probe_top1")
        print(name, {key: round(metrics[key], 2) for key in keys}, flush=True)
    for key in ("val_zeroshot_top1", "zeroshot_top1", "linear_probe_top1"):
        values = [m[key] for m in scores]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{args.name} {key}: {statistics.fmean(values):.2f} ± {spread:.2f}", flush=True)


if __name__ == "__main__":
    main()
