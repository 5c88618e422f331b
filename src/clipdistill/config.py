"""Typed run configuration: dataclasses, YAML files and `--section.key value` overrides.

A config is validated before any work starts: unknown keys, wrong types and values outside a
field's choices (its `Literal` type) are one clear error each, and the resolved config is written
next to every stage's outputs. The defaults here are generic; the lab's own values are in
`clipdistill/lab/lab.yaml` (`configs/lab.yaml`), which `demo` and `bench` always start from.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config that cannot run: raised before any work is done."""


# Settings that mean nothing outside a range, refused as the config loads: 0 steps would "finish" an
# untrained model, a batch of 0 would divide by zero mid-stage, a negative learning rate climbs the loss,
# and a fraction above 1 lets every sample be skipped.
AT_LEAST_ONE = frozenset(
    {
        "train.steps",
        "train.batch_size",
        "train.accum_steps",
        "train.log_every",
        "train.ckpt_every",
        "embed.batch_size",
        "embed.shard_size",
        "embed.views",
        "eval.batch_size",
        "balance.n_clusters",
        "cluster.n_clusters",
        "cluster.niter",
        "lab.teacher_steps",
        "lab.jobs",
    }
)
ABOVE_ZERO = frozenset(
    {
        "cid.scale",
        "cid.temperature",
        "cid.sample_rate",
        "comkd.temperature",
        "comkd.logit_scale",
        "comkd.attention_temperature",
        "comkd.base_fraction",
        "distill.crd_temperature",
        "embed.view_min_scale",
    }
)
AT_LEAST_ZERO = frozenset(
    {
        "train.lr",  # 0 saves the model as it starts (a baseline to score)
        "lab.teacher_lr",
        "train.weight_decay",
        "train.grad_clip",
        "cid.lambda_clip",
        "cid.lambda_cd",
        "cid.lambda_id",
        "cid.lambda_rd",
        "comkd.lambda_kd",
        "comkd.lambda_align",
        "distill.weight",
        "distill.clip_weight",
    }
)
AT_MOST_ONE = frozenset(
    {
        "train.augment",
        "lab.teacher_augment",
        "embed.max_skip_fraction",
        "embed.view_min_scale",
        "balance.keep_ratio",
        "cid.sample_rate",
        "comkd.base_fraction",
    }
)


def _check_range(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    if where in AT_LEAST_ONE and not value >= 1:
        raise ConfigError(f"{where} must be at least 1, not {value}")
    if where in ABOVE_ZERO and not value > 0:
        raise ConfigError(f"{where} must be above 0, not {value}")
    if where in AT_LEAST_ZERO | AT_MOST_ONE and not value >= 0:  # `not >=` also refuses nan
        raise ConfigError(f"{where} must be at least 0, not {value}")
    if where in AT_MOST_ONE and not value <= 1:
        raise ConfigError(f"{where} is a fraction: at most 1, not {value}")


# The choices of a field, checked when the config loads (before any model loads).
DataKind = Literal["lab", "csv", "webdataset", "paper", "folder"]
Domain = Literal["", "inverted", "rotated", "blurred", "low_contrast", "noise"]  # data/shifts.py
Role = Literal["student", "teacher"]
Method = Literal[  # methods/__init__.py registers one Task per name
    "clip", "cid", "prompt_teacher", "comkd", "promptkd",
    "fd", "crd", "icl", "tinyclip_affinity", "openclip_distill",
]  # fmt: skip
Optimizer = Literal["adamw", "sgd"]
Resume = Literal["auto", "never"]
Protocol = Literal["standard", "base_to_novel", "domain", "all"]
EvalSplit = Literal["test", "val"]
Suite = Literal["", "base_to_novel", "cross_dataset", "domain_generalization", "linear_probe"]
ExportFormat = Literal["open_clip", "onnx", "all"]
EduAttentionKind = Literal["mean_text", "cross"]  # losses/comkd.py
Reduction = Literal["mean", "sum"]
KdReduction = Literal["batchmean", "promptkd"]


@dataclass
class DataConfig:
    kind: DataKind = "lab"  # csv: csv, tsv or parquet; paper: a dataset of the papers' suites;
    # folder: one sub-folder of images per class (eval only)
    path: str = ""  # lab: folder of the Fashion-MNIST idx files ("" = Debian's); paper: the suites' root;
    # else table file or shards
    image_key: str = "filepath"  # csv: the image path column; webdataset: the image member's extensions,
    # comma-separated, first found first (the default: jpg,jpeg,png,webp)
    caption_key: str = "title"  # csv: the caption column; webdataset: as image_key (default: txt,caption)
    id_key: str = ""
    image_size: int = 32
    num_workers: int = 0
    val_size: int = 5000  # lab: images held out of the train split for model selection
    train_size: int = 0  # lab: 0 = every remaining train image
    label_key: str = ""  # csv: the class column of a labelled table (eval on your own data)
    split_key: str = "split"  # csv: the column of train/val/test rows, if the table has one
    classnames: str = ""  # own-data eval: class names, one per line, or JSON {"classnames", "templates"}
    domain: Domain = ""  # lab: a target domain, every image shifted (inverted, rotated, blurred, ...)
    dataset: str = ""  # paper: the dataset's name (clipdistill.data.paper.DATASETS), its train split is read
    shots: int = 16  # lab, paper: labelled images per base class for ComKD stage 1 (CoOp's draw; 0 = all)


@dataclass
class ModelConfig:
    name: str = ""  # open_clip model name, shipped config name (e.g. lab-teacher) or a JSON config path
    pretrained: str = ""  # open_clip pretrained tag or a local checkpoint (.safetensors / .pt)
    lock_text: bool = False  # LiT: freeze the text transformer (its projection still trains)


@dataclass
class TrainConfig:
    role: Role = "student"  # which model trains
    method: Method = "clip"
    name: str = ""  # output folder under the run dir; "" = the method name
    steps: int = 800
    batch_size: int = 128
    lr: float = 2e-3
    optimizer: Optimizer = "adamw"  # adamw (betas 0.9, 0.98) | sgd (momentum 0.9, as CoOp and PromptKD)
    weight_decay: float = 0.1
    warmup_steps: int = 50
    accum_steps: int = 1
    grad_clip: float = 1.0
    amp: bool = True  # bf16 autocast where the device supports it
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 20
    ckpt_every: int = 200
    resume: Resume = "auto"
    tensorboard: bool = False
    subset: str = ""  # kept-ids file (from `balance`) restricting the training samples
    # every log_every steps, each loss term's gradient norm on the parameters the terms share, and its share
    grad_share: bool = False
    # > 0: every image a run without a teacher cache trains on gets a random resized crop (area in
    # [augment, 1], aspect ratio 3/4..4/3) and a coin-flip mirror, drawn per (seed, step, sample) by
    # data/views.py; 0: the plain images. Distillation runs get their views from `embed --embed.views N`.
    augment: float = 0.0


@dataclass
class EmbedConfig:
    batch_size: int = 256
    shard_size: int = 8192
    device: str = "auto"
    max_skip_fraction: float = 0.5  # more skipped samples than this stops `embed` (the data is wrong)
    # A reinforced cache (data/views.py): per sample N views (view 0 the plain image, the others random
    # resized crops + flips) and the teacher's image embedding of each; `train` draws one per step.
    views: int = 1  # 1: the plain cache in cache/; N > 1: cache_views<N>/
    view_min_scale: float = 0.5  # smallest crop area, a fraction of the image (aspect ratio 3/4..4/3)
    view_seed: int = 0  # seeds every view's crop and flip
    # A teacher ensemble: the weights of more teachers of `teacher.name` (paths relative to the run dir
    # or absolute); the cache stores each one's embeddings (cache_ensemble<K>/) and readers get them
    # concatenated and scaled by 1/sqrt(K) (cache.py).
    ensemble: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    model: str = ""  # a train folder name under the run dir, or "teacher"
    batch_size: int = 512
    linear_probe: bool = True  # fit and score the linear probe (test split only)
    linear_probe_train: int = 10000  # train images used to fit the probe
    retrieval_size: int = 1000  # test images (and their captions) in the retrieval gallery
    protocol: Protocol = "standard"
    split: EvalSplit = "test"  # lab: val scores the held-out validation images (to choose settings on)
    device: str = "auto"
    suite: Suite = ""  # a paper suite (base_to_novel, cross_dataset, ...): one table over its datasets
    suite_root: str = ""  # the folder holding the suite's dataset folders (CoOp's DATASET.ROOT)


@dataclass
class CidConfig:
    """CLIP-CID (docs/methods.md): loss weights, the margin softmax over cluster prototypes, InfoNCE."""

    # CLIP loss weight: its one-hot targets call every other caption of the batch a negative, also one
    # that says the same (the lab's templated captions do); 0 = off
    lambda_clip: float = 1.0
    lambda_cd: float = 1.0  # cluster discrimination weight (0 = off)
    lambda_id: float = 1.0  # instance discrimination weight (0 = off)
    # relational term (not the paper's; 0 = off): CLIP-KD's CRD on the batch, student vs teacher
    # image<->text similarity distributions at T 1
    lambda_rd: float = 0.0
    # the teacher's logit scale in it: 100, the released CLIP models' value, chosen over the lab teacher's
    # own on validation (docs/methods.md); 0 = the teacher's own, from the cache (CLIP-KD's code)
    rd_teacher_logit_scale: float = 100.0
    scale: float = 32.0
    margin: float = 0.2
    learnable_prototypes: bool = False
    sample_rate: float = 1.0  # PartialFC: fraction of prototypes scored per step
    shard: bool = False  # shard prototypes across ranks
    temperature: float = 0.07
    clusters: str = "cluster"  # folder under the run dir written by `cluster`


@dataclass
class ComkdConfig:
    """ComKD-CLIP (docs/methods.md): stage 1 prompt tuning of the teacher, stage 2 distillation."""

    n_ctx: int = 4  # learnable text context tokens (CoOp), class name after them
    vpt_depth: int = 0  # VPT-deep: blocks that get fresh visual prompts (0 = text prompts only)
    vpt_tokens: int = 0  # visual prompt tokens per block (set with vpt_depth)
    base_fraction: float = 0.5  # share of classes that are "base" (labeled in stage 1); paper data: 0.5 or 1
    split_seed: int = 0
    eduattention: EduAttentionKind = "cross"  # cross: learned Q/K/V; mean_text: softmax(p·W_tᵀ/C)·W_t
    attention_scale: float = 1.0  # C in the mean_text EduAttention
    attention_heads: int = 1  # heads of the cross EduAttention
    attention_temperature: float = 0.01  # the cross EduAttention's learned temperature, its start (CLIP's τ)
    ifalign_reduction: Reduction = "sum"  # IFAlign's L1 norms over dimensions: sum (the paper's) or mean
    kd_reduction: KdReduction = "batchmean"  # promptkd: sum·T²/(batch x classes), PromptKD's code
    student_vpt_depth: int = 0  # stage 2: blocks of the student's ViT with deep visual prompts (0 = none)
    student_vpt_tokens: int = 4  # visual prompt tokens per block (with student_vpt_depth)
    freeze_backbone: bool = False  # stage 2: the student's image tower frozen (prompts and head train)
    temperature: float = 1.0  # T of the refinement KL
    logit_scale: float = 100.0  # τ⁻¹
    lambda_kd: float = 1.0
    lambda_align: float = 1.0
    use_ifalign: bool = True
    use_eduattention: bool = True
    prompt_teacher: str = "prompt_teacher"  # stage-1 folder under the run dir (prompts + text bank)
    # a trained student folder (e.g. cid) that stage 2 starts from, its image projection as P's skip
    student_init: str = ""
    inductive: bool = False  # stage 2 on base-class images only (default: transductive, all images)


@dataclass
class BalanceConfig:
    """Image semantic balance (docs/methods.md) over the teacher cache."""

    tau_p: float = 0.98  # perceptual pass: cosine at which two images count as the same
    n_clusters: int = 100
    tau_s: float = 0.9  # semantic pass: cosine above which a cluster member is dropped
    keep_ratio: float = 0.0  # 0 = use tau_s; else search tau_s to keep this fraction (within 1%)
    seed: int = 0


@dataclass
class ClusterConfig:
    """k-means over teacher embeddings: the centroids and labels of cluster discrimination."""

    n_clusters: int = 100
    use_text: bool = False  # cluster image+text concatenated
    niter: int = 20
    subset: str = ""  # kept-ids .npy from balance (relative to the run dir); "" = all valid samples
    seed: int = 0


# Each baseline at its origin's settings (docs/methods.md, "Each baseline at its origin's settings"):
# what a DistillConfig key left at None means for that `train.method`.
BASELINE_ORIGINS: dict[str, dict[str, Any]] = {
    "fd": {"weight": 2000.0},  # CLIP-KD script/methods/FD.sh: --alpha_fd_loss 2000
    "crd": {"weight": 1.0},  # CLIP-KD script/methods/CRD.sh: --alpha_ckd_loss 1 (DistillKL T=1)
    "icl": {"weight": 1.0, "icl_own_scale": True},  # CLIP-KD ICL.sh: --alpha_icl_loss 1, cross_logit_scale
    # TinyCLIP training/params.py: distillation_alpha 1 (the hard CLIP loss weighs 1 - alpha = 0);
    # its scripts pass --logit-scale 50 (the student's and the teacher's logit scale)
    "tinyclip_affinity": {"weight": 1.0, "clip_weight": 0.0, "affinity_logit_scale": 50.0},
    "openclip_distill": {},  # open_clip's DistillClipLoss: CLIP loss + soft cross-entropy, no weight
}
# What a None means for a method without an origin entry for that key.
_DISTILL_FALLBACK: dict[str, Any] = {
    "weight": 1.0, "icl_own_scale": False, "clip_weight": 1.0, "affinity_logit_scale": 0.0,
}  # fmt: skip


@dataclass
class DistillConfig:
    """The baselines (docs/methods.md): L = clip_weight * L_clip + weight * L_kd (openclip_distill
    already holds L_clip). A key left at None takes the method's origin value (BASELINE_ORIGINS)."""

    weight: float | None = None  # lambda of the distillation term (0 = plain CLIP)
    # the teacher's logit scale in crd, openclip_distill and tinyclip_affinity at affinity_logit_scale 0;
    # 0 = the teacher's own, recorded in the cache (as CLIP-KD's and open_clip's code use it)
    teacher_logit_scale: float = 0.0
    crd_temperature: float = 1.0  # softens both similarity distributions in crd
    icl_own_scale: bool | None = None  # icl: its own learnable cross-modal logit scale from 1/0.07
    clip_weight: float | None = None  # weight of the student's CLIP loss (0 = distillation alone)
    affinity_logit_scale: float | None = None  # tinyclip_affinity: one fixed scale for both sides
    # (0 = the student's learnable scale and teacher_logit_scale)

    def for_method(self, method: str) -> DistillConfig:
        """This config with every None replaced by `method`'s origin value."""
        origin = BASELINE_ORIGINS.get(method, {})
        values = {
            f.name: getattr(self, f.name) if getattr(self, f.name) is not None
            else origin.get(f.name, _DISTILL_FALLBACK.get(f.name))
            for f in dataclasses.fields(self)
        }  # fmt: skip
        return DistillConfig(**values)


@dataclass
class LabConfig:
    """What `demo` and `bench` run: the lab teacher's budget, the rows and the seeds."""

    teacher_steps: int = 600
    teacher_lr: float = 1e-3
    teacher_augment: float = 0.0  # the lab teacher's `train.augment` (0: plain images)
    rows: list[str] = field(default_factory=lambda: ["no_kd"])
    seeds: list[int] = field(default_factory=lambda: [0])
    first_seed_rows: list[str] = field(default_factory=list)  # rows trained on the first seed only
    grad_share: bool = True  # distillation rows log each loss term's gradient share on their first seed
    results: str = "results.json"  # written in the run dir
    # student trainings (with their evaluations) run at once, each in its own process with this share of
    # the threads; 1: one after another in this process. Results depend on the threads per training.
    jobs: int = 1


@dataclass
class ExportConfig:
    """`export`: a trained model as an open_clip folder and ONNX encoders, in <run_dir>/<model>/export/."""

    model: str = ""  # a train folder name under the run dir ("" = train.name or train.method)
    format: ExportFormat = "all"
    opset: int = 17


# Keys newer than some runs, at the value those runs trained with before the key existed (not always
# today's default): the training fingerprint leaves a key out at that value, so older runs still match,
# and `trained_config` reads an older run's config.yaml back with it.
NEWER_DEFAULTS = {
    "comkd": {"eduattention": "mean_text", "attention_heads": 1, "attention_temperature": 0.01,
              "ifalign_reduction": "mean", "kd_reduction": "batchmean", "student_vpt_depth": 0,
              "student_vpt_tokens": 4, "freeze_backbone": False},
    "cid": {"lambda_rd": 0.0, "rd_teacher_logit_scale": 100.0, "lambda_clip": 1.0},
    "distill": {"icl_own_scale": False, "clip_weight": 1.0, "affinity_logit_scale": 0.0},
    "train": {"augment": 0.0},
}  # fmt: skip


@dataclass
class RunConfig:
    run_dir: str = "runs/demo"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig = field(default_factory=lambda: ModelConfig(name="lab-teacher", lock_text=True))
    student: ModelConfig = field(default_factory=lambda: ModelConfig(name="lab-student"))
    train: TrainConfig = field(default_factory=TrainConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lab: LabConfig = field(default_factory=LabConfig)
    cid: CidConfig = field(default_factory=CidConfig)
    comkd: ComkdConfig = field(default_factory=ComkdConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, where: str, default: Any = None) -> Any:
    """Check (and gently convert) a value read from YAML or the command line."""
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of keys, got {value!r}")
        return _build(typ, value, where, default)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(typ)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None):
                try:
                    return _coerce(value, option, where)
                except ConfigError:
                    pass
        raise ConfigError(f"{where}: {value!r} is not a {typ}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(typ)[:1] or (Any,)
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if typ is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(typ)
        if value in choices:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if typ is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if typ is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if typ is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r} ({type(value).__name__})")


def _build(cls: type, values: dict, where: str, base: Any = None) -> Any:
    """`cls` from `values`; keys not given keep `base`'s values (the parent's defaults)."""
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        close = {k: difflib.get_close_matches(k, types_, n=1) for k in unknown}
        hints = "".join(f" ({k}: did you mean {m[0]!r}?)" for k, m in close.items() if m)
        raise ConfigError(
            f"{where or 'config'}: unknown key(s) {unknown}{hints}; known keys are {sorted(types_)}"
        )
    base = base if base is not None else cls()
    kwargs = {}
    for name, typ in types_.items():
        if name in values:
            key = f"{where}.{name}".lstrip(".")
            kwargs[name] = _coerce(values[name], typ, key, getattr(base, name))
            _check_range(kwargs[name], key)
        else:
            kwargs[name] = getattr(base, name)
    return cls(**kwargs)


def config_from_dict(values: dict, cls: type = RunConfig) -> Any:
    return _build(cls, values, "")


def trained_config(folder: str | Path) -> RunConfig:
    """The config a `train` run folder was trained with (its config.yaml); a key newer than the run
    takes the value the run had before the key existed (NEWER_DEFAULTS), not today's default."""
    values = yaml.safe_load((Path(folder) / "config.yaml").read_text())
    for section, older in NEWER_DEFAULTS.items():
        if section in values:
            values[section] = older | values[section]
    return config_from_dict(values)


def parse_overrides(args: list[str]) -> dict:
    """Turn `--train.steps 100 --data.kind csv` into a nested dict of raw strings."""
    if len(args) % 2:
        raise ConfigError(f"overrides {args}: expected pairs of `--section.key value`")
    nested: dict = {}
    for key, raw in zip(args[::2], args[1::2], strict=True):
        if not key.startswith("--"):
            raise ConfigError(f"override {key!r}: expected `--section.key value`")
        node = nested
        parts = key[2:].replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part} is not a section")
        node[parts[-1]] = raw
    return nested


def _typed_overrides(values: dict, cls: type, prefix: str = "") -> dict:
    """Parse raw override strings by the field's type: strings stay verbatim, the rest is YAML."""
    types_ = _field_types(cls)
    out = {}
    for key, value in values.items():
        typ = types_.get(key)
        if isinstance(value, dict):
            nested = dataclasses.is_dataclass(typ)
            out[key] = _typed_overrides(value, typ, f"{prefix}{key}.") if nested else value
        elif typ is str or typing.get_origin(typ) is Literal:  # choices are names: verbatim
            out[key] = value
        elif typ in (int, float):
            try:
                out[key] = typ(value)
            except ValueError as e:
                raise ConfigError(f"override --{prefix}{key} {value!r}: expected {typ.__name__}") from e
        else:
            try:
                out[key] = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ConfigError(f"override --{prefix}{key} {value!r}: not a valid value ({e})") from e
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error on one line: the problem and where (its own message spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or " ".join(str(e).split())
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def load_config(path: str | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults when `path` is None) and apply CLI overrides."""
    values: dict = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path} does not exist") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        values = loaded or {}
    if overrides:
        values = _merge(values, _typed_overrides(parse_overrides(overrides), RunConfig))
    return expand_run_dir(config_from_dict(values))


def replace(cfg: RunConfig, values: dict[str, Any]) -> RunConfig:
    """A copy of `cfg` with dotted `section.key` values set (`{"train.steps": 3}`), each checked as
    when a config loads: an unknown key, a wrong type or a value outside the choices is a ConfigError."""
    out = copy.deepcopy(cfg)
    for key, value in values.items():
        section, _, name = key.rpartition(".")
        parent = getattr(out, section, None) if section else out
        types_ = _field_types(type(parent)) if dataclasses.is_dataclass(parent) else {}
        if name not in types_:
            raise ConfigError(f"{key}: no such config key")
        setattr(parent, name, _coerce(value, types_[name], key, getattr(parent, name)))
        _check_range(getattr(parent, name), key)
    return out


def overridden(cfg: RunConfig, overrides: list[str]) -> dict[str, Any]:
    """The `section.key` values that `--section.key value` overrides gave `cfg`, typed as loaded: what
    to `replace` again over settings applied after loading (a lab row's), so the overrides still win."""
    values = {}
    for flag in overrides[::2]:
        key = flag.removeprefix("--").replace("-", "_")
        section, _, name = key.rpartition(".")
        values[key] = getattr(getattr(cfg, section) if section else cfg, name)
    return values


def expand_run_dir(cfg: RunConfig) -> RunConfig:
    """Replace `{run_dir}` in path options, so one config serves any run folder."""
    for section in (cfg.teacher, cfg.student, cfg.train, cfg.data):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, str) and "{run_dir}" in value:
                setattr(section, f.name, value.replace("{run_dir}", cfg.run_dir))
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def fingerprint(values: Any) -> str:
    """Short stable hash of a config (or any JSON-able value) to detect changed settings."""
    blob = json.dumps(values if isinstance(values, dict) else to_dict(values), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
