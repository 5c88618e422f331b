"""Screen one ComKD or PromptKD setting on ComKD's lab over seeds, scored on the target's validation images.

    python benchmarks/screen_comkd.py NAME ROW [--section.key value ...] [--run-dir DIR] [--seeds 0,1,2]

ROW is a stage-2 row of the lab (`promptkd`, `comkd`, or an ablation). Needs a run dir holding the lab
teacher and, for every seed, the prompt-tuned teacher the row distils (and the student it starts from)
(`bench --only comkd`, or `demo --lab.rows "[prompt_teacher]" --lab.seeds "[0, 1, 2]"`). Trains
ROW with the given config overrides (typed and checked as on the `clipdistill` command line, over the
row's own settings) as
`screen_<NAME>_seed<S>`, with the per-term gradient shares on, and scores it on the target's held-out
validation images: base/novel/HM there and accuracy under the other shifts of the clean validation
images. Those are the numbers settings are chosen by. The test split is evaluated as the bench does and
kept next to them, never read for the choice. Writes `<out>/<NAME>.json` (per seed: validation and test
metrics, the gradient diagnostics averaged over the log steps; seeds of an earlier call with the same
setting are kept) and prints a mean ± std line per number over the seeds in it.

Example (ComKD's λ_align, 0.1 in the lab's row):
    .venv/bin/python benchmarks/screen_comkd.py comkd_align1 comkd --comkd.lambda_align 1.0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from clipdistill.checkpoint import read_json, write_json  # noqa: E402
from clipdistill.config import ConfigError, load_config, overridden, replace  # noqa: E402
from clipdistill.evaluate.run import evaluate_model  # noqa: E402
from clipdistill.lab import LAB_CONFIG, ROWS, evaluated, row_config  # noqa: E402
from clipdistill.train import train  # noqa: E402

STAGE2_METHODS = ("comkd", "promptkd")
SCORES = ("hm", "base_acc", "novel_acc", "domain_shift_avg")
DIAGNOSTICS = ("grad_share/kd", "grad_share/align", "attention_entropy", "alpha")


def diagnostics(metrics_file: Path) -> dict[str, float]:
    """Each diagnostic averaged over the log steps that report it (gradient shares: those measured)."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    out = {}
    for key in DIAGNOSTICS:
        values = [r[key] for r in records if key in r]
        if values:
            out[key] = statistics.fmean(values)
    return out


def summary(per_seed: list[dict], key: str) -> str:
    values = [s[key] for s in per_seed if key in s]
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {spread:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name")
    parser.add_argument(
        "row", choices=[r for r, o in ROWS.items() if o.get("train.method") in STAGE2_METHODS]
    )
    parser.add_argument("--run-dir", default="runs/bench")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "screen_comkd"))
    args, overrides = parser.parse_known_args()  # the rest: `--section.key value` config overrides
    try:
        base = load_config(
            str(LAB_CONFIG), ["--run_dir", args.run_dir, "--lab.seeds", f"[{args.seeds}]", *overrides]
        )
    except ConfigError as e:
        parser.error(str(e))
    screened = overridden(base, overrides)  # the screened keys go over the row's own settings
    per_seed = []
    for seed in (int(s) for s in args.seeds.split(",")):
        name = f"screen_{args.name}_seed{seed}"
        cfg = replace(
            row_config(base, args.row, seed), {**screened, "train.name": name, "train.grad_share": True}
        )
        train(cfg)
        test = evaluated(cfg, name)
        val = evaluate_model(replace(cfg, {"eval.split": "val"}), name)
        record = (
            {"seed": seed} | {f"val_{k}": val[k] for k in SCORES} | {f"test_{k}": test[k] for k in SCORES}
        )
        record |= diagnostics(Path(cfg.run_dir) / name / "metrics.jsonl")
        per_seed.append(record)
        print(name, {k: round(v, 3) for k, v in record.items()}, flush=True)
    out = Path(args.out) / f"{args.name}.json"
    if out.is_file():  # seeds screened by an earlier call with the same setting are kept
        earlier = read_json(out)
        if (earlier["row"], earlier["overrides"]) == (args.row, overrides):
            ran = {r["seed"] for r in per_seed}
            per_seed = sorted(
                [r for r in earlier["seeds"] if r["seed"] not in ran] + per_seed, key=lambda r: r["seed"]
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"row": args.row, "overrides": overrides, "seeds": per_seed})
    keys = [f"val_{k}" for k in SCORES] + [f"test_{k}" for k in SCORES] + list(DIAGNOSTICS)
    for key in keys:
        print(f"{args.name} {key}: {summary(per_seed, key)}", flush=True)


if __name__ == "__main__":
    main()
