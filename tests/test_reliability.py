"""Reliability through the CLI: a corpus of broken samples, bad configs, a full or read-only disk,
and SIGKILL at random points of the curation stages."""

from __future__ import annotations

import io
import json
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cid_fixtures import STAGE_ARGS, build_tiny_cache
from clipdistill.checkpoint import safe_torch_load
from clipdistill.cli import main
from conftest import HAVE_LAB, needs_lab, run_cli, tiny_overrides

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
        "--teacher.pretrained", "",
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

    train = run_cli(["train", *_csv_args(run_dir, csv, "--train.method", "clip")], timeout=120)
    assert train.returncode == 0, train.stderr
    result = json.loads(train.stdout)
    assert result["train_samples"] == NUM_ROWS - len(expected)
    assert result["skipped_samples"] == 0  # the cache's bad rows never reach a batch
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
@pytest.mark.parametrize("stage", ["embed", "train", "balance", "cluster"])
def test_bad_config_fails_before_any_output(tmp_path, capsys, stage, override, key):
    run_dir = tmp_path / "run"
    code, err = _main([stage, *tiny_overrides(run_dir, *override)], capsys)
    assert code == 2, err
    line = _one_error_line(err)
    assert "config error" in line and key in line
    assert not run_dir.exists()


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


@needs_lab
@pytest.mark.parametrize(
    ("mode", "message", "hint"),
    [("enospc", "No space left on device", "free disk space"), ("readonly", "Permission denied", "writable")],
)
def test_checkpoint_write_failure_keeps_previous(tmp_path, mode, message, hint):
    run_dir, backup = tmp_path / "run", tmp_path / "first_checkpoint.pt"
    args = tiny_overrides(run_dir, "--train.method", "clip", "--data.val_size", "64")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", FAILING_CHECKPOINT, mode, str(backup), "train", *args],
            capture_output=True,
            text=True,
            timeout=120,
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
    if not HAVE_LAB:
        pytest.skip("Fashion-MNIST is not installed")
    return build_tiny_cache(tmp_path_factory)


def _outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.is_dir() else {}


@needs_lab
@pytest.mark.parametrize("stage", ["balance", "cluster"])
def test_kill_9_then_rerun_is_byte_identical(tmp_path, tiny_cache, stage):
    def fresh(name: str) -> list[str]:
        shutil.copytree(tiny_cache, tmp_path / name / "cache")
        return tiny_overrides(tmp_path / name, *STAGE_ARGS)

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
            deadline = time.time() + 90
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

        rerun = run_cli([stage, *args], timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        assert _outputs(folder) == expected  # the same bytes, and no temporary file left
