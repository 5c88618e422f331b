"""Reliability through the CLI: a corpus of broken samples (as a table and as WebDataset shards, one
cut short), bad configs and widths, malicious checkpoints, a full or read-only disk, and SIGKILL at
random points of balance, cluster, eval and export (embed and train: test_cache.py, test_train.py)."""

from __future__ import annotations

import errno
import io
import json
import random
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cid_fixtures import build_tiny_cache, stage_args
from clipdistill.checkpoint import safe_torch_load
from clipdistill.cli import main
from conftest import needs_lab, pairs_overrides, run_cli, tiny_overrides

# ---------------------------------------------------------------- bad-input corpus


def _image_bytes(fmt: str, mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8))
    if mode == "CMYK":
        img = img.convert("CMYK")
    elif mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (28, 28), dtype=np.uint16))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _huge_paletted_png(width: int = 20000, height: int = 20000) -> bytes:
    """A few hundred bytes whose header says width x height: decoding it would take 400 MB."""
    buf = io.BytesIO()
    Image.new("P", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[12:29])  # chunk type + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


# file name -> (bytes or None for a missing file, caption bytes, expected skip reason or None)
BAD_ROWS = {
    "trunc.jpg": (_image_bytes("JPEG")[:300], b"a truncated jpeg", "truncated"),
    "trunc.png": (_image_bytes("PNG")[:300], b"a truncated png", "truncated"),
    "zero.jpg": (b"", b"an empty file", "empty_file"),
    "text.jpg": (b"this is not an image\n", b"a text file", "unreadable"),
    "huge.png": (_huge_paletted_png(), b"a decompression bomb", "too_large"),
    "missing.png": (None, b"a missing file", "missing_file"),
    "nocaption.png": (_image_bytes("PNG", seed=1), b"", "empty_caption"),
    "latin1.png": (_image_bytes("PNG", seed=2), b"caf\xe9 \xff\xfe", "bad_caption_encoding"),
}
# usable despite an unusual format: converted to RGB, not skipped
ODD_BUT_GOOD = {
    "cmyk.jpg": _image_bytes("JPEG", "CMYK", seed=3),
    "deep16.png": _image_bytes("PNG", "I;16", seed=4),
}
NUM_ROWS = 40


def _corpus(folder: Path) -> tuple[Path, dict[str, str]]:
    """A 40-row CSV (key,filepath,title) in `folder`; returns it and {key: expected skip reason}."""
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, bytes]] = []
    expected = {}
    for i, (name, (data, caption, reason)) in enumerate(BAD_ROWS.items()):
        if data is not None:
            (folder / name).write_bytes(data)
        rows.append((f"bad{i}", name, caption))
        expected[f"bad{i}"] = reason
    for i, (name, data) in enumerate(ODD_BUT_GOOD.items()):
        (folder / name).write_bytes(data)
        rows.append((f"odd{i}", name, b"an odd but usable image"))
    for i in range(NUM_ROWS - len(rows)):
        name = f"good{i}.{'png' if i % 2 else 'jpg'}"
        (folder / name).write_bytes(_image_bytes("PNG" if i % 2 else "JPEG", seed=100 + i))
        rows.append((f"good{i}", name, f"a photo of thing {i}".encode()))
    random.Random(0).shuffle(rows)  # bad rows spread over the shards
    lines = [b"key,filepath,title"] + [b",".join([k.encode(), f.encode(), c]) for k, f, c in rows]
    path = folder / "pairs.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, expected


def _csv_args(run_dir: Path, csv: Path, *extra: str) -> list[str]:
    return tiny_overrides(
        run_dir,
        "--teacher.pretrained", "random",
        "--data.kind", "csv",
        "--data.path", str(csv),
        "--data.id_key", "key",
        "--embed.shard_size", "16",
        "--embed.batch_size", "8",
        "--train.batch_size", "8",
        "--train.steps", "3",
        "--train.ckpt_every", "3",
        *extra,
    )  # fmt: skip


def _one_error_line(stderr: str) -> str:
    """The one error line of a failed stage (progress bars aside), with no traceback."""
    assert "Traceback" not in stderr, stderr
    assert stderr.count("clipdistill ") == 1, stderr
    return stderr[stderr.index("clipdistill ") :].splitlines()[0]


def _main(args: list[str], capsys) -> tuple[int, str]:
    """The CLI in this process (no interpreter start-up): exit code and stderr."""
    code = main(args)
    return code, capsys.readouterr().err


@pytest.mark.slow
def test_bad_input_corpus_embed_then_train(tmp_path, capsys):
    csv, expected = _corpus(tmp_path / "data")
    run_dir = tmp_path / "run"
    code, err = _main(["embed", *_csv_args(run_dir, csv)], capsys)  # in this process: saves a start-up
    assert code == 0, err
    report = json.loads((run_dir / "cache" / "report.json").read_text())
    assert report["num_samples"] == NUM_ROWS
    assert report["skipped_total"] == len(expected)
    assert report["valid_samples"] == NUM_ROWS - len(expected)

    skipped = {}
    for shard in sorted((run_dir / "cache").glob("shard_*.json")):
        record = json.loads(shard.read_text())
        skipped |= {key: reason for reason, key in record["skipped"]}
        assert not {key for key, _ in record["skipped"]} & set(record["ids"])
    assert skipped == expected  # every bad row, with its reason; CMYK and 16-bit images are kept

    train = run_cli(["train", *_csv_args(run_dir, csv, "--train.method", "clip")], timeout=600)
    assert train.returncode == 0, train.stderr
    result = json.loads(train.stdout)
    assert result["train_samples"] == NUM_ROWS - len(expected)
    assert result["skipped_samples"] == 0  # the cache's bad rows never reach a batch
    assert (run_dir / "clip" / "model.safetensors").is_file()


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> list[int]:
    """A WebDataset shard (members key.ext); returns each sample's end offset in the file."""
    ends = []
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            ends.append(tar.offset)
    return ends


def _shard_corpus(folder: Path) -> tuple[str, dict[str, str], set[str], set[str]]:
    """The corpus as 3 shards of 16 samples, the middle one cut short inside its 9th sample.

    Returns the shard pattern, {key or shard: skip reason}, the keys a reader gets whole, and the keys
    the cut loses (the 9th on)."""
    folder.mkdir(parents=True, exist_ok=True)
    samples, reasons = [], {}
    for i, (name, (data, caption, reason)) in enumerate(BAD_ROWS.items()):
        ext = name.rsplit(".", 1)[1]
        samples.append((f"bad{i}", ({ext: data} if data is not None else {}) | {"txt": caption}))
        reasons[f"bad{i}"] = reason if data is not None else "missing_image"
    for i, data in enumerate(ODD_BUT_GOOD.values()):
        samples.append((f"odd{i}", {"png": data, "txt": b"an odd but usable image"}))
    while len(samples) < 48:
        i = len(samples)
        samples.append((f"good{i}", {"png": _image_bytes("PNG", seed=100 + i), "txt": f"thing {i}".encode()}))
    random.Random(1).shuffle(samples)
    shards = [samples[:16], samples[16:32], samples[32:]]
    ends = [_write_tar(folder / f"{n:03d}.tar", shard) for n, shard in enumerate(shards)]
    cut = (ends[1][7] + ends[1][8]) // 2  # inside the 9th sample of the middle shard
    (folder / "001.tar").write_bytes((folder / "001.tar").read_bytes()[:cut])
    lost = {key for key, _ in shards[1][8:]}
    expected = {k: r for k, r in reasons.items() if k not in lost} | {
        str(folder / "001.tar"): "truncated_shard"
    }
    good = {key for key, _ in samples} - lost - set(expected)
    return str(folder / "{000..002}.tar"), expected, good, lost


@pytest.mark.slow
def test_cut_shard_in_the_corpus_embed_then_train(tmp_path, capsys):
    pattern, expected, good, lost = _shard_corpus(tmp_path / "data")
    run_dir = tmp_path / "run"
    args = tiny_overrides(
        run_dir,
        "--teacher.pretrained", "random",
        "--data.kind", "webdataset",
        "--data.path", pattern,
        "--embed.shard_size", "16",
        "--embed.batch_size", "8",
        "--train.batch_size", "8",
        "--train.steps", "6",
        "--train.ckpt_every", "3",
        "--train.method", "clip",
    )  # fmt: skip
    code, err = _main(["embed", *args], capsys)
    assert code == 0, err
    report = json.loads((run_dir / "cache" / "report.json").read_text())
    num_records = 48 - len(lost) + 1  # the cut sample's place holds the shard's truncated_shard record
    assert report["num_samples"] == num_records
    assert report["skipped_total"] == len(expected)
    assert report["valid_samples"] == num_records - len(expected)

    ids, skipped = [], {}
    for shard in sorted((run_dir / "cache").glob("shard_*.json")):
        record = json.loads(shard.read_text())
        ids += [key for key in record["ids"] if key]  # "" on a skipped sample's row
        skipped |= {key: reason for reason, key in record["skipped"]}
    assert skipped == expected  # every bad sample with its reason, and the cut shard named
    assert sorted(ids) == sorted(good)  # the shard after the cut read whole: no sample pushed out

    train = run_cli(["train", *args], timeout=600)  # 6 steps of 8: past the end of the first epoch
    assert train.returncode == 0, train.stderr
    result = json.loads(train.stdout)
    # the samples embed found bad are left out of the stream before decoding: full batches, no skips
    assert result["steps"] == 6 and result["skipped_samples"] == 0
    assert result["train_samples"] == len(good)
    assert (run_dir / "clip" / "model.safetensors").is_file()


def _table(folder: Path, header: str, rows: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.png").write_bytes(_image_bytes("PNG"))
    path = folder / "pairs.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_missing_column_is_one_clear_line(tmp_path, capsys):
    csv = _table(tmp_path / "data", "key,filepath,caption", [f"k{i},a.png,x" for i in range(10)])
    code, err = _main(["embed", *_csv_args(tmp_path / "run", csv)], capsys)
    assert code != 0
    line = _one_error_line(err)
    assert str(csv) in line and "'title'" in line and "--data.caption_key" in line


def test_duplicate_ids_are_one_clear_line(tmp_path, capsys):
    csv = _table(tmp_path / "data", "key,filepath,title", [f"k{i % 7},a.png,x" for i in range(10)])
    code, err = _main(["embed", *_csv_args(tmp_path / "run", csv)], capsys)
    assert code != 0
    line = _one_error_line(err)
    assert str(csv) in line and "duplicate ids" in line and "--data.id_key" in line


# ---------------------------------------------------------------- bad configs


@pytest.mark.parametrize(
    ("override", "key"),
    [(("--train.bogus_key", "1"), "bogus_key"), (("--train.steps", "many"), "train.steps")],
)
@pytest.mark.parametrize("stage", ["embed", "train", "balance", "cluster", "eval", "export"])
def test_bad_config_fails_before_any_output(tmp_path, capsys, stage, override, key):
    run_dir = tmp_path / "run"
    code, err = _main([stage, *tiny_overrides(run_dir, *override)], capsys)
    assert code == 2, err
    line = _one_error_line(err)
    assert "config error" in line and key in line
    assert not run_dir.exists()


def _distill_run(tmp_path: Path, cache: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(cache, run_dir / "cache")
    return run_dir


def test_text_bank_of_another_width_is_refused_before_any_output(tmp_path, tiny_cache, capsys):
    """ComKD compares the cached teacher features with the text bank directly: widths must match."""
    run_dir = _distill_run(tmp_path, tiny_cache)  # a 32-wide teacher cache
    (run_dir / "prompt_teacher").mkdir()
    np.save(run_dir / "prompt_teacher" / "text_bank.npy", np.ones((10, 48), np.float32))
    code, err = _main(["train", *stage_args(tiny_cache, run_dir, "--train.method", "comkd")], capsys)
    assert code == 2, err
    line = _one_error_line(err)
    assert "width 32" in line and "48" in line and "must use the same teacher" in line
    assert not (run_dir / "comkd").exists()


@pytest.mark.parametrize("method", ["fd", "icl"])
def test_towers_of_two_widths_are_refused_before_any_output(tmp_path, tiny_cache, capsys, method):
    """fd and icl learn one projection into the teacher's space: a cache with image and text of two
    widths (a teacher without a shared embedding) has no such space."""
    run_dir = _distill_run(tmp_path, tiny_cache)
    meta = json.loads((run_dir / "cache" / "meta.json").read_text())
    assert meta["image_dim"] == meta["text_dim"] == 32
    meta |= {"image_dim": 40, "text_dim": 24}  # the same 64 columns, split otherwise
    (run_dir / "cache" / "meta.json").write_text(json.dumps(meta))
    code, err = _main(["train", *stage_args(tiny_cache, run_dir, "--train.method", method)], capsys)
    assert code == 2, err
    line = _one_error_line(err)
    assert f"train.method {method}" in line and "image 40 and text 24" in line
    assert not (run_dir / method).exists()


# ---------------------------------------------------------------- malicious checkpoints


class _Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("where", ["teacher", "resume"])
def test_malicious_checkpoint_is_refused_through_the_cli(tmp_path, capsys, synthetic_pairs, where):
    """A pickle that runs code, as the teacher's weights or as the checkpoint a run resumes from."""
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _Payload(marker)}, evil)
    run_dir = tmp_path / "run"
    if where == "teacher":
        args = ["embed", *pairs_overrides(run_dir, synthetic_pairs, "--teacher.pretrained", str(evil))]
    else:
        (run_dir / "clip").mkdir(parents=True)
        shutil.copy(evil, run_dir / "clip" / "checkpoint.pt")
        args = ["train", *pairs_overrides(run_dir, synthetic_pairs, "--train.method", "clip")]
    code, err = _main(args, capsys)
    assert code == 1, err
    assert "refused (weights_only=True)" in _one_error_line(err)
    assert not marker.exists()


# ---------------------------------------------------------------- disk full, read-only folder

# `clipdistill train` whose second checkpoint write hits a full disk or a read-only folder; the first
# checkpoint's bytes are copied to argv[2] just before.
FAILING_CHECKPOINT = """
import errno, os, shutil, sys
from pathlib import Path
import torch
import clipdistill.train as t
mode, backup = sys.argv[1], sys.argv[2]
real, calls = t.save_training_state, []

def no_space(state, f):
    Path(f).write_bytes(b"half a checkpoint")
    raise OSError(errno.ENOSPC, "No space left on device")

def refuse(src, dst):
    raise PermissionError(errno.EACCES, "Permission denied", str(dst))

def save(state, path):
    calls.append(path)
    if len(calls) == 2:
        shutil.copy(path, backup)
        if mode == "enospc":
            torch.save = no_space
        else:
            os.chmod(path.parent, 0o555)
            if os.access(path.parent, os.W_OK):  # root: the mode does not bind, refuse the rename instead
                os.replace = refuse
    real(state, path)

t.save_training_state = save
from clipdistill.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "message", "hint"),
    [("enospc", "No space left on device", "free disk space"), ("readonly", "Permission denied", "writable")],
)
def test_checkpoint_write_failure_keeps_previous(tmp_path, synthetic_pairs, mode, message, hint):
    run_dir, backup = tmp_path / "run", tmp_path / "first_checkpoint.pt"
    args = pairs_overrides(run_dir, synthetic_pairs, "--train.method", "clip")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", FAILING_CHECKPOINT, mode, str(backup), "train", *args],
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        if (run_dir / "clip").exists():
            (run_dir / "clip").chmod(0o755)
    assert proc.returncode == 1, proc.stderr
    line = _one_error_line(proc.stderr)
    assert line.startswith("clipdistill train: ") and message in line and hint in line
    out = run_dir / "clip"
    assert (out / "checkpoint.pt").read_bytes() == backup.read_bytes()
    assert safe_torch_load(out / "checkpoint.pt")["step"] == 2
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    assert not (out / "done.json").exists() and not (out / "model.safetensors").exists()


@needs_lab
def test_stage1_stopped_before_its_text_bank_is_not_taken_for_finished(
    tmp_path, lab_cache, capsys, monkeypatch
):
    """prompt_teacher writes the text bank (what ComKD stage 2 looks for) last: a disk that fills up
    before it leaves stage 2 refusing to start, and a rerun finishes stage 1."""
    from clipdistill.methods import prompt_teacher

    real = prompt_teacher.save_npy

    def no_space_for_the_bank(path, array):
        if path.name == prompt_teacher.TEXT_BANK:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, array)

    run_dir = _distill_run(tmp_path, lab_cache)
    stage1 = ["train", *stage_args(lab_cache, run_dir, "--train.role", "teacher")]
    stage1 += ["--train.method", "prompt_teacher", "--train.steps", "2"]
    stage2 = ["train", *stage_args(lab_cache, run_dir, "--train.method", "comkd", "--train.steps", "2")]
    monkeypatch.setattr(prompt_teacher, "save_npy", no_space_for_the_bank)
    code, err = _main(stage1, capsys)
    assert code == 1 and "No space left on device" in _one_error_line(err)
    folder = run_dir / "prompt_teacher"
    assert (folder / "split.json").is_file() and (folder / "model.safetensors").is_file()
    assert not (folder / "text_bank.npy").exists() and not (folder / "done.json").exists()
    code, err = _main(stage2, capsys)
    assert code == 2 and "needs the prompt-tuned teacher's text bank" in err and "Traceback" not in err

    monkeypatch.undo()
    assert _main(stage1, capsys)[0] == 0  # resumes at its last checkpoint and writes the rest
    assert (folder / "text_bank.npy").is_file() and (folder / "done.json").is_file()
    assert _main(stage2, capsys)[0] == 0


# ---------------------------------------------------------------- kill -9 of balance and cluster

# `clipdistill <stage>` with every output write slowed down, so that a kill lands between them
SLOW_CURATE = (
    "import sys, time, clipdistill.curate.stages as s; a, j = s.atomic_write, s.write_json; "
    "s.atomic_write = lambda *x: (time.sleep(0.3), a(*x))[1]; "
    "s.write_json = lambda *x: (time.sleep(0.3), j(*x))[1]; "
    "from clipdistill.cli import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return build_tiny_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def lab_cache(tmp_path_factory):
    return build_tiny_cache(tmp_path_factory, lab=True)


def _outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.is_dir() else {}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["balance", "cluster"])
def test_kill_9_then_rerun_is_byte_identical(tmp_path, tiny_cache, stage):
    def fresh(name: str) -> list[str]:
        shutil.copytree(tiny_cache, tmp_path / name / "cache")
        return stage_args(tiny_cache, tmp_path / name)

    assert main([stage, *fresh("uninterrupted")]) == 0  # in this process: no interpreter start-up
    expected = _outputs(tmp_path / "uninterrupted" / stage)
    assert "report.json" in expected

    rng = random.Random(stage)
    for attempt in range(2):
        args = fresh(f"killed{attempt}")
        folder = tmp_path / f"killed{attempt}" / stage
        proc = subprocess.Popen(
            [sys.executable, "-c", SLOW_CURATE, stage, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.time() + 300
            while not folder.is_dir() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.55))  # outputs are written ~0.3 s apart from here
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"{stage} finished before it could be killed"
        partial = {k: v for k, v in _outputs(folder).items() if not k.endswith(".tmp")}
        for name, data in partial.items():  # what is there under a final name is whole
            assert data == expected[name], name
        if "report.json" in partial:  # the done mark, written last: then everything is there
            assert partial == expected

        (folder / ".report.json.killed.tmp").write_text('{"half": ')  # as a kill mid-write leaves one

        rerun = run_cli([stage, *args], timeout=600)
        assert rerun.returncode == 0, rerun.stderr
        assert _outputs(folder) == expected  # the same bytes, and no temporary file left


# ---------------------------------------------------------------- kill -9 of eval and export

# `clipdistill <stage>` holding every written temporary file 0.3 s before its rename, so that kills land
# between writes and before renames
SLOW_WRITES = """
import contextlib, sys, time
import clipdistill.checkpoint as c
real = c.atomic_path

@contextlib.contextmanager
def slow(path):
    with real(path) as tmp:
        yield tmp
        time.sleep(0.3)

c.atomic_path = slow
from clipdistill.cli import main
sys.exit(main(sys.argv[1:]))
"""
# stage -> (what appears when its writes begin (a glob in the train folder), kill window in seconds after
# that, {done mark: the outputs it vouches for}); export writes 13 files, eval 2
KILL_WINDOWS = {
    "eval": (".eval.csv.*.tmp", 0.5, {"eval.json": ""}),
    "export": (
        "export",
        3.5,
        {"open_clip/open_clip_config.json": "open_clip/", "onnx/preprocess.json": "onnx/"},
    ),
}


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory):
    """A run folder with a tiny `clip` student trained in this process (4 steps)."""
    run_dir = tmp_path_factory.mktemp("trained")
    assert main(["train", *tiny_overrides(run_dir)]) == 0
    return run_dir


def _stage_outputs(folder: Path, stage: str) -> dict[str, bytes]:
    """Files under their final names; eval's without its timing (the last value), which varies."""
    if stage == "export":
        files = sorted(p for p in (folder / "export").rglob("*") if p.is_file() and p.suffix != ".tmp")
        return {str(p.relative_to(folder / "export")): p.read_bytes() for p in files}
    out = {}
    if (folder / "eval.json").is_file():
        metrics = json.loads((folder / "eval.json").read_text())
        del metrics["eval_seconds"]
        out["eval.json"] = json.dumps(metrics).encode()
    if (folder / "eval.csv").is_file():
        lines = (folder / "eval.csv").read_bytes().splitlines()
        out["eval.csv"] = b"\n".join(line.rsplit(b",", 1)[0] for line in lines)
    return out


def _leftover_tmp(folder: Path, stage: str) -> list[Path]:
    return list(folder.glob(".eval.*.tmp") if stage == "eval" else (folder / "export").rglob("*.tmp"))


@needs_lab
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["eval", "export"])
def test_kill_9_of_eval_or_export_then_rerun_matches(tmp_path, tiny_trained, stage):
    """Killed mid-way, a rerun gives the uninterrupted outputs (eval the same metrics, export the same
    bytes, ONNX included); what a kill leaves is whole, and complete wherever its done mark is."""

    def fresh(name: str) -> list[str]:
        shutil.copytree(tiny_trained, tmp_path / name)
        return [stage, *tiny_overrides(tmp_path / name), f"--{stage}.model", "clip"]

    assert main(fresh("uninterrupted")) == 0  # in this process: no interpreter start-up
    expected = _stage_outputs(tmp_path / "uninterrupted" / "clip", stage)
    trigger, window, marks = KILL_WINDOWS[stage]
    assert set(marks) <= set(expected)

    rng = random.Random(stage)
    for attempt in range(2):
        args = fresh(f"killed{attempt}")
        folder = tmp_path / f"killed{attempt}" / "clip"
        proc = subprocess.Popen(
            [sys.executable, "-c", SLOW_WRITES, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.time() + 300
            while not list(folder.glob(trigger)) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, window))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"{stage} finished before it could be killed"
        partial = _stage_outputs(folder, stage)
        for name, data in partial.items():  # what is there under a final name is whole
            assert data == expected[name], name
        for mark, prefix in marks.items():  # a done mark: then everything it vouches for is there
            if mark in partial:
                assert {k for k in expected if k.startswith(prefix)} <= set(partial), mark

        rerun = run_cli(args, timeout=600)
        assert rerun.returncode == 0, rerun.stderr
        assert _stage_outputs(folder, stage) == expected
        assert not _leftover_tmp(folder, stage)
