"""The lab end to end: train the teacher, cache it, train each row's student per seed, evaluate, tabulate.

Every step is a normal stage run and is reused when its outputs exist, so a second `make demo`
only re-reads results, and a killed one continues where it stopped.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing
import signal
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from clipdistill.checkpoint import read_json, write_json
from clipdistill.config import RunConfig, fingerprint, replace, to_dict
from clipdistill.curate.stages import run_balance, run_cluster
from clipdistill.embed import run_embed
from clipdistill.evaluate.run import eval_stem, run_eval
from clipdistill.host import host_info
from clipdistill.methods import needs_teacher_cache
from clipdistill.runs import model_dir, seed_run_name
from clipdistill.train import train

# The reinforced cache's rows: CID on the balanced subset with N views per image, or with a second lab
# teacher (trained here with seed 1) in an ensemble; clusters and balance come from the plain cache.
BALANCED_CID = {"train.method": "cid", "train.subset": "balance/kept.npy"}
SECOND_TEACHER = "teacher_seed1"
CID_ENSEMBLE = {**BALANCED_CID, "embed.ensemble": [f"{SECOND_TEACHER}/model.safetensors"]}
# ComKD's lab: a target domain on which the hand-prompted teacher (trained on clean images) is weak.
# Stage 1 learns the target from `data.shots` labelled images per base class, stage 2 distils on the
# target's unlabeled train images (10,000 of them) from the untrained student; both are scored on its
# test images (base/novel/HM) and on the other shifts of the clean test images (domain shift). Settings
# are chosen on its validation images, which no stage trains on.
# (Its table reports no linear probe: it is not fitted.)
COMKD_TARGET = {
    "data.domain": "low_contrast",
    "data.train_size": 10000,
    "eval.protocol": "all",
    "eval.linear_probe": False,
}
STAGE2 = COMKD_TARGET
# Each stage-2 method at its learning rate chosen on the target's validation images (benchmarks/README.md);
# ComKD with its modules as the paper describes them (the defaults) and λ_align chosen likewise.
PROMPTKD = {"train.method": "promptkd", "train.lr": 0.001}
COMKD = {"train.method": "comkd", "comkd.lambda_align": 0.1, "train.lr": 0.001}
# The baselines at their validation-chosen settings (benchmarks/screen_baselines.py): where the screen
# chose the origin's value, the `distill` keys stay unset (docs/methods.md, "Baselines"). The student
# learning rate was screened for every grid row (benchmarks/screen_lr.py): only CRD's moved. CRD's screen
# tied weight 1 at teacher logit scale 100 with weight 10 at the teacher's own scale (`crd_own_scale`);
# after both were screened over the learning rate, validation kept the first.
BASELINES = {
    "fd": {"train.method": "fd"},
    "crd": {"train.method": "crd", "distill.teacher_logit_scale": 100.0, "train.lr": 0.001},
    "icl": {"train.method": "icl", "distill.weight": 0.3},
    "tinyclip_affinity": {"train.method": "tinyclip_affinity", "distill.affinity_logit_scale": 12.5},
}
# Row name -> config overrides as dotted `section.key` (method and, for ablations, its settings).
ROWS: dict[str, dict] = {
    "no_kd": {"train.method": "clip"},
    "cid": {"train.method": "cid"},
    "cid_no_cluster": {"train.method": "cid", "cid.lambda_cd": 0.0},
    "cid_no_instance": {"train.method": "cid", "cid.lambda_id": 0.0},
    "cid_balanced": {"train.method": "cid", "train.subset": "balance/kept.npy"},
    "cid_random_subset": {"train.method": "cid", "train.subset": "balance/random.npy"},
    # ours, not the paper's: CID on the balanced subset plus CLIP-KD's relational term, its weight chosen on
    # validation (benchmarks/README.md)
    "cid_rd": {**BALANCED_CID, "cid.lambda_rd": 1.0},
    "cid_views2": {**BALANCED_CID, "embed.views": 2},
    "cid_views4": {**BALANCED_CID, "embed.views": 4},
    "cid_ensemble": CID_ENSEMBLE,
    "cid_ensemble_rd": {**CID_ENSEMBLE, "cid.lambda_rd": 1.0},
    **BASELINES,
    "crd_own_scale": {"train.method": "crd", "distill.weight": 10.0},
    # each baseline on the 2-view cache: the reinforced cache is one flag for every method that reads it
    **{f"{name}_views2": {**setting, "embed.views": 2} for name, setting in BASELINES.items()},
    # CRD at its origin settings under open_clip's name: one gradient with `crd` at its origin (weight 1,
    # the teacher's own logit scale), so not in the grid
    "openclip_distill": {"train.method": "openclip_distill"},
    # ComKD: `prompt_teacher` (stage 1) must come before the rows that distil from it.
    "prompt_teacher": {
        "train.role": "teacher",
        "train.method": "prompt_teacher",
        "train.steps": 200,
        "train.batch_size": 32,  # 16 shots of each of the 5 base classes: 80 labelled images
        "train.weight_decay": 0.0,
        "data.shots": 16,
        "comkd.vpt_depth": 6,
        "comkd.vpt_tokens": 4,
        **COMKD_TARGET,
        "eval.protocol": "base_to_novel",  # stage 1 is about the target: no shifts of the clean images
    },
    # the stage-2 student as it starts: one step at learning rate 0 saves it unchanged
    "student_zeroshot": {
        "train.method": "comkd",
        **STAGE2,
        "train.steps": 1,
        "train.lr": 0.0,
        "train.warmup_steps": 0,
    },
    "promptkd": {**PROMPTKD, **STAGE2},
    "comkd": {**COMKD, **STAGE2},
    "comkd_no_ifalign": {**COMKD, "comkd.use_ifalign": False, **STAGE2},
    "comkd_no_eduattention": {**COMKD, "comkd.use_eduattention": False, **STAGE2},
    "comkd_inductive": {**COMKD, "comkd.inductive": True, **STAGE2},
    "promptkd_inductive": {**PROMPTKD, "comkd.inductive": True, **STAGE2},
}
METRICS = (
    "params",
    "zeroshot_top1",
    "linear_probe_top1",
    "retrieval_i2t_r1",
    "retrieval_t2i_r1",
    "base_acc",
    "novel_acc",
    "hm",
    "domain_shift_avg",
    "train_seconds",
)


def row_config(cfg: RunConfig, row: str, seed: int) -> RunConfig:
    """The config that trains lab row `row` for `seed` (in its own folder, see `runs.seed_run_name`)."""
    if row not in ROWS:
        raise ValueError(f"unknown lab row {row!r}; known rows: {sorted(ROWS)}")
    name = seed_run_name(row, seed, cfg.lab.seeds)
    # distillation rows log each loss term's gradient share on their first seed (on log steps only;
    # training is unchanged): one backward pass per term on each log step, about 5% of a lab job
    distills = needs_teacher_cache(ROWS[row].get("train.method", cfg.train.method))
    shares = cfg.lab.grad_share and distills and seed == cfg.lab.seeds[0]
    overrides = {"train.name": name, "train.seed": seed, "train.role": "student", "train.grad_share": shares}
    return replace(cfg, overrides | ROWS[row])


def _needs_clusters(cfg: RunConfig) -> bool:
    """Whether a configured row trains CLIP-CID (then `balance` and `cluster` run after `embed`)."""
    return any(ROWS.get(row, {}).get("train.method") == "cid" for row in cfg.lab.rows)


# ComKD's EduAttention, logged on every log step: its attention's entropy / log K (1: uniform) and gate α
ATTENTION_KEYS = ("attention_entropy", "alpha")


def logged_diagnostics(folder: Path) -> dict[str, float]:
    """Means over a train folder's log steps (metrics.jsonl) of `grad_share/<term>` (runs with
    `--train.grad_share true`) and, for ComKD with EduAttention, of `ATTENTION_KEYS`; empty without."""
    path = folder / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    records = [json.loads(line) for line in lines if line.strip()]
    keys = sorted({key for r in records for key in r if key.startswith("grad_share/")})
    if any("attention_entropy" in r for r in records):
        keys += ATTENTION_KEYS
    return {key: statistics.fmean(r[key] for r in records if key in r) for key in keys}


def evaluated(cfg: RunConfig, name: str) -> dict:
    """Eval metrics of train folder `name`, reused while the model and eval settings are unchanged, with
    its training seconds and logged diagnostics."""
    folder = model_dir(cfg, name)
    key = fingerprint({"done": read_json(folder / "done.json"), "eval": to_dict(cfg.eval)})
    cached = folder / f"{eval_stem(cfg)}.json"
    if cached.is_file() and read_json(cached).get("eval_fingerprint") == key:
        metrics = read_json(cached)
    else:
        metrics = run_eval(replace(cfg, {"train.name": name})) | {"eval_fingerprint": key}
        write_json(cached, metrics)
    seconds = read_json(folder / "done.json")["train_seconds"]
    return metrics | {"train_seconds": seconds} | logged_diagnostics(folder)


def val_zeroshot(cfg: RunConfig, name: str) -> float:
    """Zero-shot top-1 of train folder `name` on the lab's validation split, where the screens choose
    every setting (kept in its `eval_val.json` like `evaluated` keeps the test split's)."""
    return evaluated(replace(cfg, {"eval.split": "val"}), name)["zeroshot_top1"]


def train_teacher(cfg: RunConfig, seed: int = 0, name: str = "teacher") -> dict:
    """The lab teacher (`name` trained with `seed`: the ensemble's second teacher is another seed)."""
    teacher_cfg = replace(
        cfg,
        {
            "train.role": "teacher",
            "train.method": "clip",
            "train.name": name,
            "train.steps": cfg.lab.teacher_steps,
            "train.lr": cfg.lab.teacher_lr,
            "train.augment": cfg.lab.teacher_augment,
            "train.seed": seed,
            "teacher.pretrained": "",  # trained from scratch here (the text tower is pretrained)
        },
    )
    return train(teacher_cfg)


def summarize(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def run_rows(cfg: RunConfig) -> dict[str, dict]:
    """Train and evaluate every configured row for every seed; returns per-row metric summaries."""
    teacher = evaluated(cfg, "teacher")
    results = {"teacher": {m: summarize([teacher[m]]) for m in METRICS if m in teacher}}
    if any(ROWS.get(row, {}).get("train.method") == "prompt_teacher" for row in cfg.lab.rows):
        # the hand-prompted teacher on ComKD's target: the row stage 1 improves on
        target = evaluated(replace(cfg, COMKD_TARGET), "teacher")
        protocol = ("zeroshot_top1", "base_acc", "novel_acc", "hm", "domain_shift_avg")
        results["teacher_zeroshot"] = {m: summarize([target[m]]) for m in protocol}
    jobs = [
        (row, seed)
        for row in cfg.lab.rows
        for seed in (cfg.lab.seeds[:1] if row in cfg.lab.first_seed_rows else cfg.lab.seeds)
    ]
    for row, seed in jobs:  # what a row reads besides the plain cache, built here once (reused after)
        run_cfg = row_config(cfg, row, seed)
        if run_cfg.embed.ensemble:
            train_teacher(cfg, seed=1, name=SECOND_TEACHER)
        if run_cfg.data.domain or run_cfg.embed.views > 1 or run_cfg.embed.ensemble:
            run_embed(run_cfg)
    metrics = run_jobs(cfg, jobs)
    for row in cfg.lab.rows:
        per_seed = [metrics[job] for job in jobs if job[0] == row]
        keys = [m for m in METRICS if m in per_seed[0]] + diagnostic_keys(per_seed)
        results[row] = {m: summarize([float(s[m]) for s in per_seed if m in s]) for m in keys}
    return results


def train_and_evaluate(cfg: RunConfig, row: str, seed: int) -> dict:
    """One job of the grid: train `row` for `seed` (resumed or reused) and evaluate it."""
    run_cfg = row_config(cfg, row, seed)
    train(run_cfg)
    return evaluated(run_cfg, run_cfg.train.name)


def reads_prompt_teacher(row: str) -> bool:
    """ComKD's stage-2 rows distil from the same seed's `prompt_teacher`: they wait for it."""
    return ROWS[row].get("train.method") in ("promptkd", "comkd")


def run_jobs(cfg: RunConfig, jobs: list[tuple[str, int]]) -> dict[tuple[str, int], dict]:
    """Each (row, seed) job's metrics. With `lab.jobs` > 1 they run that many at a time, each in a fresh
    process with `threads // lab.jobs` threads: small models use two single-threaded trainings better
    than one two-threaded one. Stage-2 rows start once every other job has finished."""
    if cfg.lab.jobs == 1:
        return {job: train_and_evaluate(cfg, *job) for job in jobs}
    threads = max(1, torch.get_num_threads() // cfg.lab.jobs)
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's thread pool
    pool = ProcessPoolExecutor(cfg.lab.jobs, mp_context=context, initializer=_worker_init, initargs=[threads])
    metrics = {}
    with pool:
        try:
            for wave in job_waves(jobs):
                futures = {pool.submit(logged_job, cfg, *job): job for job in wave}
                for future in as_completed(futures):
                    row, seed = job = futures[future]
                    metrics[job] = future.result()
                    seconds = metrics[job]["train_seconds"]
                    print(
                        f"[{len(metrics)}/{len(jobs)}] {row} seed {seed}: trained in {seconds:.0f} s",
                        flush=True,
                    )
        except BaseException:
            pool.shutdown(cancel_futures=True)  # a failed job stops the grid, as it does one job at a time
            raise
    return {job: metrics[job] for job in jobs}


def logged_job(cfg: RunConfig, row: str, seed: int) -> dict:
    """A job in its own process, its progress bars written to `<run_dir>/logs/<row>_seed<S>.log`: two
    jobs' bars on one terminal overwrite each other."""
    path = job_log(cfg, row, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as log, contextlib.redirect_stderr(log):
        return train_and_evaluate(cfg, row, seed)


def job_log(cfg: RunConfig, row: str, seed: int) -> Path:
    return Path(cfg.run_dir) / "logs" / f"{row}_seed{seed}.log"


def job_waves(jobs: list[tuple[str, int]]) -> list[list[tuple[str, int]]]:
    """The jobs in the order they may run at once: everything but ComKD's stage 2, then stage 2."""
    stage2 = [job for job in jobs if reads_prompt_teacher(job[0])]
    return [[job for job in jobs if job not in stage2], stage2]


def _worker_init(threads: int) -> None:
    """A job process: its share of the threads, and killed with the bench (a `kill -9` of the bench must
    not leave a training behind that a rerun would race)."""
    torch.set_num_threads(threads)
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def diagnostic_keys(per_seed: list[dict]) -> list[str]:
    """The diagnostics any seed of a row logged (shares on the first seed only, see `row_config`)."""
    return sorted({k for s in per_seed for k in s if k.startswith("grad_share/") or k in ATTENTION_KEYS})


def format_shares(row: dict) -> str:
    """One row's mean gradient shares as `clip 0.42 kd 0.58` ("" without)."""
    terms = [key for key in row if key.startswith("grad_share/")]
    return " ".join(f"{key.removeprefix('grad_share/')} {row[key]['mean']:.2f}" for key in terms)


def format_attention(row: dict) -> str:
    """ComKD's attention as `H/logK 0.003 α 0.09` (means over log steps and seeds; "" without)."""
    if "attention_entropy" not in row:
        return ""
    return f"H/logK {row['attention_entropy']['mean']:.3f} α {row['alpha']['mean']:.2f}"


def format_table(results: dict[str, dict]) -> str:
    """The rows as Markdown: mean ± std of each metric, `shares`, each loss term's mean share of the
    gradient (the seeds trained with `train.grad_share`), and ComKD's `attention` diagnostics."""
    columns = [m for m in METRICS if any(m in r for r in results.values())]
    extras = {"shares": format_shares, "attention": format_attention}
    extras = {name: fmt for name, fmt in extras.items() if any(fmt(r) for r in results.values())}
    header = columns + list(extras)
    lines = ["| row | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for name, row in results.items():
        cells = []
        for m in columns:
            if m not in row:
                cells.append("")
            elif m == "params":
                cells.append(f"{row[m]['mean'] / 1e6:.2f}M")
            elif len(row[m]["values"]) > 1:
                cells.append(f"{row[m]['mean']:.2f} ± {row[m]['std']:.2f}")
            else:
                cells.append(f"{row[m]['mean']:.2f}")
        cells += [fmt(row) for fmt in extras.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(cfg: RunConfig) -> dict:
    """Teacher -> embed -> students -> eval -> `<run_dir>/results.json` (docs/architecture.md)."""
    start = time.time()
    stage_seconds = {}
    tick = time.time()
    train_teacher(cfg)
    stage_seconds["teacher"] = round(time.time() - tick, 1)
    tick = time.time()
    run_embed(cfg)
    stage_seconds["embed"] = round(time.time() - tick, 1)
    if _needs_clusters(cfg):
        tick = time.time()
        run_balance(cfg)
        run_cluster(cfg)
        stage_seconds["balance_and_cluster"] = round(time.time() - tick, 1)
    tick = time.time()
    results = run_rows(cfg)
    stage_seconds["students_and_eval"] = round(time.time() - tick, 1)
    report = {"results": results, "config": to_dict(cfg), "stage_seconds": stage_seconds, "host": host_info()}
    write_json(Path(cfg.run_dir) / cfg.lab.results, report)
    print(format_table(results))
    print(f"wrote {Path(cfg.run_dir) / cfg.lab.results} in {time.time() - start:.0f} s")
    return {"results": str(Path(cfg.run_dir) / cfg.lab.results), "stage_seconds": stage_seconds}
