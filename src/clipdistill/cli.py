"""`clipdistill <stage> [--config run.yaml] [--section.key value ...]`: parse, call the stage, print."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

import yaml

from clipdistill.config import ConfigError, RunConfig, load_config, to_dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

STAGES = {
    "embed": "compute the teacher cache (image + text embeddings of every training sample)",
    "balance": "image semantic balance of the cache: kept ids (perceptual + semantic dedup)",
    "cluster": "k-means on the cached teacher embeddings: centroids and labels for cid",
    "train": "train a model with a method (clip, and the distillation recipes)",
    "eval": "zero-shot, linear probe and retrieval of a trained model on the lab or your labelled images "
    "(data.kind csv/folder; --protocol: base/novel, domain; "
    "--suite: a paper suite's datasets)",
    "demo": "the whole lab end to end: teacher, cache, students, evaluation, results table",
    "bench": "the full lab grid over 3 seeds in runs/bench: results.json, results.md, plots",
    "export": "a trained model as an open_clip folder and ONNX encoders (--format open_clip|onnx|all)",
    "predict": "zero-shot labels of image files or folders (clipdistill predict --help)",
    "embed-images": "embeddings of an image folder for retrieval: PATH.npy + PATH.ids.txt",
}

# The bench groups (lab/bench.py GROUPS; named here so that --help does not import the lab).
BENCH_GROUPS = ("cid", "baselines", "comkd", "reinforced", "comkd_protocols")


def _run_stage(stage: str, cfg: RunConfig, only: str | None = None) -> dict:
    if stage == "embed":
        from clipdistill.embed import run_embed

        return run_embed(cfg)
    if stage in ("balance", "cluster"):
        from clipdistill.curate.stages import run_balance, run_cluster

        return run_balance(cfg) if stage == "balance" else run_cluster(cfg)
    if stage == "train":
        from clipdistill.train import train

        return train(cfg)
    if stage == "eval" and cfg.eval.suite:
        from clipdistill.evaluate.suite import run_suite

        return run_suite(cfg)
    if stage == "eval":
        from clipdistill.evaluate.run import run_eval

        return run_eval(cfg)
    if stage == "demo":
        from clipdistill.lab import run_demo

        return run_demo(cfg)
    if stage == "bench":
        from clipdistill.lab import run_bench

        return run_bench(cfg, only)
    if stage == "export":
        from clipdistill.export import run_export

        return run_export(cfg)
    raise AssertionError(stage)


def _run_in_run_dir(stage: str, cfg: RunConfig, only: str | None = None) -> dict:
    """Run the stage in its run dir; the folders this command made for it (the run dir and its missing
    parents) that a refused stage left empty are removed again, so that a typo leaves no trace."""
    run_dir = Path(cfg.run_dir)
    made = [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()]  # deepest first
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _run_stage(stage, cfg, only)
    finally:
        for folder in made:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def _os_error_hint(e: OSError) -> str:
    kept = "files already finished and the last checkpoint are kept"
    if e.errno == errno.ENOSPC:
        return f"free disk space or point --run_dir at another disk; {kept}"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"make the output folder writable or point --run_dir elsewhere; {kept}"
    return "check the output folder and the disk"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("predict", "embed-images"):  # positional paths: their own parser
        from clipdistill.predict import main as predict_main

        return predict_main(argv)
    parser = argparse.ArgumentParser(
        prog="clipdistill",
        usage="clipdistill {embed,balance,cluster,train,eval,export,demo,bench} [--config FILE] "
        "[--section.key VALUE ...]\n       clipdistill {predict,embed-images} PATH [PATH ...] [options]",
        description="Distil a CLIP teacher into a small student. Every option of the config file can be "
        "overridden as --section.key value (e.g. --train.steps 200 --student.name lab-student).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="stages:\n" + "\n".join(f"  {k:8s} {v}" for k, v in STAGES.items()),
    )
    parser.add_argument("stage", choices=sorted(set(STAGES) - {"predict", "embed-images"}))
    parser.add_argument(
        "--config", help="YAML run config (defaults: the Fashion-MNIST lab; demo and bench read its file)"
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not one line")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--only", choices=BENCH_GROUPS, help="bench: one group of rows")
    parser.add_argument(
        "--protocol",
        choices=("standard", "base_to_novel", "domain", "all"),
        help="eval: short for --eval.protocol (base_to_novel: base/novel/HM; domain: shifted test sets)",
    )
    parser.add_argument("--format", choices=("open_clip", "onnx", "all"), help="export: --export.format")
    parser.add_argument(
        "--suite",
        help="eval: short for --eval.suite: every dataset of a paper suite (base_to_novel, cross_dataset, "
        "domain_generalization, linear_probe) under --eval.suite_root, one table with the average",
    )
    args, overrides = parser.parse_known_args(argv)
    if args.protocol:
        overrides = [*overrides, "--eval.protocol", args.protocol]
    if args.format:
        overrides = [*overrides, "--export.format", args.format]
    if args.suite:
        overrides = [*overrides, "--eval.suite", args.suite]
    try:
        if args.stage in ("demo", "bench"):
            from clipdistill.lab import LAB_CONFIG, bench_overrides

            args.config = args.config or str(LAB_CONFIG)
            if args.stage == "bench":  # its own run dir, seeds and rows unless given on the command line
                overrides = bench_overrides(overrides)
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            return 0
        result = _run_in_run_dir(args.stage, cfg, args.only)
    except (ConfigError, OSError, RuntimeError, ValueError) as e:  # FileNotFoundError is an OSError
        if args.debug:
            raise
        print(f"clipdistill {args.stage}: {_one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank returns the same result
        print(json.dumps(result, indent=2, default=str))
    return 0


def _one_line(e: Exception) -> str:
    """The error as one line a user can act on (--debug shows the traceback instead)."""
    if isinstance(e, ConfigError):
        return f"config error: {e}"
    if isinstance(e, FileNotFoundError | RuntimeError | ValueError):
        return f"{type(e).__name__}: {e}"
    return f"{e}; {_os_error_hint(e)}"  # disk full, read-only or unwritable output folder


if __name__ == "__main__":
    sys.exit(main())
