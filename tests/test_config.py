from pathlib import Path

import pytest
import yaml

from clipdistill.config import (
    NEWER_DEFAULTS,
    ConfigError,
    RunConfig,
    config_from_dict,
    fingerprint,
    load_config,
    replace,
    to_dict,
    trained_config,
)
from clipdistill.train import train


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert cfg.teacher.name == "lab-teacher" and cfg.teacher.lock_text is True


def test_yaml_file_and_overrides_are_typed(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run_dir: runs/x\ntrain:\n  steps: 10\n  lr: 1.0e-2\n  amp: true\ndata:\n  val_size: 7\n")

    cfg = load_config(str(path), ["--train.lr", "1e-3", "--train.amp", "false", "--train.steps", "20"])

    assert cfg.run_dir == "runs/x"
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.amp is False
    assert cfg.train.steps == 20 and isinstance(cfg.train.steps, int)
    assert cfg.data.val_size == 7  # from the file, untouched by the overrides
    assert cfg.train.batch_size == RunConfig().train.batch_size  # a default


def test_yaml_float_in_exponent_notation(tmp_path):
    # PyYAML reads `1e-3` (no dot) as a string; a float field still takes it
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1e-3\n  weight_decay: 5\n")
    cfg = load_config(str(path))
    assert cfg.train.lr == 1e-3
    assert cfg.train.weight_decay == 5.0 and isinstance(cfg.train.weight_decay, float)


def test_string_overrides_stay_verbatim():
    cfg = load_config(None, ["--train.name", "123", "--student.pretrained", "true"])
    assert cfg.train.name == "123"
    assert cfg.student.pretrained == "true"


def test_nested_override_keeps_the_parent_defaults(tmp_path):
    cfg = load_config(None, ["--teacher.pretrained", "x.safetensors"])
    assert cfg.teacher.pretrained == "x.safetensors"
    assert cfg.teacher.name == "lab-teacher"
    assert cfg.teacher.lock_text is True

    path = tmp_path / "run.yaml"
    path.write_text("teacher:\n  lock_text: false\n")
    cfg = load_config(str(path))
    assert cfg.teacher.name == "lab-teacher" and cfg.teacher.lock_text is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--train.stepz", "3"], "unknown key(s) ['stepz']"),
        (["--nosection.key", "3"], "unknown key(s) ['nosection']"),
        (["--train.steps", "many"], "--train.steps 'many': expected int"),
        (["--train.steps", "1.5"], "--train.steps '1.5': expected int"),
        (["--train.lr", "fast"], "--train.lr 'fast': expected float"),
        (["--train.amp", "maybe"], "train.amp: expected true or false"),
        (["--train.amp", "1"], "train.amp: expected true or false"),
        (["--train", "3"], "train: expected a mapping"),
        (["--train.steps"], "expected pairs"),
        (["train.steps", "3"], "expected `--section.key value`"),
    ],
)
def test_bad_overrides_are_one_clear_error(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  steps: ten\n", "train.steps: expected int, got 'ten'"),
        ("train:\n  amp: 1\n", "train.amp: expected true or false"),
        ("data:\n  kindd: lab\n", "data: unknown key(s) ['kindd']"),
        ("teacher: lab-teacher\n", "teacher: expected a mapping"),
        ("- a\n- b\n", "expected a mapping at the top level"),
        ("train: [unclosed\n", "is not valid YAML"),
        ("train:\n  steps: [1\n", "is not valid YAML: expected ',' or ']', but got '<stream end>' (line 3"),
    ],
)
def test_bad_files_are_one_clear_error(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


def test_dict_roundtrip_and_fingerprint():
    cfg = load_config(None, ["--train.lr", "1e-3"])
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg
    assert fingerprint(cfg) == fingerprint(to_dict(cfg))
    assert fingerprint(cfg) != fingerprint(load_config(None, ["--train.lr", "2e-3"]))


def test_train_writes_the_resolved_config(pairs_config):
    cfg = pairs_config("--train.lr", "1e-3", "--train.steps", "1")
    train(cfg)

    written = yaml.safe_load((Path(cfg.run_dir) / "clip" / "config.yaml").read_text())
    assert config_from_dict(written) == cfg
    assert written["train"]["lr"] == 1e-3 and written["teacher"]["name"] == "lab-student-tiny"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--train.method", "cdi"], "train.method: 'cdi' is not one of 'clip', 'cid', 'prompt_teacher'"),
        (["--train.optimizer", "adam"], "train.optimizer: 'adam' is not one of 'adamw', 'sgd'"),
        (["--data.kind", "tar"], "data.kind: 'tar' is not one of 'lab', 'csv', 'webdataset', 'paper'"),
        (["--eval.protocol", "full"], "eval.protocol: 'full' is not one of 'standard', 'base_to_novel'"),
        (["--export.format", "tflite"], "export.format: 'tflite' is not one of 'open_clip', 'onnx', 'all'"),
    ],
)
def test_choices_are_checked_when_the_config_loads(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)
    key, value = overrides[0][2:].split(".")[1], overrides[1]
    section = overrides[0][2:].split(".")[0]
    path = tmp_path / "run.yaml"
    path.write_text(f"{section}:\n  {key}: {value}\n")
    with pytest.raises(ConfigError, match=message.split(" is not")[0]):
        load_config(str(path))


def test_choices_match_what_the_code_implements():
    import typing

    from clipdistill.config import Domain, Suite
    from clipdistill.data import paper
    from clipdistill.data.shifts import DOMAIN_SHIFTS

    assert set(typing.get_args(Domain)) == {"", *DOMAIN_SHIFTS}
    assert set(typing.get_args(Suite)) == {"", *paper.SUITES}


def test_replace_is_typed_and_leaves_the_original():
    cfg = RunConfig()
    values = {"train.steps": 3, "cid.lambda_cd": 0, "run_dir": "other", "data.domain": "noise"}
    out = replace(cfg, values)
    assert (out.train.steps, out.cid.lambda_cd, out.run_dir, out.data.domain) == (3, 0.0, "other", "noise")
    assert isinstance(out.cid.lambda_cd, float) and cfg.train.steps == RunConfig().train.steps
    for values, message in [
        ({"train.stepz": 3}, "train.stepz: no such config key"),
        ({"nosection.key": 3}, "nosection.key: no such config key"),
        ({"train.steps": "3"}, "train.steps: expected int"),
        ({"train.role": "critic"}, "train.role: 'critic' is not one of 'student', 'teacher'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            replace(cfg, values)


def test_demo_and_bench_start_from_the_lab_file(capsys):
    from clipdistill.cli import main
    from clipdistill.lab import LAB_CONFIG

    lab = yaml.safe_load(LAB_CONFIG.read_text())
    assert (Path(__file__).parents[1] / "configs" / "lab.yaml").resolve() == LAB_CONFIG.resolve()  # one file
    for stage in ("demo", "bench"):
        assert main([stage, "--print-config"]) == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["train"]["steps"] == lab["train"]["steps"] != RunConfig().train.steps
        assert printed["cluster"]["n_clusters"] == lab["cluster"]["n_clusters"]
        assert printed["lab"]["teacher_steps"] == lab["lab"]["teacher_steps"]
    assert main(["train", "--print-config"]) == 0  # other stages: the code's defaults
    assert yaml.safe_load(capsys.readouterr().out)["train"]["steps"] == RunConfig().train.steps


def test_a_mistyped_key_names_the_close_one():
    with pytest.raises(ConfigError, match=r"caption_kye: did you mean 'caption_key'\?"):
        load_config(None, ["--data.caption_kye", "title"])


def test_trained_config_reads_an_older_run_with_the_values_it_trained_with(tmp_path):
    """A run folder whose config.yaml predates a key gets the value the run had then, not today's
    default (ComKD's attention and IFAlign defaults changed after such runs)."""
    values = to_dict(RunConfig())
    for section, keys in NEWER_DEFAULTS.items():
        for key in keys:
            values[section].pop(key)
    values["comkd"]["lambda_align"] = 0.5  # a key the run had keeps its value
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(values))
    trained = trained_config(tmp_path)
    assert (trained.comkd.eduattention, trained.comkd.ifalign_reduction) == ("mean_text", "mean")
    assert trained.comkd.lambda_align == 0.5
    assert (RunConfig().comkd.eduattention, RunConfig().comkd.ifalign_reduction) == ("cross", "sum")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_dict(RunConfig())))
    assert trained_config(tmp_path).comkd.eduattention == "cross"  # a newer run: as written


def test_overrides_set_again_over_a_lab_row_win_over_its_own_settings():
    from clipdistill.config import overridden, replace
    from clipdistill.lab import LAB_CONFIG, row_config

    args = ["--cid.lambda_rd", "2", "--train.lr", "0.001"]
    base = load_config(str(LAB_CONFIG), args)
    assert row_config(base, "cid_rd", 0).cid.lambda_rd == 1.0  # the row sets its own λ_rd over the config
    given = overridden(base, args)
    assert given == {"cid.lambda_rd": 2.0, "train.lr": 0.001}
    cfg = replace(row_config(base, "cid_rd", 0), given)
    assert (cfg.cid.lambda_rd, cfg.train.lr, cfg.train.method) == (2.0, 0.001, "cid")


@pytest.mark.parametrize(
    ("where", "value"),
    [("train.steps", 0), ("train.steps", -5), ("train.batch_size", 0), ("embed.batch_size", 0),
     ("embed.shard_size", -1), ("cluster.n_clusters", 0), ("train.ckpt_every", 0)],
)  # fmt: skip
def test_counts_below_one_are_refused_however_they_are_given(tmp_path, where, value):
    """0 steps would write a `done.json` over an untrained model; a batch of 0 divides by zero mid-stage."""
    message = f"{where} must be at least 1, not {value}"
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"--{where}", str(value)])
    section, key = where.split(".")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({section: {key: value}}))
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))
    with pytest.raises(ConfigError, match=message):
        replace(RunConfig(), {where: value})
    assert replace(RunConfig(), {where: 1}) is not None and load_config(None, [f"--{where}", "1"])


@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        ("train.lr", "-1", "must be at least 0, not -1.0"),
        ("cid.temperature", "nan", "must be above 0, not nan"),
        ("cid.lambda_cd", "-0.5", "must be at least 0, not -0.5"),
        ("distill.weight", "-2", "must be at least 0, not -2.0"),
        ("embed.max_skip_fraction", "2", "is a fraction: at most 1, not 2.0"),
        ("balance.keep_ratio", "1.2", "is a fraction: at most 1"),
        ("comkd.base_fraction", "0", "must be above 0"),
    ],
)
def test_settings_outside_their_range_are_refused_as_the_config_loads(where, value, message):
    """A negative learning rate climbs the loss; a skip fraction of 2 lets `embed` skip every sample."""
    with pytest.raises(ConfigError, match=f"{where} {message}".replace("(", r"\(")):
        load_config(None, [f"--{where}", value])
    with pytest.raises(ConfigError, match=f"{where} {message}".replace("(", r"\(")):
        replace(RunConfig(), {where: float(value)})
    assert load_config(None, ["--cid.lambda_cd", "0", "--embed.max_skip_fraction", "1"]).cid.lambda_cd == 0
