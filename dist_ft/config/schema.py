"""The typed recipe: one frozen pydantic model per YAML section.

Every model forbids unknown keys, so a typo fails with its full key path (see
``config/load.py`` for the "did you mean" hint). Cross-field checks that need the whole
section (stage order, lr vs lr_scale) live in the section's validators; checks that need the
model's parameters (a rule matching nothing) happen when the plan is resolved.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dist_ft.config.architectures import ARCHITECTURES


def _not_bool(value: Any) -> Any:
    """Refuse booleans where a number is expected: pydantic's lax mode reads True as 1, and
    YAML reads ``yes``/``no``/``on``/``off`` as booleans, so ``epochs: yes`` would train 1."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not the boolean {str(value).lower()} (YAML reads "
                         "true/false/yes/no/on/off as booleans); write a number")
    return value


# Every number in a recipe goes through these: no booleans; floats also accept ints.
# Floats are finite by the Section config (allow_inf_nan=False).
Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]
PositiveFloat = Annotated[Float, Field(gt=0)]
NonNegFloat = Annotated[Float, Field(ge=0)]
PositiveInt = Annotated[Int, Field(ge=1)]
NonNegInt = Annotated[Int, Field(ge=0)]
Fraction = Annotated[Float, Field(ge=0, lt=1)]
# Images are decoded and resized to this side per sample; beyond it one batch of one image
# takes gigabytes, which is a typo (an extra digit), not a setting.
MAX_IMAGE_SIZE = 8192


class PathValue:
    """Marks a ``str`` field as a filesystem path: ``config.load`` makes it absolute (``~``
    expanded, relative to the working directory) once, when the recipe is loaded.

    Args:
        keywords: values that are not paths (``model.pretrained: none | imagenet``).
    """

    def __init__(self, keywords: tuple[str, ...] = ()) -> None:
        self.keywords = keywords

    def __repr__(self) -> str:
        return f"PathValue(keywords={self.keywords!r})"


PRETRAINED_KEYWORDS = ("none", "imagenet")
# model.name of a timm architecture: timm/NAME.
TIMM_PREFIX = "timm/"

BnPolicy = Literal["freeze", "train"]
RULE_KEYWORDS = ("head", "stem", "all")
_RULE_KINDS = ("keyword", "glob", "regex", "blocks", "last_blocks", "from_block")


class Section(BaseModel):
    """Base of every recipe section: immutable, unknown keys rejected."""

    # allow_inf_nan=False: every float of a recipe is a finite hyperparameter; .inf or nan
    # would reach the optimizer or the schedule and only fail (or silently diverge) later.
    # use_attribute_docstrings: the docstring under each field is its description, which
    # config/reference.py turns into the key reference (docs/config-reference.md).
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True,
                              allow_inf_nan=False, use_attribute_docstrings=True)


class Rule(Section):
    """Selects parameters by name, module path or block.

    In YAML a rule is one of:
      - a keyword: ``head`` (the classifier), ``stem``, ``all``;
      - any other string: a glob on parameter names or module paths (``features.denseblock4``
        and ``layer*.bn*`` both work);
      - a mapping with exactly one key: ``glob``, ``regex`` (``re.search`` on parameter names),
        ``blocks`` (a list of block names), ``last_blocks: N`` (the last N body blocks,
        head excluded), ``from_block: NAME`` (that block and every later one, head included).
    """

    keyword: Literal["head", "stem", "all"] | None = None
    """``head`` (the classifier), ``stem`` (the layers before the first block) or ``all``; in
    YAML the bare word."""
    glob: str | None = None
    """A glob on parameter names or module paths (``features.denseblock4``, ``layer*.bn*``);
    in YAML any other bare string."""
    regex: str | None = None
    """A regular expression searched (``re.search``) in parameter names."""
    blocks: list[str] | None = Field(default=None, min_length=1)
    """These blocks, by name (``dist-ft plan`` lists a model's blocks)."""
    last_blocks: PositiveInt | None = None
    """The last N body blocks (the head excluded)."""
    from_block: str | None = None
    """This block and every later one, the head included."""

    @model_validator(mode="before")
    @classmethod
    def _from_shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"keyword": value} if value in RULE_KEYWORDS else {"glob": value}
        if not isinstance(value, dict):
            raise ValueError(
                "a rule is a keyword (head, stem, all), a glob string, or a mapping with one of "
                f"{', '.join(_RULE_KINDS[1:])}; got {type(value).__name__} {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> Rule:
        given = [k for k in _RULE_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"a rule needs exactly one of {', '.join(_RULE_KINDS[1:])}; got "
                f"{', '.join(given) or 'none'}"
            )
        return self

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
        return value

    def describe(self) -> str:
        """The rule as a user wrote it, for messages and tables."""
        if self.keyword is not None:
            return self.keyword
        if self.glob is not None:
            return self.glob
        kind = next(k for k in _RULE_KINDS if getattr(self, k) is not None)
        return f"{kind}: {getattr(self, kind)}"


class ModelConfig(Section):
    """``model``: which architecture (torchvision's or timm's), its weights and its output size.

    A timm model is written ``timm/NAME`` (or ``NAME`` with ``source: timm``); either way the
    loaded recipe holds ``name: timm/NAME, source: timm``, so the name alone says where the
    model comes from (``efficientnet_b0`` exists in both libraries).
    """

    name: str
    """The architecture to fine-tune: a torchvision name (``densenet121``, ``resnet50``,
    ``vit_b_16``, ...) or ``timm/NAME`` for any timm model (``timm/convnext_tiny``; a
    ``.TAG`` suffix picks its pretrained weights, ``timm/convnext_tiny.fb_in22k``)."""
    source: Literal["torchvision", "timm"] = "torchvision"
    """The library the architecture comes from; a ``timm/`` prefix on ``name`` sets ``timm``.
    torchvision names are checked when the recipe loads, timm names when the model is built
    (``dist-ft plan``, training)."""
    pretrained: Annotated[str, PathValue(PRETRAINED_KEYWORDS)] = "none"
    """Initial weights: ``none`` (random), ``imagenet`` (the library's default pretrained
    weights, from the local torch hub or Hugging Face cache, never downloaded) or the PATH of
    a .pt/.safetensors state_dict."""
    num_classes: PositiveInt = 14
    """Outputs of the new classifier head: the number of classes or findings (ChestX-ray14:
    14)."""

    @model_validator(mode="before")
    @classmethod
    def _timm_prefix(cls, value: Any) -> Any:
        # One spelling for timm models (name: timm/NAME, source: timm), whichever was written.
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return value
        name, source = value["name"], value.get("source")
        if name.startswith(TIMM_PREFIX):
            if source not in (None, "timm"):
                raise ValueError(f"name {name!r} is a timm model but source is {source!r}; "
                                 f"drop source or the {TIMM_PREFIX} prefix")
            return {**value, "source": "timm"}
        if source == "timm":
            return {**value, "name": TIMM_PREFIX + name}
        return value

    @property
    def arch(self) -> str:
        """The architecture's name in its library (``name`` without ``timm/``)."""
        return self.name.removeprefix(TIMM_PREFIX)

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value.startswith(TIMM_PREFIX):
            if not value[len(TIMM_PREFIX):].strip():
                raise ValueError(f"{value!r}: give the timm model's name after {TIMM_PREFIX}")
            return value  # checked against timm.list_models() where the model is built
        if value not in ARCHITECTURES:
            import difflib

            close = difflib.get_close_matches(value, ARCHITECTURES, n=3)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
            raise ValueError(
                f"unknown model {value!r}; {hint}supported: {', '.join(sorted(ARCHITECTURES))}"
            )
        return value

    @field_validator("pretrained")
    @classmethod
    def _nonempty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be 'none', 'imagenet' or a path to a state_dict file")
        return value


class AugmentConfig(Section):
    """``data.augment``: per-sample augmentation of training images."""

    crop_scale: tuple[Annotated[Float, Field(gt=0, le=1)], Annotated[Float, Field(gt=0, le=1)]] = (
        0.7,
        1.0,
    )
    """Range of a random crop's area, as a fraction of the image."""
    ratio: tuple[Annotated[Float, Field(gt=0)], Annotated[Float, Field(gt=0)]] = (0.75, 4 / 3)
    """Range of a random crop's aspect ratio (width / height)."""
    hflip: bool = True
    """Flip half of the training images horizontally."""
    rotation_deg: Annotated[Float, Field(ge=0, le=45)] = 5.0
    """Rotate by an angle drawn uniformly in [-rotation_deg, rotation_deg] degrees."""


class CsvConfig(Section):
    """``data.csv``: a generic multi-label CSV (one row per image).

    Labels come either from ``label_columns`` (0/1 columns) or from ``label_column`` holding
    names joined by ``separator``; ``classes`` fixes their order (default: sorted names).
    An optional ``split_column`` holds train/val/test; otherwise rows are split at random
    by ``data.val_fraction`` and ``data.test_fraction``, by patient with ``patient_column``.
    """

    file: Annotated[str, PathValue()]
    """PATH of the CSV file, one row per image."""
    path_column: str = "path"
    """Column of image paths, relative to ``data.root`` (default: the CSV's folder)."""
    label_columns: list[str] | None = None
    """0/1 columns, one per class (set this or ``label_column``)."""
    label_column: str | None = None
    """One column of class names joined by ``separator`` (set this or ``label_columns``)."""
    separator: str = "|"
    """What joins the class names in ``label_column``."""
    classes: list[str] | None = None
    """The order of the classes (default: their names, sorted)."""
    split_column: str | None = None
    """Column holding train/val/test (default: random splits by ``data.val_fraction`` and
    ``data.test_fraction``)."""
    patient_column: str | None = None
    """Column of patient ids: rows of one patient stay in one split (random splits are by
    patient); without it rows are split by image, which leaks patients across splits when
    they have several images."""

    @model_validator(mode="after")
    def _one_label_source(self) -> CsvConfig:
        if (self.label_columns is None) == (self.label_column is None):
            raise ValueError("set exactly one of label_columns or label_column")
        return self


class SplitFilesConfig(Section):
    """``data.split_files``: image list files (one image id per line) defining the splits.

    Either ``train_val`` and ``test`` (validation carved from ``train_val`` by patient with
    ``data.val_fraction`` and ``data.split_seed``, as for the official ChestX-ray14 lists), only
    ``test`` (every other image is train/val), or ``train``, ``val`` and optionally ``test``.
    """

    train_val: Annotated[str, PathValue()] | None = None
    """PATH of the train+validation list (validation carved from it by patient)."""
    train: Annotated[str, PathValue()] | None = None
    """PATH of the training list (with ``val``)."""
    val: Annotated[str, PathValue()] | None = None
    """PATH of the validation list (with ``train``)."""
    test: Annotated[str, PathValue()] | None = None
    """PATH of the test list."""

    @model_validator(mode="after")
    def _combination(self) -> SplitFilesConfig:
        if self.train is not None or self.val is not None:
            if self.train is None or self.val is None or self.train_val is not None:
                raise ValueError("with train or val set, set both (and optionally test), "
                                 "not train_val")
        elif self.test is None:
            raise ValueError("set train_val and test, test alone, or train, val (and test)")
        return self


UncertainPolicy = Literal["ones", "zeros", "ignore"]


class ChexpertLabelsConfig(Section):
    """``data.chexpert``: how CheXpert-labeller values (CheXpert, MIMIC-CXR) become targets.

    ``uncertain`` maps -1 to 1 (U-Ones), 0 (U-Zeros) or ignore (masked out of loss and
    metrics, NaN in the targets) as in Irvin et al. 2019; ``per_finding`` overrides it by the
    CheXpert column name (``Edema: ones``). Blank (not mentioned) is 0.
    """

    uncertain: UncertainPolicy = "ones"
    """An uncertain (-1) label becomes 1 (``ones``, U-Ones), 0 (``zeros``, U-Zeros) or is
    masked out of loss and metrics (``ignore``)."""
    per_finding: dict[str, UncertainPolicy] = Field(default_factory=dict)
    """``uncertain`` per CheXpert column name, overriding it (``Edema: ones``)."""


class DataConfig(Section):
    """``data``: where images come from and how they are batched (per process)."""

    format: Literal["chestxray14", "imagefolder", "csv", "chexpert",
                    "mimic_cxr"] = "chestxray14"
    """Dataset layout: ChestX-ray14, an ImageFolder tree, a generic CSV, CheXpert or
    MIMIC-CXR."""
    root: Annotated[str, PathValue()] | None = None
    """PATH of the dataset folder (images and metadata; for csv, the base of image paths)."""
    cache: Annotated[str, PathValue()] | None = None
    """PATH of a shard cache written by ``dist-ft data prepare`` (chestxray14, imagefolder or
    csv), read instead of decoding images; they come at the size prepared (``--size``), which
    takes the place of ``load_size``."""
    image_size: Annotated[Int, Field(ge=16, le=MAX_IMAGE_SIZE)] = 224
    """Side in pixels of the square images the model sees."""
    load_size: Annotated[Int, Field(ge=16, le=MAX_IMAGE_SIZE)] | None = None
    """Side images are loaded at before cropping (default: image_size x 256/224)."""
    mean: tuple[Float, Float, Float] | None = None
    """Per-channel (RGB) mean of the input normalisation, on the 0..1 scale (default: the
    model's own: ImageNet's for torchvision models, the pretrained config's for timm)."""
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] | None = None
    """Per-channel (RGB) standard deviation of the input normalisation (default: the model's
    own, as ``mean``)."""
    interpolation: Literal["bilinear", "bicubic"] | None = None
    """Resampling of the resize and augmentation warp (default: the model's own: bilinear for
    torchvision models, the pretrained config's, mostly bicubic, for timm)."""
    batch_size: PositiveInt = 32
    """Images per process per forward pass (the micro-batch)."""
    global_batch_size: PositiveInt | None = None
    """The images of one optimizer step over all processes; when set, batch_size is derived
    from it at start (global / (processes x trainer.grad_accum_steps)), so a recipe keeps
    its hyperparameters whatever the number of GPUs it runs on."""
    num_workers: NonNegInt = 4
    """DataLoader worker processes per training process."""
    val_fraction: Fraction = 0.1
    """Fraction carved out for validation where the data has no validation split."""
    test_fraction: Fraction = 0.2
    """Fraction held out for testing where the data has no test split."""
    split_seed: Int = 0
    """Seed of the random split (the same seed gives the same split)."""
    views: list[Annotated[str, Field(min_length=1)]] | None = None
    """Keep only images of these views (``PA``, ``AP``, ...; default: all)."""
    frontal_only: bool = False
    """Keep only frontal views (PA, AP)."""
    on_bad_image: Literal["error", "skip"] = "error"
    """An unreadable image: stop naming it, or train on (replaced by the next image, recorded
    in OUTPUT_DIR/logs/bad_images.rank*.jsonl)."""
    verify_cache: bool = True
    """Compare every cache shard's sha256 with the manifest before training (main process)."""
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    """Augmentation of training images."""
    csv: CsvConfig | None = None
    """The CSV file and its columns (required with ``format: csv``)."""
    split_files: SplitFilesConfig | None = None
    """Image list files that fix the splits (chestxray14 or csv)."""
    chexpert: ChexpertLabelsConfig = Field(default_factory=ChexpertLabelsConfig)
    """How CheXpert-labeller values become targets (chexpert, mimic_cxr)."""
    labels_as: Literal["chestxray14"] | None = None
    """Present CheXpert/MIMIC-CXR targets as the findings they share with ChestX-ray14, under
    ChestX-ray14 names, to validate a ChestX-ray14 model externally."""

    @model_validator(mode="after")
    def _sources(self) -> DataConfig:
        if self.split_files is not None and self.format not in ("chestxray14", "csv"):
            raise ValueError(f"split_files is used with format: chestxray14 or csv; "
                             f"{self.format} has official splits")
        if self.labels_as is not None and self.format not in ("chexpert", "mimic_cxr"):
            raise ValueError("labels_as is used with format: chexpert or mimic_cxr")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        if self.format == "csv" and self.csv is None:
            raise ValueError("format: csv needs a csv section (file, path_column, labels)")
        if self.format != "csv" and self.csv is not None:
            raise ValueError(f"a csv section is only used with format: csv, not {self.format}")
        if self.cache is not None and self.format not in ("chestxray14", "imagefolder", "csv"):
            raise ValueError(f"cache is supported with format: chestxray14, imagefolder or csv "
                             f"(what dist-ft data prepare writes), not {self.format}; remove "
                             "data.cache to read the image files")
        return self


class AdapterConfig(Section):
    """``plan.stages[i].adapters``: train small adapters (through peft) beside frozen weights.

    The adapters wrap the Linear and Conv2d layers that ``target`` selects; their base
    weights stay frozen while the adapters (and whatever ``include`` selects) train.
    Consecutive stages with equal ``adapters`` keep training the same adapters; a stage whose
    ``adapters`` differ (or are absent) starts after the previous ones are merged into the
    base weights.
    """

    kind: Literal["lora", "dora", "ia3"] = "lora"
    """``lora`` (low-rank updates), ``dora`` (weight-decomposed LoRA) or ``ia3`` (learned
    scaling vectors)."""
    r: PositiveInt = 8
    """LoRA/DoRA rank (ignored by ``ia3``)."""
    alpha: PositiveFloat = 16.0
    """LoRA/DoRA scaling numerator: updates are scaled by ``alpha / r``."""
    dropout: Fraction = 0.0
    """Dropout on the adapter's input (LoRA/DoRA)."""
    target: Annotated[list[Rule], Field(min_length=1)]
    """The layers to adapt: each rule narrows the previous ones (``[{last_blocks: 4},
    attn]``: the attention layers of the last 4 blocks). A bare name matches a run of module
    path components (``attn``, ``mlp.fc1``, ``denseblock4.*.conv2``)."""


class StageConfig(Section):
    """One freeze-plan stage: from when, what trains, BatchNorm policy, lr multiplier.

    A parameter trains in this stage when some ``include`` rule matches it and no
    ``exclude`` rule does (exclude wins). With ``adapters``, the adapters train too and
    ``include`` may be empty.
    """

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    """The stage's name in logs, plots and checkpoints."""
    start_epoch: NonNegInt | None = None
    """Epoch the stage starts at (the first stage: 0); every stage uses epochs or steps."""
    start_step: NonNegInt | None = None
    """Optimizer step the stage starts at (the first stage: 0)."""
    adapters: AdapterConfig | None = None
    """Adapters (LoRA, DoRA, IA3) trained in this stage; none by default."""
    include: list[Rule] = Field(default_factory=list, validate_default=True)
    """Rules selecting what trains in this stage (required unless the stage has
    ``adapters``)."""
    exclude: list[Rule] = Field(default_factory=list)
    """Rules selecting what stays frozen although included (exclude wins)."""
    bn_policy: BnPolicy | None = None
    """This stage's ``plan.bn_policy`` (default: the plan's)."""
    lr_scale: PositiveFloat = 1.0
    """Multiplies every learning rate during this stage."""

    @field_validator("include")
    @classmethod
    def _something_trains(cls, value: list[Rule], info: ValidationInfo) -> list[Rule]:
        if not value and info.data.get("adapters") is None:
            raise ValueError("give at least one rule (what trains), or adapters")
        return value

    @model_validator(mode="after")
    def _one_start(self) -> StageConfig:
        if self.start_epoch is not None and self.start_step is not None:
            raise ValueError("set start_epoch or start_step, not both")
        return self


class PlanConfig(Section):
    """``plan``: ordered freeze stages. The default trains everything from the start."""

    bn_policy: BnPolicy = "freeze"
    """Frozen BatchNorm layers: ``freeze`` runs them in eval mode (statistics kept), ``train``
    keeps updating their statistics."""
    stages: Annotated[list[StageConfig], Field(min_length=1)] = Field(
        default_factory=lambda: [StageConfig(name="full", start_epoch=0, include=["all"])]
    )
    """The freeze stages, in order of start."""

    @model_validator(mode="after")
    def _ordered(self) -> PlanConfig:
        problems: list[str] = []
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"stage names must be unique; repeated: {', '.join(dupes)}")
        units = {"epoch" if s.start_step is None else "step" for s in self.stages[1:]}
        first = self.stages[0]
        if first.start_step is None and first.start_epoch is None:
            pass  # the first stage starts at the beginning by default
        elif (first.start_epoch or first.start_step or 0) != 0:
            problems.append("stages[0] must start at 0 (start_epoch: 0 or start_step: 0)")
        for i, s in enumerate(self.stages[1:], start=1):
            if s.start_epoch is None and s.start_step is None:
                problems.append(f"stages[{i}] ({s.name}): set start_epoch or start_step")
        if len(units) > 1:
            problems.append("use start_epoch in every stage or start_step in every stage, not both")
        starts = [s.start_epoch if s.start_step is None else s.start_step for s in self.stages]
        for i in range(1, len(starts)):
            prev, cur = starts[i - 1] or 0, starts[i]
            if cur is not None and cur <= prev:
                problems.append(
                    f"stages out of order: stages[{i}] ({self.stages[i].name}) starts at {cur}, "
                    f"not after stages[{i - 1}] ({self.stages[i - 1].name}) at {prev}"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class GroupConfig(Section):
    """A named parameter group: the rules that select it and its lr / weight decay.

    Groups are tried in order; a parameter joins the first group whose rules match it
    (parameters matched by none join ``default``). ``lr`` sets an absolute base lr,
    ``lr_scale`` multiplies ``optim.lr``: give one or neither.
    """

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+$")]
    """The group's name in logs and plots (``default`` is reserved)."""
    match: Annotated[list[Rule], Field(min_length=1)]
    """Rules selecting the group's parameters."""
    lr: PositiveFloat | None = None
    """The group's absolute base lr (or set ``lr_scale``)."""
    lr_scale: PositiveFloat | None = None
    """Multiplies ``optim.lr`` for this group (or set ``lr``)."""
    weight_decay: NonNegFloat | None = None
    """The group's weight decay (default: ``optim.weight_decay``)."""

    @model_validator(mode="after")
    def _lr_or_scale(self) -> GroupConfig:
        if self.lr is not None and self.lr_scale is not None:
            raise ValueError("set lr or lr_scale, not both")
        return self


class OptimConfig(Section):
    """``optim``: optimizer, base lr and weight decay, parameter groups, layer decay."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    """The optimizer (sgd with ``momentum``)."""
    lr: PositiveFloat = 1e-3
    """Base learning rate of every group without its own (the peak after warmup)."""
    weight_decay: NonNegFloat = 0.01
    """Weight decay of every group without its own."""
    betas: tuple[Annotated[Float, Field(ge=0, lt=1)], Annotated[Float, Field(ge=0, lt=1)]] = (
        0.9,
        0.999,
    )
    """Adam(W)'s moment coefficients (beta1, beta2)."""
    eps: PositiveFloat = 1e-8
    """Adam(W)'s epsilon, added to the denominator."""
    momentum: Annotated[Float, Field(ge=0, lt=1)] = 0.9
    """SGD's momentum."""
    layer_decay: Annotated[Float, Field(gt=0, le=1)] | None = None
    """Layer-wise lr decay d: block k's lr is multiplied by d ** (depth - k) (stem 0, head
    depth)."""
    no_decay_1d: bool = True
    """No weight decay on 1-D parameters (biases, norm scales)."""
    groups: list[GroupConfig] = Field(default_factory=list)
    """Named parameter groups; a parameter joins the first that matches, else ``default``."""
    # auto: torch's fused Adam(W) kernel (one pass over memory per step: several times the
    # speed of the default per-tensor loop, see README Performance); SGD keeps torch's default.
    implementation: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    """Optimizer kernel; ``auto``: torch's fused Adam(W) (several times faster), torch's
    default for sgd."""

    @model_validator(mode="after")
    def _unique_groups(self) -> OptimConfig:
        names = [g.name for g in self.groups]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"group names must be unique; repeated: {', '.join(dupes)}")
        if "default" in names:
            raise ValueError("'default' is reserved for parameters that match no group")
        return self


class ScheduleConfig(Section):
    """``schedule``: lr schedule; it scales every group alike, keeping their ratios."""

    name: Literal["constant", "cosine", "step", "plateau"] = "cosine"
    """The schedule after warmup: constant, cosine decay, step decay or reduce on plateau."""
    warmup_steps: NonNegInt = 0
    """Steps of linear warmup up to the planned lr."""
    min_lr_scale: Annotated[Float, Field(ge=0, le=1)] = 0.0
    """The floor of cosine and plateau decay, as a fraction of each group's planned lr."""
    step_epochs: PositiveInt = 10
    """Step decay multiplies the lr by ``gamma`` every this many epochs."""
    gamma: Annotated[Float, Field(gt=0, le=1)] = 0.1
    """The factor of step decay and of each plateau reduction (CheXNet: 0.1)."""
    # Plateau (torch's ReduceLROnPlateau semantics, on trainer.monitor): reduce after more than
    # plateau_patience evaluations without a gain, a gain being a change of the monitored metric
    # beyond plateau_threshold (a fraction of the best with threshold_mode rel, a value with abs;
    # early stopping counts gains the same way); after a reduction, plateau_cooldown
    # evaluations pass before counting again.
    plateau_patience: NonNegInt = 2
    """Plateau: reduce after more than this many evaluations without a gain."""
    plateau_threshold: NonNegFloat = 1e-4
    """A gain is a change of the monitored metric beyond this (plateau and early stopping)."""
    plateau_threshold_mode: Literal["rel", "abs"] = "rel"
    """``plateau_threshold`` as a fraction of the best (``rel``) or a value (``abs``)."""
    plateau_cooldown: NonNegInt = 0
    """Plateau: evaluations that pass after a reduction before counting again."""


class FsdpMixedPrecision(Section):
    """``trainer.fsdp.mixed_precision``: the dtypes FSDP2 computes and reduces in (fp32
    master weights and optimizer state either way)."""

    param_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """dtype of the gathered weights the forward and backward run in (default: as stored,
    fp32)."""
    reduce_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """dtype of the gradient reduce-scatter (default: ``param_dtype``)."""


class FsdpConfig(Section):
    """``trainer.fsdp``: how PyTorch FSDP2 (``fully_shard``) shards the model."""

    reshard_after_forward: bool = True
    """Free each unit's gathered weights after its forward and gather again in backward
    (ZeRO-3-like memory); false keeps them until backward (ZeRO-2-like, less traffic)."""
    wrap: Literal["blocks", "none"] = "blocks"
    """Shard unit: one per block of the plan's block map (dense blocks, ResNet layers,
    encoder layers, stages), gathered one at a time; ``none``: the whole model as one unit."""
    cpu_offload: bool = False
    """Keep sharded weights, gradients and optimizer state in CPU memory (GPU runs; on a
    CPU-only machine they are there already)."""
    mixed_precision: FsdpMixedPrecision = Field(default_factory=FsdpMixedPrecision)
    """The dtypes of compute and of the gradient reduction."""


class TrainerConfig(Section):
    """``trainer``: length of the run, backend, precision and numerics."""

    epochs: PositiveInt = 1
    """Passes over the training set."""
    max_steps: PositiveInt | None = None
    """Stop after this many optimizer steps, even mid-epoch (default: run every epoch)."""
    backend: Literal["ddp", "deepspeed", "fsdp"] = "deepspeed"
    """PyTorch DDP, DeepSpeed ZeRO at ``zero_stage``, or PyTorch FSDP2 (``fully_shard``,
    settings in ``trainer.fsdp``)."""
    zero_stage: Annotated[Literal[1, 2, 3], BeforeValidator(_not_bool)] = 2
    """DeepSpeed ZeRO stage: shard optimizer states (1), also gradients (2), also weights
    (3)."""
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig)
    """FSDP2's sharding settings (with ``backend: fsdp``)."""
    precision: Literal["no", "fp16", "bf16"] = "no"
    """Mixed precision: ``no`` (fp32), ``bf16`` (CPU or GPU: bf16 autocast over fp32 weights,
    masters and moments, under DDP and DeepSpeed) or ``fp16`` (CUDA only: refused without)."""
    grad_accum_steps: PositiveInt = 1
    """Micro-batches accumulated into one optimizer step."""
    grad_clip_norm: PositiveFloat | None = 1.0
    """Clip the global gradient norm to this (null: no clipping)."""
    loss: Literal["bce", "bce_pos_weight", "focal", "ce"] = "bce"
    """Multi-label: bce, bce_pos_weight (positives weighted by negatives/positives) or focal;
    single-label: ce."""
    seed: Int = 0
    """Seed of weight initialisation, augmentation and data order."""
    eval_every_epochs: PositiveInt = 1
    """Validate every this many epochs (and at the end)."""
    checkpoint_every_steps: PositiveInt | None = None
    """Also checkpoint every this many steps (default: at epoch ends only)."""
    keep_last: PositiveInt = 3
    """Checkpoints kept; older ones are deleted (best/ is kept apart)."""
    portable_checkpoints: bool = True
    """Under ZeRO, also write ``portable/`` in each checkpoint (full fp32 weights and Adam
    moments by parameter name), so it resumes on any number of processes; false halves a ZeRO
    checkpoint's size, which then resumes on the same number only."""
    # The validation metric that selects OUTPUT_DIR/best/ and drives the plateau schedule and
    # early stopping, named as logged: val/loss, val/auroc_mean, val/accuracy, val/f1_macro,
    # val_auroc/<finding>; auto = val/auroc_mean (multi-label) or val/accuracy (single-label).
    monitor: Annotated[str, Field(pattern=r"^(auto|val/[a-z0-9_]+|val_auroc/[A-Za-z0-9_ -]+)$")] \
        = "auto"
    """The validation metric that selects OUTPUT_DIR/best/ and drives the plateau schedule and
    early stopping, named as logged: val/loss, val/auroc_mean, val/accuracy, val/f1_macro,
    val_auroc/<finding>; auto = val/auroc_mean (multi-label) or val/accuracy (single-label)."""
    monitor_mode: Literal["auto", "min", "max"] = "auto"
    """Whether lower or higher ``monitor`` is better; auto: min for val/loss, else max."""
    early_stopping_patience: PositiveInt | None = None
    """Stop after this many evaluations without a gain in ``monitor`` (default: never)."""
    collective_timeout_min: PositiveFloat = 10.0
    """A rank that dies or hangs stops the others after this long in a collective (not NCCL's
    default of hours); a rank that dies at once is noticed at the next collective."""
    nonfinite_loss: Literal["stop", "skip"] = "stop"
    """A step whose loss is NaN/inf on any rank: stop before the update (naming the step), or
    skip the update on every rank and go on, stopping after nonfinite_max_in_row in a row."""
    nonfinite_max_in_row: PositiveInt = 5
    """With ``nonfinite_loss: skip``, stop after this many non-finite steps in a row."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (less memory, more compute)."""
    save_stage_weights: bool = False
    """Save full weights + optimizer moments at each stage boundary."""

    @model_validator(mode="after")
    def _fsdp_precision(self) -> TrainerConfig:
        if self.backend == "fsdp" and self.precision != "no":
            raise ValueError(
                f"precision={self.precision} with backend=fsdp: FSDP2 computes in the dtype of "
                "trainer.fsdp.mixed_precision.param_dtype (e.g. bfloat16) over fp32 master "
                "weights; set that and leave precision at 'no'")
        return self


TRACKERS = ("tensorboard", "mlflow", "wandb")


def backend_label(backend: str, zero_stage: int | None = None) -> str:
    """What runs, in words: ``DDP``, ``DeepSpeed ZeRO-2`` or ``FSDP2`` (``trainer.backend``
    and ``trainer.zero_stage``); one wording for the log, ``recipes list``, ``submit`` and
    benches."""
    if backend == "fsdp":
        return "FSDP2"
    return "DDP" if backend == "ddp" else f"DeepSpeed ZeRO-{zero_stage}"


class LoggingConfig(Section):
    """``logging``: console and tracker cadence, and which trackers record the run."""

    every_steps: PositiveInt = 10
    """Log the training loss, lr and speed every this many steps."""
    # tensorboard: the run folder's tb/ (what `dist-ft aggregate` and `eval --best` read);
    # mlflow, wandb: through Accelerate's tracker API, offline by default (MLflow's SQLite
    # store trackers/mlflow.db, W&B offline runs in trackers/wandb/); optional extras.
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"])
    """Where scalars and the recipe go: tensorboard (tb/, read by aggregate), mlflow, wandb
    (offline by default; optional extras)."""

    per_rank: bool = False
    """Every rank also logs its own loss and speed to tb/rank{r}/."""

    @model_validator(mode="before")
    @classmethod
    def _tensorboard_moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "tensorboard" in data:
            raise ValueError("logging.tensorboard was replaced by logging.trackers "
                             "(a list of tensorboard, mlflow, wandb)")
        return data

    @field_validator("trackers")
    @classmethod
    def _unique_trackers(cls, trackers: list[str]) -> list[str]:
        dupes = sorted({t for t in trackers if trackers.count(t) > 1})
        if dupes:
            raise ValueError(f"trackers must be unique; repeated: {', '.join(dupes)}")
        return trackers


# Values that end up on ``#SBATCH`` lines: Slurm's own syntax, nothing a shell would act on
# (no whitespace, quotes, ``$``, ``;``, backticks or newlines).
_SLURM_WORD = re.compile(r"[A-Za-z0-9_.,+-]+")
_SLURM_CONSTRAINT = re.compile(r"[A-Za-z0-9_.,:&|*!\[\]()-]+")
_SLURM_MEM = re.compile(r"\d+[KMGT]?")


SLURM_TIME_FORMATS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
_SLURM_TIME = re.compile(r"(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                         r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)")


def slurm_time_seconds(text: str) -> int:
    """A Slurm time limit in seconds, from any of its formats (``sbatch --time``): MM, MM:SS,
    HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.

    Raises:
        ValueError: not one of those formats, a field out of range (minutes or seconds past
            59, hours past 23 after a day count) or no time at all; the message says which.
    """
    match = _SLURM_TIME.fullmatch(text)
    if match is None:
        raise ValueError(f"must be a Slurm time limit ({SLURM_TIME_FORMATS}), e.g. 04:00:00 "
                         f"or 2-00:00:00; got {text!r}")
    g = {k: int(v) for k, v in match.groupdict().items() if v is not None}
    if "days" in g:
        days, hours, minutes, seconds = g["days"], g["dh"], g.get("dm", 0), g.get("ds", 0)
        limits = {"hours": (hours, 23), "minutes": (minutes, 59), "seconds": (seconds, 59)}
    elif "c" in g:  # HH:MM:SS
        days, hours, minutes, seconds = 0, g["a"], g["b"], g["c"]
        limits = {"minutes": (minutes, 59), "seconds": (seconds, 59)}
    else:  # MM or MM:SS
        days, hours, minutes, seconds = 0, 0, g["a"], g.get("b", 0)
        limits = {"seconds": (seconds, 59)}
    for name, (value, top) in limits.items():
        if value > top:
            raise ValueError(f"{text!r} is not a Slurm time limit: {name} {value} is past {top} "
                             f"(formats: {SLURM_TIME_FORMATS})")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total == 0:
        # Slurm reads 0 as "no limit"; submitit needs a real one.
        raise ValueError(f"{text!r} is no time at all; give a limit such as 04:00:00")
    return total


class LaunchConfig(Section):
    """``launch``: SLURM resources used by ``dist-ft submit`` (its flags override these)."""

    cluster: Literal["slurm", "local"] = "slurm"
    """``slurm`` submits with sbatch; ``local`` runs the job on this machine."""
    nodes: PositiveInt = 1
    """Nodes to allocate."""
    gpus_per_node: NonNegInt = 0
    """GPUs per node, also processes per node; 0 = CPU, one process per node."""
    cpus_per_task: PositiveInt | None = None
    """CPUs per process (``--cpus-per-task``; default: Slurm's)."""
    partition: str | None = None
    """Slurm partition (``--partition``)."""
    time: str = "01:00:00"
    """Time limit (``--time``: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS); quote it."""
    account: str | None = None
    """Slurm account charged (``--account``)."""
    qos: str | None = None
    """Slurm quality of service (``--qos``)."""
    constraint: str | None = None
    """Node features required (``--constraint``, e.g. ``a100``)."""
    mem: str | None = None
    """Memory per node (``--mem``, e.g. ``64G``)."""
    max_requeues: NonNegInt = 3
    """Self-requeues after SIGUSR2 (preemption or time limit)."""
    signal_delay_s: PositiveInt = 120
    """SIGUSR2 comes this many seconds before the time limit (to checkpoint and requeue)."""

    @field_validator("time", mode="before")
    @classmethod
    def _slurm_time(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            # YAML 1.1 reads an unquoted 12:00:00 as the number 43200 (base 60).
            raise ValueError(f"got the number {value}: quote the time limit, e.g. '12:00:00' "
                             "(YAML reads unquoted 12:00:00 as 43200 and 30 as a number)")
        if isinstance(value, str):
            slurm_time_seconds(value)
        return value

    @field_validator("partition", "account", "qos")
    @classmethod
    def _slurm_word(cls, value: str | None) -> str | None:
        if value is not None and not _SLURM_WORD.fullmatch(value):
            raise ValueError(f"must be a Slurm name (letters, digits, _ . , + -); got {value!r}")
        return value

    @field_validator("constraint")
    @classmethod
    def _slurm_constraint(cls, value: str | None) -> str | None:
        if value is not None and not _SLURM_CONSTRAINT.fullmatch(value):
            raise ValueError("must be a Slurm feature expression (names with & | , [ ] * ! "
                             f"( ) :), no spaces or shell characters; got {value!r}")
        return value

    @field_validator("mem")
    @classmethod
    def _slurm_mem(cls, value: str | None) -> str | None:
        if value is not None and not _SLURM_MEM.fullmatch(value):
            raise ValueError(f"must be a Slurm memory size such as 64G or 512000M; got {value!r}")
        return value


class Recipe(Section):
    """A whole training recipe, as loaded from YAML plus overrides."""

    model: ModelConfig
    """The network: architecture, initial weights, number of outputs."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Where images come from and how they are batched."""
    plan: PlanConfig = Field(default_factory=PlanConfig)
    """Freeze stages: what trains when."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer, learning rate, weight decay and parameter groups."""
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    """Length of the run, backend, precision and numerics."""
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    """Logging cadence and trackers."""
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    """SLURM resources for ``dist-ft submit``."""
    output_dir: Annotated[str, Field(min_length=1), PathValue()] = "runs/default"
    """PATH of the run folder: checkpoints, logs, tb/, best/."""
