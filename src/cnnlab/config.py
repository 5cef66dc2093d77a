"""The one typed config: its field names are the CLI flags, the YAML keys, the sweep parameter names
and the logged hyperparameters. Defaults -> YAML file -> command-line flags, later ones winning.

Each field's metadata says what values it takes (`choices`, `min`, `max`) and carries its help text;
`validate` enforces them, so a bad value is one clear error before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, quote
from .io import atomic_write_text

ACTIVATIONS = ("relu", "gelu", "silu", "mish", "elu", "leaky_relu", "selu")
FILTER_ORGS = ("same", "double", "pyramid", "half")  # pyramid: the original notebook's name for double
OPTIMIZERS = ("adam", "adamw", "sgd", "nadam")
SCHEDULERS = ("none", "cosine", "onecycle")
FINETUNE = ("none", "head", "partial", "gradual", "full")
SAFE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"  # a run's or a sweep's folder name: one level, never outside
BOOLEAN_WORDS = {"true": "true", "yes": "true", "on": "true", "1": "true", "false": "false", "no": "false",
                 "off": "false", "0": "false"}  # what a yes/no field that also takes auto accepts
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _f(default: Any, help: str, **rules: Any) -> Any:
    return field(default=default, metadata={"help": help, **rules})


@dataclass
class Config:
    # data
    data: str = _f("data/demo", "data root holding train/<class>/ and val/<class>/ (val/ is the test set)")
    image_size: int = _f(0, "images are resized to image_size x image_size once, into the cache; 0: the model's own "
                            "(224 for smallcnn, the pretrained weights' input size: 299 for Inception v3)",
                         min=16, max=1024, auto=0)
    val_fraction: float = _f(0.2, "fraction of train/ held out, stratified, for validation", min=0.01, max=0.9)
    group_duplicates: bool = _f(True, "keep each cluster of near-duplicate training images (copies, re-encodings; "
                                      "see cnnlab check) on one side of the train/validation split, so validation "
                                      "accuracy is not inflated by copies of training images")
    augment: str = _f("auto", "augment training batches (horizontal flips, random resized crops, see crop_min, and "
                              "colour jitter, see jitter): true, false, or auto: on, except for finetune=head, whose "
                              "frozen backbone then runs once into the feature store (measured: the same test "
                              "accuracy at a fraction of the time, see docs/finetune.md)",
                      choices=("auto", "true", "false"), aliases=BOOLEAN_WORDS)
    crop_min: float = _f(1.0, "with augment: the random resized crop's smallest area, as a fraction of the image (1: "
                              "whole-area crops of jittered aspect ratio, the measured best for short runs; 0.25 is "
                              "Inception-style)", min=0.05, max=1.0)
    jitter: float = _f(0.0, "with augment: strength of the brightness, contrast and colour-balance jitter (0: off)",
                       min=0.0, max=1.0)
    progressive: float = _f(0.0, "progressive resizing: the first epoch trains on images of this fraction of "
                                 "image_size (e.g. 0.5), the side growing linearly to the full size by the middle "
                                 "epoch and full after it; validation and test at full size (0: off; measured in "
                                 "docs/recipe.md)", min=0.25, max=0.99, auto=0.0)
    # model
    model: str = _f("smallcnn", "smallcnn or any torchvision classification model name")
    weights: str = _f("none", "pretrained weights: a torchvision weights name (DEFAULT, IMAGENET1K_V2, ...), a timm tag "
                      "(DEFAULT, in1k, ...) for timm/ models, a .pth/.safetensors file, none (no pretrained weights), "
                      "or random (a randomly initialised backbone, frozen on purpose: cost measurements)")
    # The recipe defaults below (16 doubling filters, the whitened first conv, identity-initialised other convs,
    # AdamW 2e-3, cosine with 1 epoch of warm-up, weight decay 0.05, label smoothing 0.1, flip TTA) won
    # benchmarks/recipe.py on real photos over 3 seeds: see docs/recipe.md's tables.
    filters: int = _f(16, "filters in the first conv layer; filter_org derives the other four", min=1, max=4096)
    filter_org: str = _f("double", "same | double (alias pyramid) | half | five comma-separated counts like 16,32,64,128,256")
    kernel_size: str = _f("3", "conv kernel size: one value, or five comma-separated values")
    conv1_stride: int = _f(0, "stride of the first convolution; 0 (auto): 2 for images of 128 px and more, else 1. "
                              "At 2 the other four blocks work on maps half as wide, about a quarter of the FLOPs: "
                              "measured as accurate at 128 px and 5x faster (see docs/recipe.md)",
                           min=0, max=4)
    conv1_init: str = _f("whiten", "smallcnn's first convolution's initial weights: whiten (set from the covariance of "
                                   "patches of 256 training images, so the first layer starts out passing "
                                   "decorrelated features; measured to learn faster, see docs/recipe.md) "
                                   "or kaiming (torch's random init)", choices=("whiten", "kaiming"))
    conv_init: str = _f("dirac", "smallcnn's other four convolutions' initial weights: dirac (each conv's first "
                                 "in_channels filters start as the identity, passing their input through; the rest "
                                 "keep torch's init; measured to learn faster, see docs/recipe.md) or "
                                 "kaiming (torch's random init)", choices=("dirac", "kaiming"))
    activation: str = _f("relu", "activation after each conv and the dense layer", choices=ACTIVATIONS)
    batch_norm: bool = _f(True, "batch norm after each convolution")
    dropout: float = _f(0.2, "dropout before the output layer", min=0.0, max=0.95)
    dense_units: int = _f(256, "units in the dense layer", min=1, max=65536)
    global_pool: bool = _f(False, "average the last block's map over space before the dense layer (false: flatten "
                                  "it, as the assignment's network does)")
    # fine-tuning (torchvision models)
    finetune: str = _f("none", "what trains, starting from --weights: none (no pretrained weights: every layer trains "
                       "from scratch) | head (only the new head) | partial (all but the stem and the first "
                       "--freeze_stages stages) | gradual (the head, then one more stage every --unfreeze_every epochs) "
                       "| full (every layer)", choices=FINETUNE)
    freeze_stages: int = _f(0, "with finetune=partial only: the stem and this many stages stay frozen", min=0, max=64)
    unfreeze_every: int = _f(1, "with finetune=gradual only: unfreeze one more stage every this many epochs", min=1,
                             max=1000)
    lr_backbone: float = _f(0.0, "with finetune=partial, gradual or full: learning rate of the pretrained layers "
                            "(0: the same as lr)", min=0.0, max=10.0)
    mean: str = _f("", "input normalisation mean, three comma-separated values (default: the weights' own; ImageNet's "
                   "for smallcnn)")
    std: str = _f("", "input normalisation std, three comma-separated values (default: the weights' own)")
    feature_cache: str = _f("auto", "frozen backbone: compute its output once into a store (auto) or every epoch (off)",
                            choices=("auto", "off"))
    feature_cache_max: float = _f(0.0, "largest feature store in GB (0: half the free disk where it goes)", min=0.0, max=1e6)
    feature_cache_views: int = _f(0, "with augment: store this many augmented views per image (0: no store)", min=0, max=64)
    # optimisation
    optimizer: str = _f("adamw", "optimiser", choices=OPTIMIZERS)
    lr: float = _f(2e-3, "peak learning rate", min=1e-7, max=10.0)
    momentum: float = _f(0.9, "SGD momentum (and beta1 for the Adam family)", min=0.0, max=0.999)
    weight_decay: float = _f(0.05, "weight decay (decoupled for adamw)", min=0.0, max=1.0)
    scheduler: str = _f("cosine", "learning-rate schedule, stepped every batch: none (constant), cosine (to 0, after "
                        "--warmup_epochs of linear warm-up), onecycle", choices=SCHEDULERS)
    warmup_epochs: float = _f(1.0, "with scheduler=cosine: epochs of linear warm-up from 0 to lr", min=0.0, max=1000.0)
    ema: float = _f(0.0, "decay of an exponential moving average of the weights and batch-norm statistics, updated "
                          "every step; validation, best.pt and evaluate use the average (0: off)", min=0.0, max=0.9999)
    label_smoothing: float = _f(0.1, "label smoothing of the cross-entropy loss", min=0.0, max=0.5)
    class_weights: str = _f("auto", "loss weight of each class: balanced (n_images / (n_classes x the class's training "
                                    "images), so a rare class counts as much as a common one), none, or auto: balanced "
                                    "where the largest training class has over 3 times the images of the smallest, "
                                    "else none (measured on 4 sets, 3 seeds each: docs/recipe.md)",
                            choices=("auto", "none", "balanced"))
    teacher: str = _f("", "knowledge distillation: a trained run (its folder, or a checkpoint) whose outputs the model "
                          "learns from beside the labels, seeing the images with its own preprocessing (see "
                          "--distill_mode); the run keeps its train/validation split ('': none)")
    distill_weight: float = _f(0.5, "with --teacher: the weight of the teacher's term (the labels' loss weighs 1 - it)",
                               min=0.0, max=1.0)
    distill_temperature: float = _f(4.0, "with --teacher: the temperature of both softmaxes in the teacher's term",
                                    min=0.1, max=100.0)
    distill_mode: str = _f("stored", "with --teacher: stored (the teacher's logits of each whole training image, "
                                     "computed once) or online (the teacher run on the very view the student sees, "
                                     "every step: a teacher forward per image per epoch) or views (the teacher run "
                                     "once on --distill_views rounds of the student's views, which the student then "
                                     "cycles)", choices=("stored", "online", "views"))
    distill_views: int = _f(8, "with --distill_mode views: rounds of views the teacher computes (K teacher passes over "
                               "the training images, once)", min=1, max=1000)
    distill_mixup: bool = _f(True, "with --distill_mode views: mix each view with another of its batch (mixup, a "
                                   "uniform weight; the labels mixed alike), as the teacher sees it")
    sampler: str = _f("none", "how an epoch draws training images: none (each once, shuffled) or balanced (as many "
                              "draws, with replacement, each class equally likely; seeded per epoch)",
                      choices=("none", "balanced"))
    tta: bool = _f(True, "test-time augmentation: validation, evaluate and predict average the logits of each image "
                   "and its mirror image")
    grad_clip: float = _f(0.0, "clip the gradient norm to this value (0: off)", min=0.0, max=1e6)
    batch_size: int = _f(64, "training batch size", min=1, max=65536)
    epochs: int = _f(10, "training epochs (0: chosen on the data: 10, or with --teacher the patient schedule, a fixed "
                         "number of image passes, which is the default there; docs/recipe.md)", min=0, max=10000)
    early_stop: int = _f(0, "stop after this many epochs without a better epoch by keep_best (0: off)", min=0, max=10000)
    keep_best: str = _f("val_acc", "the metric that picks the epoch best.pt keeps: an accuracy's highest or a loss's "
                        "lowest (ties: the lower val_loss, or for a loss the higher val_acc). A sweep trial keeps the "
                        "epoch of the sweep's metric, the one its value is read from",
                        choices=("val_acc", "val_balanced_acc", "val_loss", "train_acc", "train_loss"))
    seed: int = _f(0, "seed of the split, initialisation, shuffling, augmentation and dropout", min=0, max=2**31 - 1)
    # execution
    device: str = _f("auto", "auto (cuda when present, else cpu), cpu, cuda, cuda:N, mps")
    precision: str = _f("auto", "auto: bf16 autocast where the device computes bf16 (Ampere GPUs and later, CPUs with "
                                "AVX512-BF16 or AMX), fp16 with a gradient scaler on GPUs with fp16 tensor cores only "
                                "(V100, T4), else fp32 (cnnlab env shows the choice)",
                        choices=("auto", "fp32", "bf16", "fp16"))
    channels_last: bool = _f(True, "channels_last memory format (faster convolutions on CPU and GPU)")
    compile: str = _f("off", "torch.compile the model with this mode (true: default)", choices=COMPILE_MODES,
                      aliases={"true": "default", "false": "off", "on": "default", "yes": "default", "no": "off"})
    deterministic: bool = _f(False, "bit-identical repeats on a GPU too: deterministic cuDNN and PyTorch algorithms, no "
                                    "autotuning or TF32 (slower; an operation without a deterministic version is refused "
                                    "by name); runs on the CPU repeat without it")
    decoder: str = _f("auto", "cache build: pil (worker processes), nvjpeg (batches on the GPU), auto (nvjpeg on CUDA)",
                      choices=("auto", "pil", "nvjpeg"))
    decode_workers: int = _f(0, "processes decoding images into the cache with PIL (0: one per core)", min=0, max=256)
    cache_dir: str = _f("", "where decoded images are cached (default: $CNNLAB_CACHE or ~/.cache/cnnlab)")
    out: str = _f("runs", "folder that receives run folders")
    name: str = _f("", "run folder name (default: made from the time and the main knobs)")
    wandb: str = _f("auto", "Weights & Biases logging: offline (needs no account), online, off, or auto: into the agent's "
                            "run when `wandb agent` started this process ($WANDB_SWEEP_ID), else off",
                    choices=("auto", "off", "offline", "online"))
    tensorboard: bool = _f(False, "write TensorBoard event files into the run folder's tensorboard/: every epoch's "
                                  "metrics, the hyperparameters with the best epoch's, and what evaluate and explain add")
    wandb_project: str = _f("cnnlab", "Weights & Biases project")

    # ---- derived values -------------------------------------------------------------------------
    def filter_counts(self) -> list[int]:
        """The five conv layers' filter counts."""
        org = self.filter_org
        if org in ("same",):
            return [self.filters] * 5
        if org in ("double", "pyramid"):
            return [self.filters * 2**i for i in range(5)]
        if org == "half":
            return [max(1, self.filters // 2**i) for i in range(5)]
        return _int_list(org, "filter_org", 5)

    def augments(self) -> bool:
        """Whether training batches are augmented, with augment=auto resolved: off where only the head trains on a
        frozen backbone (the feature store serves its epochs), on otherwise."""
        if self.augment == "auto":
            return self.finetune != "head"
        return self.augment == "true"

    def first_stride(self) -> int:
        """The first convolution's stride, with conv1_stride=0 (auto) resolved."""
        if self.conv1_stride:
            return self.conv1_stride
        return 2 if self.image_size >= 128 else 1

    def training_side(self, epoch: int) -> int:
        """The side of the training images in `epoch` (1-based): image_size, or with progressive resizing
        progressive x image_size at epoch 1 growing linearly to image_size at epoch ceil(epochs / 2), in steps of
        16 px (at least 32). Epochs past the plan keep the full size."""
        if not self.progressive or self.epochs < 2:
            return self.image_size
        ramp = max(1, math.ceil(self.epochs / 2) - 1)  # epochs over which the side grows
        fraction = self.progressive + (1 - self.progressive) * min(1.0, (epoch - 1) / ramp)
        return min(self.image_size, max(32, round(fraction * self.image_size / 16) * 16))

    def kernel_sizes(self) -> list[int]:
        ks = _int_list(self.kernel_size, "kernel_size", None)
        return ks * 5 if len(ks) == 1 else ks

    def normalisation(self) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        """The --mean / --std overrides (None where not given)."""
        def three(key: str) -> tuple[float, ...] | None:
            text = getattr(self, key).replace(" ", "").strip("[]()")
            if not text:
                return None
            try:
                values = tuple(float(v) for v in text.split(","))
            except ValueError:
                values = ()
            if len(values) != 3 or (key == "std" and min(values) <= 0):
                raise ConfigError(f"{key}={getattr(self, key)!r}: expected three comma-separated numbers like 0.5,0.5,0.5"
                                  + (" (all above 0)" if key == "std" else ""))
            return values
        return three("mean"), three("std")

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        env = os.environ.get("CNNLAB_CACHE")
        if env:
            return Path(env)
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cnnlab"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _int_list(text: str, key: str, length: int | None) -> list[int]:
    try:
        values = [int(v) for v in str(text).replace(" ", "").strip("[]()").split(",")]
    except ValueError:
        raise ConfigError(f"{key}={quote(text)}: expected integers separated by commas") from None
    if length is not None and len(values) != length:
        raise ConfigError(f"{key}={quote(text)}: expected {length} comma-separated values, got {len(values)}")
    if length is None and len(values) not in (1, 5):
        raise ConfigError(f"{key}={quote(text)}: expected one value or five comma-separated values")
    if any(v < 1 for v in values):
        raise ConfigError(f"{key}={quote(text)}: every value must be at least 1")
    return values


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}
_TYPES: dict[str, type] = typing.get_type_hints(Config)
_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def describe(key: str) -> str:
    """Human text of what a key accepts, for errors and --help."""
    f, t = FIELDS[key], _TYPES[key]
    if "choices" in f.metadata:
        return "one of " + ", ".join(f.metadata["choices"])
    parts = [t.__name__]
    if "min" in f.metadata:
        lo, hi = f.metadata["min"], f.metadata["max"]
        parts.append(f"from {lo:,} to {hi:,}" if t is int else f"from {lo:g} to {hi:g}")
    if "auto" in f.metadata:
        parts.append(f"or {f.metadata['auto']} (the model's own)")
    return " ".join(parts)


def coerce(key: str, value: Any) -> Any:
    """Turn a CLI string or YAML value into the field's type, or raise ConfigError naming the key."""
    if key not in FIELDS:
        known = ", ".join(FIELDS)
        raise ConfigError(f"unknown key {quote(key)}; known keys: {known}")
    t = _TYPES[key]
    bad = ConfigError(f"{key}={quote(value)}: expected {describe(key)}")
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).strip().lower() in _TRUE | _FALSE:
            return str(value).strip().lower() in _TRUE
        raise bad
    if t is int:
        if isinstance(value, bool):
            raise bad
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not number.is_integer():
            raise bad
        return int(number)
    if t is float:
        if isinstance(value, bool):
            raise bad
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    if isinstance(value, (list, tuple)):  # YAML lists for filter_org / kernel_size
        return ",".join(str(v) for v in value)
    if value is None:
        raise bad
    aliases = FIELDS[key].metadata.get("aliases", {})  # e.g. compile: true (YAML bool) -> "default"
    return aliases.get(str(value).strip().lower(), str(value))


def check_value(key: str, value: Any) -> Any:
    """coerce, then the field's own rules (choices, range): a value every config would refuse."""
    value = coerce(key, value)
    f = FIELDS[key]
    if "choices" in f.metadata and value not in f.metadata["choices"]:
        raise ConfigError(f"{key}={quote(value)}: expected {describe(key)}")
    if "min" in f.metadata and not (f.metadata["min"] <= value <= f.metadata["max"] or value == f.metadata.get("auto")):
        raise ConfigError(f"{key}={quote(value)}: expected {describe(key)}")
    return value


def validate(cfg: Config) -> Config:
    """Check every field's rules and the cross-field ones; return cfg unchanged or raise ConfigError."""
    for key in FIELDS:
        check_value(key, getattr(cfg, key))
    if cfg.filter_org not in FILTER_ORGS:
        try:
            cfg.filter_counts()
        except ConfigError as e:
            raise ConfigError(f"{e}; or one of {', '.join(FILTER_ORGS)}") from None
    cfg.kernel_sizes()
    cfg.normalisation()
    if cfg.name and not re.fullmatch(SAFE_NAME, cfg.name):
        raise ConfigError(f"name={quote(cfg.name)}: a run's name is its folder's inside --out, so use letters, digits, "
                          "'.', '_' and '-' only (no '/', no leading dot, at most 100 characters); put the folder "
                          "elsewhere with --out")
    check_finetuning(cfg)
    return cfg  # the rules of the model's family (smallcnn's sizes, a known architecture): models.check_config


APPLIES_WITH = {"freeze_stages": ("partial",), "unfreeze_every": ("gradual",),
                "lr_backbone": ("partial", "gradual", "full")}


def applicable(values: dict[str, Any], finetune: str) -> dict[str, Any]:
    """A sweep trial's values without the knobs its strategy does not use (a W&B sweep cannot make a parameter
    conditional on another): those keep their defaults, and the trial's logged config says so."""
    return {k: v for k, v in values.items() if finetune in APPLIES_WITH.get(k, (finetune,))}


def check_finetuning(cfg: Config) -> None:
    """Combinations that would silently do something else than asked are refused, saying what to write."""
    if cfg.finetune == "partial" and cfg.freeze_stages < 1:
        raise ConfigError("finetune=partial needs freeze_stages >= 1")
    if cfg.freeze_stages and cfg.finetune != "partial":
        raise ConfigError(f"freeze_stages={cfg.freeze_stages} only applies with --finetune partial "
                          f"(finetune is {cfg.finetune})")
    if cfg.unfreeze_every != 1 and cfg.finetune != "gradual":
        raise ConfigError(f"unfreeze_every={cfg.unfreeze_every} only applies with --finetune gradual "
                          f"(finetune is {cfg.finetune})")
    if cfg.lr_backbone and cfg.finetune not in ("partial", "gradual", "full"):
        raise ConfigError(f"lr_backbone={cfg.lr_backbone:g} only applies when pretrained layers train "
                          f"(--finetune partial, gradual or full; finetune is {cfg.finetune})")


def make_config(*sources: dict[str, Any]) -> Config:
    """Defaults, then each source (YAML dict, CLI overrides, sweep params) in order; validated."""
    values: dict[str, Any] = {}
    for source in sources:
        for key, value in source.items():
            values[key] = coerce(key, value)
    return validate(Config(**values))


# Keys added to Config after run folders and checkpoints were first written, with the value a saved config
# that lacks them meant: a later default must not change the architecture an older checkpoint was trained as.
SAVED_BEFORE_THE_KEY: dict[str, Any] = {"conv1_stride": 1, "conv1_init": "kaiming", "conv_init": "kaiming",
                                         "class_weights": "none", "sampler": "none", "group_duplicates": False}


def saved_values(values: dict[str, Any]) -> dict[str, Any]:
    """A saved config's values, with each key it predates set to the value it meant then."""
    return {**SAVED_BEFORE_THE_KEY, **values}


def saved_config(values: dict[str, Any], *overrides: dict[str, Any]) -> Config:
    """The config a run folder's config.yaml or a checkpoint holds, then `overrides`; validated."""
    return make_config(saved_values(values), *overrides)


YAML_MAX_EXPANDED = 1_000_000  # characters a YAML file may stand for once its aliases are expanded, at most
YAML_MAX_GROWTH = 10  # ... and at most this many times its own length (or 100,000 characters if more)


def expanded_size(node: yaml.Node, memo: dict[int, int] | None = None, open_: set[int] | None = None) -> int:
    """About how many characters `node` stands for with every alias expanded (a node reached twice counts
    twice): what a 'billion laughs' file of a few hundred bytes multiplies into. Each node is visited once."""
    memo = {} if memo is None else memo
    open_ = set() if open_ is None else open_
    key = id(node)
    if key in memo:
        return memo[key]
    if key in open_:  # an anchor that contains its own alias: infinite once expanded
        return YAML_MAX_EXPANDED + 1
    open_.add(key)
    if isinstance(node, yaml.ScalarNode):
        size = 1 + len(node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(expanded_size(child, memo, open_) for child in node.value)
    else:
        size = 1 + sum(expanded_size(k, memo, open_) + expanded_size(v, memo, open_) for k, v in node.value)
    open_.discard(key)
    memo[key] = size = min(size, YAML_MAX_EXPANDED + 1)
    return size


def parse_yaml(text: str, where: str, what: str = "config", error: type[ConfigError] = ConfigError) -> Any:
    """yaml.safe_load, refusing a document whose aliases expand past YAML_MAX_EXPANDED characters."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        bound = min(YAML_MAX_EXPANDED, max(100_000, YAML_MAX_GROWTH * len(text)))
        if expanded_size(node) > bound:
            raise error(f"{where}: its aliases (*name) expand it to more than {bound:,} characters (or refer to "
                        f"themselves): the {what} file is refused; write the values out")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else where
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context = getattr(e, "context", None)
        raise error(f"{at}: {problem}{f' ({context})' if context else ''}: the {what} file is not valid YAML"
                    ) from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path, what: str = "config", error: type[ConfigError] = ConfigError) -> Any:
    """A YAML file's content, or one clear line saying why it cannot be read."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} file {path} not found") from None
    except IsADirectoryError:
        raise error(f"{what} file {path} is a folder: give the YAML file itself") from None
    except OSError as e:
        raise error(f"{what} file {path} cannot be read ({e.strerror}): check its permissions") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise error(f"{path}:{line}: byte 0x{data[e.start]:02x} is not UTF-8 (the file seems saved as Latin-1 or "
                    f"another legacy encoding): save the {what} file as UTF-8") from None
    return parse_yaml(text, str(path), what, error)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config YAML file: a flat mapping of config keys (unknown keys are refused by make_config)."""
    loaded = read_yaml(path)
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: expected a mapping of key: value, got {type(loaded).__name__}")
    return loaded


def save_yaml(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
