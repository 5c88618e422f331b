"""Nothing silent on bad input: `embed` that skips most samples stops with one line saying why (and where
relative paths were looked for), the skips are in report.json, and training on nothing stops before a step."""

from __future__ import annotations

import csv
import json

import pytest

from clipdistill.checkpoint import read_json
from clipdistill.cli import main as cli_main
from clipdistill.config import ConfigError, load_config
from clipdistill.curate.stages import run_cluster
from clipdistill.embed import TooManySkipped, run_embed
from clipdistill.train import train
from own_data import write_table


def _args(run_dir, table, *extra):
    return [
        "--run_dir", str(run_dir), "--data.kind", "csv", "--data.path", str(table),
        "--data.caption_key", "title", "--teacher.name", "lab-student-tiny", "--teacher.pretrained", "random",
        "--student.name", "lab-student-tiny", "--embed.device", "cpu", "--embed.batch_size", "8",
        "--train.device", "cpu", "--train.batch_size", "4", "--train.steps", "2",
        "--cluster.n_clusters", "3", *extra,
    ]  # fmt: skip


def _rewrite(table, out, change):
    rows = list(csv.DictReader(open(table)))
    for i, row in enumerate(rows):
        change(i, row)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


@pytest.fixture
def table(tmp_path):
    return write_table(tmp_path / "data", per_class=4)


def test_paths_relative_to_the_working_folder_are_refused_with_a_hint(tmp_path, table, monkeypatch, capsys):
    """The table sits in another folder but its paths are written from the working folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lists").mkdir()
    moved = _rewrite(
        table, tmp_path / "lists" / "pairs.csv", lambda i, r: r.update(filepath=f"data/{r['filepath']}")
    )
    assert cli_main(["embed", *_args(tmp_path / "run", moved)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (err,) = [line for line in err.splitlines() if line.startswith("clipdistill embed:")]
    assert "all 12 samples were skipped" in err and "12 missing_file" in err
    assert (
        f"relative to the table's folder {tmp_path / 'lists'}; found 0 of 12 there, 12 relative to the" in err
    )
    report = read_json(tmp_path / "run" / "cache" / "report.json")
    assert report["skipped_by_reason"] == {"missing_file": 12}
    assert report["skipped_examples"]["missing_file"] == ["0", "1", "2", "3", "4"]


def test_a_few_bad_samples_are_counted_not_fatal(tmp_path, table):
    (table.parent / "images" / "red_circle" / "001.png").write_bytes(b"not a png")
    bad = _rewrite(table, table.parent / "some_bad.csv", lambda i, r: i == 5 and r.update(title=""))
    report = run_embed(load_config(None, _args(tmp_path / "run", bad)))
    assert report["valid_samples"] == 10 and report["skipped_total"] == 2
    assert sum(report["skipped_by_reason"].values()) == 2
    assert {k for ids in report["skipped_examples"].values() for k in ids} == {"1", "5"}
    with pytest.raises(TooManySkipped, match="more than embed.max_skip_fraction 0.1"):
        run_embed(load_config(None, _args(tmp_path / "strict", bad, "--embed.max_skip_fraction", "0.1")))


def test_an_empty_table_is_refused_before_a_cache_is_made(tmp_path, table):
    empty = table.parent / "empty.csv"
    empty.write_text(table.read_text().splitlines()[0] + "\n")  # the header only
    with pytest.raises(ValueError, match="empty.csv holds no sample .csv.: nothing to embed"):
        run_embed(load_config(None, _args(tmp_path / "run", empty)))
    assert not (tmp_path / "run" / "cache").exists()


def test_training_on_nothing_stops_before_a_step(tmp_path, table):
    gone = _rewrite(table, table.parent / "gone.csv", lambda i, r: r.update(filepath=f"nowhere/{i}.png"))
    # no cache: every batch comes out empty
    with pytest.raises(ValueError, match="every sample of the batch was skipped"):
        train(load_config(None, _args(tmp_path / "a", gone)))
    assert not (tmp_path / "a" / "clip" / "checkpoint.pt").exists()
    # all skipped is refused whatever the fraction; the cache it leaves has no valid sample
    with pytest.raises(TooManySkipped, match="all 12 samples were skipped: 12 missing_file"):
        run_embed(load_config(None, _args(tmp_path / "b", gone, "--embed.max_skip_fraction", "1")))
    with pytest.raises(ConfigError, match="no sample to train on: 0 of 12 samples are valid"):
        train(load_config(None, _args(tmp_path / "b", gone)))
    with pytest.raises(ValueError, match="has no valid sample"):
        run_cluster(load_config(None, _args(tmp_path / "b", gone)))


def test_curation_reads_the_cache_of_the_data_domain(tmp_path, table):
    cfg = load_config(None, _args(tmp_path / "run", table, "--data.domain", "blurred"))
    run_embed(cfg)
    assert (tmp_path / "run" / "cache_blurred" / "meta.json").is_file()
    assert not (tmp_path / "run" / "cache").exists()
    report = run_cluster(cfg)
    assert report["clustered_samples"] == 12
    assert json.loads((tmp_path / "run" / "cluster" / "report.json").read_text())["n_clusters"] == 3
