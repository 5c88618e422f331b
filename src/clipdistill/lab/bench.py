"""`clipdistill bench`: the full lab grid (every method, baseline and ablation) over several seeds.

It is the demo's pipeline (`demo.run_demo`) with more rows and seeds, so a killed bench resumes
where it stopped: finished trainings and evaluations are reused. On top it writes the results as
a Markdown table and three plots (row and metric names of docs/architecture.md, "Lab results").
"""

from __future__ import annotations

import json
from pathlib import Path

from clipdistill.checkpoint import read_json, write_json
from clipdistill.config import RunConfig
from clipdistill.lab.demo import ROWS, format_table, run_demo
from clipdistill.runs import model_dir, seed_run_name

# Rows recorded as another row's results: CLIP-CID already trains on all the data;
# cid_views: the views cache chosen on validation (benchmarks/README.md, "Reinforced cache").
ALIASES = {"cid_all_data": "cid", "cid_views": "cid_views2"}
# Every row of the lab results (docs/architecture.md); the teacher is always evaluated.
ALL_ROWS = [
    "no_kd", "cid", "cid_no_cluster", "cid_no_instance", "cid_balanced", "cid_random_subset",
    "cid_all_data", "cid_rd", "fd", "crd", "icl", "tinyclip_affinity", "teacher_zeroshot",
    "prompt_teacher", "student_zeroshot", "promptkd", "comkd", "comkd_no_ifalign", "comkd_no_eduattention",
]  # fmt: skip
GROUPS = {
    "cid": [
        "no_kd", "cid", "cid_no_cluster", "cid_no_instance", "cid_balanced", "cid_random_subset",
        "cid_all_data", "cid_rd",
    ],
    # openclip_distill is crd at its origin settings (one gradient, docs/methods.md): not trained twice
    "baselines": ["no_kd", "fd", "crd", "icl", "tinyclip_affinity", "cid"],
    "comkd": [
        "cid", "teacher_zeroshot", "prompt_teacher", "student_zeroshot", "promptkd", "comkd",
        "comkd_no_ifalign", "comkd_no_eduattention",
    ],
    # The reinforced cache (not in the grid: a second teacher and two more caches), N of cid_views chosen
    # on validation by benchmarks/screen_views.py; each baseline beside itself on the 2-view cache.
    "reinforced": [
        "no_kd", "cid_balanced", "cid_views", "cid_ensemble", "cid_ensemble_rd", "fd", "fd_views2", "crd",
        "crd_views2", "icl", "icl_views2", "tinyclip_affinity", "tinyclip_affinity_views2",
    ],
    # ComKD's other protocol (not in the grid): stage 2 on base-class images only.
    "comkd_protocols": [
        "cid", "prompt_teacher", "student_zeroshot", "promptkd", "comkd", "promptkd_inductive",
        "comkd_inductive",
    ],
}  # fmt: skip
# Rows the grid trains on seed 0 only, to fit its hour on 2 cores: ablations that no comparison of the
# grid rests on (CID's and ComKD's; the headline rows `cid_balanced`, `cid_rd`, `promptkd` and `comkd` keep
# every seed) and the untrained student. `--lab.first_seed_rows "[]"` gives them every seed too.
FIRST_SEED_ROWS = [
    "cid", "cid_no_cluster", "cid_no_instance", "cid_random_subset", "student_zeroshot", "comkd_no_ifalign",
    "comkd_no_eduattention",
]  # fmt: skip
# What `bench` changes in the config it is given, before the user's own overrides.
BENCH_OVERRIDES = [
    "--run_dir", "runs/bench",
    "--lab.seeds", "[0, 1, 2]",
    "--lab.rows", json.dumps(ALL_ROWS),
    "--lab.first_seed_rows", json.dumps(FIRST_SEED_ROWS),
    "--lab.jobs", "2",  # two single-threaded trainings at a time: the grid's hour on 2 cores
]  # fmt: skip


def bench_overrides(overrides: list[str]) -> list[str]:
    """The bench's run dir, seeds and rows, unless the command line sets them itself."""
    given = set(overrides[::2])
    pairs = zip(BENCH_OVERRIDES[::2], BENCH_OVERRIDES[1::2], strict=True)
    return [item for key, value in pairs if key not in given for item in (key, value)] + overrides


def select_rows(rows: list[str]) -> tuple[list[str], list[str]]:
    """(rows to train, rows to report): aliases train their source row; unknown rows are skipped."""
    report, train = [], []
    for row in rows:
        if row == "teacher_zeroshot":  # the teacher's own protocol scores: evaluated, not trained
            report.append(row)
            continue
        if row not in ROWS and row not in ALIASES:
            print(f"bench: skipping {row!r}: no method registers it yet")
            continue
        report.append(row)
        source = ALIASES.get(row, row)
        if source not in train:
            train.append(source)
    return train, report


def run_bench(cfg: RunConfig, only: str | None = None) -> dict:
    """Train and evaluate the grid, then write results.json, results.md and the plots in the run dir.

    A group (`only`) writes results_<group>.json/.md and <plot>_<group>.png instead, so it never
    overwrites the full grid's report (its trained runs are shared with the grid).
    """
    train_rows, report_rows = select_rows(GROUPS[only] if only else cfg.lab.rows)
    cfg.lab.rows = train_rows
    tag = f"_{only}" if only else ""
    if only:
        cfg.lab.results = f"results{tag}.json"
    run_demo(cfg)
    out = Path(cfg.run_dir)
    report = read_json(out / cfg.lab.results)
    trained = report["results"]
    # teacher_zeroshot exists only when a ComKD row made the teacher run its protocols
    reported = [row for row in report_rows if row != "teacher_zeroshot" or row in trained]
    report["results"] = {"teacher": trained["teacher"]} | {
        row: trained[ALIASES.get(row, row)] for row in reported
    }
    report["config"]["lab"]["rows"] = reported
    write_json(out / cfg.lab.results, report)
    table = format_table(report["results"])
    seeds = ", ".join(map(str, cfg.lab.seeds))
    one_seed = [row for row in reported if ALIASES.get(row, row) in cfg.lab.first_seed_rows]
    several = len(cfg.lab.seeds) > 1
    note = f"; {', '.join(one_seed)}: seed {cfg.lab.seeds[0]} only" if one_seed and several else ""
    table_path = (out / cfg.lab.results).with_suffix(".md")
    table_path.write_text(f"# clipdistill bench (mean ± std over seeds {seeds}{note})\n\n{table}\n")
    plots = write_plots(cfg, report["results"], tag)
    return {"results": str(out / cfg.lab.results), "table": str(table_path), "plots": plots}


def _train_folder(cfg: RunConfig, row: str) -> Path:
    """The first seed's train folder of `row`."""
    return model_dir(cfg, seed_run_name(ALIASES.get(row, row), cfg.lab.seeds[0], cfg.lab.seeds))


def write_plots(cfg: RunConfig, results: dict[str, dict], tag: str = "") -> list[str]:
    """accuracy<tag>.png, curves<tag>.png and accuracy_vs_time<tag>.png in the run dir (matplotlib,
    no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(cfg.run_dir)
    names = [name for name, row in results.items() if "zeroshot_top1" in row]
    students = [name for name in names if name != "teacher"]
    paths = [out / f"{name}{tag}.png" for name in ("accuracy", "curves", "accuracy_vs_time")]

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names)), 4))
    means = [results[n]["zeroshot_top1"]["mean"] for n in names]
    stds = [results[n]["zeroshot_top1"]["std"] for n in names]
    colors = ["tab:gray" if n.startswith("teacher") else "tab:blue" for n in names]
    ax.bar(names, means, yerr=stds, capsize=3, color=colors)
    low = min(m - s for m, s in zip(means, stds, strict=True))
    ax.set_ylim(
        max(0.0, low - 2), max(m + s for m, s in zip(means, stds, strict=True)) + 1
    )  # the differences
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.set_title("Zero-shot accuracy per method (mean ± std over seeds)")
    ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in students:
        if ALIASES.get(name) in results:  # the same curve as its source row
            continue
        metrics = _train_folder(cfg, name) / "metrics.jsonl"
        if metrics.is_file():
            records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            ax.plot([r["step"] for r in records], [r["loss"] for r in records], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"Training curves (seed {cfg.lab.seeds[0]})")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in students:
        row = results[name]
        if "train_seconds" not in row:
            continue
        x, y = row["train_seconds"], row["zeroshot_top1"]
        ax.errorbar(x["mean"], y["mean"], xerr=x["std"], yerr=y["std"], fmt="o", capsize=3)
        ax.annotate(name, (x["mean"], y["mean"]), fontsize="small", xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.set_title("Accuracy vs training time")
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return [str(p) for p in paths]
