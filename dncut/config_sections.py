"""The sections of the run configuration (``model``, ``ncut``, ``loss``, ``data``, ``storage``,
``train``, ``scaling``, ``eval``, ``found``, ``tune``, ``tracking``): typed fields with their
defaults, ranges and choices, each described with the recommended value and what goes wrong away
from it. ``dncut.config.Config`` assembles them, validates across sections and loads YAML;
import them from ``dncut.config``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag
from pydantic import ValidationInfo, field_validator, model_validator

from dncut.backbone_specs import spec

EvalKind = Literal[
    "folder", "ecssd", "duts_te", "dut_omron", "sod", "voc07", "voc12", "coco20k", "coco", "scenes"
]
EvalMethod = Literal["simple", "tokencut", "most", "found"]
MIN_ROWS_PER_STEP = 2
"""Usable rows a worker needs for a training step: BatchNorm in training mode needs more than one
value per channel, and the loop skips a step with fewer rows (``dncut.train.loop``)."""
DISCOVERY_ONLY_METHODS = ("most",)  # multi-object boxes: scored on discovery sets only


class ConfigError(ValueError):
    """A config that cannot be used; the message names the dotted key(s) at fault.

    Args:
        message: the whole text.
        problems: one line per mistake (``"model.backbon: unknown key, ..."``), where validation
            found several; empty for a single-cause error, whose message is the one problem.
        source: the file (or ``<config>``) the mistakes are in.
    """

    def __init__(self, message: str, *, problems: tuple[str, ...] | list[str] = (), source: str = "") -> None:
        super().__init__(message)
        self.problems, self.source = tuple(problems), source


def _check_backbone(name: str) -> str:
    """``name`` if it has a row in ``dncut.backbone_specs`` (else ValueError listing the valid names)."""
    return spec(name).name


Backbone = Annotated[str, AfterValidator(_check_backbone)]


def _non_empty(values: list) -> list:
    if not values:
        raise ValueError("empty list: give at least one value")
    return values


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # NaN passes unbounded fields, inf passes gt=0


# --------------------------------------------------------------------------- model / ncut / loss
class ModelConfig(Section):
    """Encoder + projector + predictor (paper Sec. 3.3)."""

    backbone: Backbone = Field("efficientnet_lite0", validate_default=True, description="a name from `dncut backbones` (dncut.backbone_specs); vit_small_patch16_224.dino for the paper; efficientnet_lite0(_s16) are the only ones with real weights offline")
    pretrained: bool = Field(True, description="true: start from pretrained weights (the method finetunes; from scratch NCut masks are noise and training collapses)")
    checkpoint: str | None = Field(None, description="local path or s3:// URI of weights to start from; overrides pretrained weights; null = none")
    trusted_checkpoint: bool = Field(False, description="false: checkpoints are read with torch.load(weights_only=True) (tensors and containers only); true allows full unpickling of model.checkpoint and eval.checkpoints that also hold numpy scalars, pathlib paths or other objects -- it can run code stored in the file, so only for files you trust")
    projector: bool = Field(True, description="true; false is the 'no projector' ablation, which collapses (paper Tab. 5)")
    proj_dim: int = Field(256, ge=1, description="256 (authors); output channels of projector and predictor")
    hidden_dim: int | None = Field(None, ge=1, description="null = backbone channels (384 for ViT-S, as the authors)")
    freeze_encoder_bn: bool = Field(False, description="false: the encoder's BatchNorm statistics adapt to the training crops (better on sod-val's held-out half: docs/results.md, 'Does finetuning help on real photos?'); true keeps the pretrained running statistics (eval mode) while the weights train (CNN backbones only; ViTs have none)")


class NCutConfig(Section):
    """Graph and eigensolver of the differentiable NCut layer (paper Eq. 1, 6)."""

    affinity: Literal["relu", "binary"] = Field("relu", description="relu: W = max(f f^T, 0) (paper, differentiable); binary: TokenCut's 1[f f^T > tau], no gradient through W")
    tau: float = Field(0.0, description="0.0 for relu (authors), 0.2 for binary (TokenCut); too high disconnects the graph")
    laplacian: Literal["normalized", "unnormalized"] = Field("normalized", description="normalized (paper Eq. 6); unnormalized L = D - W is the authors' training code")
    solver: Literal["eigh", "lobpcg"] = Field("lobpcg", description="lobpcg (default): batched block solver, same z2 and gradients as eigh to 1e-7, ~40x faster fwd+bwd on an H200; eigh: the exact reference, ~10-24x the backbone cost at paper scale")


class LossConfig(Section):
    """Mask-consistency loss + structural regularization (paper Eq. 12)."""

    alpha: float = Field(0.05, ge=0.0, description="0.05 (paper); 0 collapses to a half-split mask, large values pin masks to the templates")
    temperature: float = Field(0.05, gt=0.0, description="0.05 (authors): mask = sigmoid(z2 / T); larger gives soft, uninformative masks, smaller saturates the BCE")
    consistency: Literal["mask", "pixel"] = Field("mask", description="mask (paper); pixel is the Tab. 5 ablation (dense cross-entropy, much worse)")
    regularization: bool = Field(True, description="true; false is the Tab. 5 ablation, which collapses")
    iou_threshold: float = Field(0.5, ge=0.0, le=1.0, description="0.5 (authors): samples whose two masks agree below this IoU are dropped (lowered by 0.05 until min_pass pass)")
    min_pass: int = Field(20, ge=0, description="20 (authors), capped at the per-worker batch; 0 lets an entire batch be dropped")


# --------------------------------------------------------------------------- data / storage
class DataConfig(Section):
    """Where images come from and how the two views are made (REFERENCE §1-2)."""

    train: str | None = Field(None, description="null = generated scenes; else a local folder or s3://bucket/prefix of images (ImageNet train for the paper)")
    val: str | None = Field(None, description="null = generated scenes; else a saliency folder with images/ and masks/ (local or s3://)")
    num_scenes: int = Field(256, ge=1, description="generated training scenes when train is null; too few overfits")
    val_scenes: int = Field(32, ge=1, description="generated validation scenes when val is null")
    crop_size: int = Field(224, ge=16, description="224 (paper); must be a multiple of the backbone stride (`dncut backbones`), checked on load")
    crop_scale: tuple[float, float] = Field((0.2, 1.0), description="(0.2, 1.0) (paper) RandomResizedCrop area range; small minimum crops give views with little shared object")
    min_overlap: float = Field(0.01, ge=0.0, lt=1.0, description="0.01 (authors): view 2 must overlap view 1 by this fraction of its area; 0 allows empty overlaps")
    photometric: bool = Field(True, description="true: DINO colour jitter / grayscale / blur / solarize (drawn on the CPU, applied batched on the training device: dncut.photometric); false makes the task trivially consistent")
    min_image_size: int = Field(32, ge=1, description="images with a shorter side are skipped (corrupt or thumbnails)")
    decode_cpus: float = Field(1.0, gt=0.0, description="CPUs per Ray Data decode-and-crop task; too few starves the GPUs (bench/ingest.py: pairs/s per core)")

    @field_validator("crop_scale")
    @classmethod
    def _check_crop_scale(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"need 0 < low <= high <= 1, got {list(value)}")
        return value


class StorageConfig(Section):
    """S3-compatible endpoint settings; credentials come from the environment / AWS chain only."""

    endpoint_url: str | None = Field(None, description="null = AWS; set for MinIO / moto, e.g. http://127.0.0.1:5000")
    region: str | None = Field(None, description="null = from the environment; e.g. us-east-1")
    anonymous: bool = Field(False, description="true: unsigned requests, for public buckets (no credentials needed)")
    profile: str | None = Field(None, description="a named profile of ~/.aws/config / credentials (as AWS_PROFILE); null = the default credential chain")


# --------------------------------------------------------------------------- train / scaling
class TrainConfig(Section):
    """Optimisation. Effective lr = lr * scale(batch_size / base_batch_size), scale from
    ``lr_scaling``: linear r, sqrt sqrt(r), none 1. With ``epochs`` set, the run length is
    ``epochs * floor(num_examples / batch_size)`` steps and ``max_steps`` is ignored."""

    max_steps: int = Field(100, ge=1, description="optimizer steps when epochs is null")
    batch_size: int = Field(32, ge=1, description="GLOBAL batch, split evenly across scaling.num_workers; 256 for ViT-S/16, 64 for ViT-S/8 (paper)")
    lr: float = Field(5e-4, gt=0.0, description="5e-4 at base_batch_size (paper); the peak after warm-up")
    base_batch_size: int = Field(256, ge=1, description="batch size at which lr is given (256, paper)")
    lr_scaling: Literal["linear", "sqrt", "none"] = Field("linear", description="linear (Goyal et al.); sqrt for adaptive optimisers at very large batch; none uses lr as is")
    optimizer: Literal["adamw", "lars"] = Field("adamw", description="lars (SGD momentum + LARS, trust 0.001) as the authors; adamw for small runs")
    weight_decay: float = Field(5e-4, ge=0.0, description="5e-4 (authors)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="0.9 (authors; lars only)")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps (authors: one epoch); 0 risks an early collapse")
    min_lr: float = Field(1e-6, ge=0.0, description="1e-6: end of the cosine schedule; must not exceed the effective lr")
    grad_clip: float | None = Field(3.0, gt=0.0, description="3.0 global grad-norm clip; null disables (NCut gradients spike at near-degenerate eigenvalues)")
    amp: bool = Field(True, description="bf16 autocast for the backbone on GPU only (the NCut layer turns autocast off: f f^T in float32, the eigensolver in float64)")
    log_every: int = Field(10, ge=1, description="steps between metric reports")
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints (plus one at the end)")
    keep_checkpoints: int = Field(3, ge=1, description="checkpoints kept by Ray Train (CheckpointConfig.num_to_keep)")
    keep_checkpoints_by: Literal["newest", "val_iou"] = Field("newest", description="newest: the last keep_checkpoints; val_iou: the keep_checkpoints with the highest val_iou (Ray Train always keeps the newest too, for resuming)")
    export: Literal["last", "best_val_iou"] = Field("last", description="which encoder backbone.pth holds: last = the final step; best_val_iou = the validation with the highest val_iou (early stopping: data.val must then be images you do not report on)")
    val_every: int | None = Field(None, ge=1, description="steps between validations (val_iou); null = only at the end")
    max_nan_steps: int = Field(5, ge=0, description="consecutive non-finite losses skipped before the run fails; 0 fails on the first")
    epochs: int | None = Field(None, ge=1, description="2 (paper); if set, replaces max_steps by epochs * floor(dataset size / batch_size)")

    @model_validator(mode="after")
    def _check_schedule(self) -> TrainConfig:
        if self.min_lr > self.effective_lr():
            raise ValueError(
                f"train.min_lr={self.min_lr} exceeds the effective lr {self.effective_lr():.3g} "
                "(lr scaled by batch_size / base_batch_size): the cosine would rise"
            )
        if self.epochs is None and self.warmup_steps > self.max_steps:
            raise ValueError(
                f"train.warmup_steps={self.warmup_steps} exceeds train.max_steps={self.max_steps}"
            )
        return self

    def effective_lr(self) -> float:
        """Peak lr: ``lr * r`` (linear), ``lr * sqrt(r)`` (sqrt) or ``lr`` (none), r = batch_size / base_batch_size."""
        ratio = self.batch_size / self.base_batch_size
        scale = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[self.lr_scaling]
        return self.lr * scale

    def total_steps(self, num_examples: int | None = None) -> int:
        """Run length in optimizer steps.

        Args:
            num_examples: training-set size; required when ``epochs`` is set.

        Returns:
            ``max_steps``, or ``epochs * max(1, num_examples // batch_size)`` when ``epochs`` is set.
        """
        if self.epochs is None:
            return self.max_steps
        if num_examples is None or num_examples < 1:
            raise ValueError(f"train.epochs={self.epochs} needs the dataset size, got {num_examples}")
        return self.epochs * max(1, num_examples // self.batch_size)


class ScalingConfig(Section):
    """Ray Train workers (ScalingConfig / FailureConfig)."""

    num_workers: int = Field(1, ge=1, description="data-parallel workers; 8 for one 8-GPU node")
    use_gpu: bool = Field(False, description="true on GPU clusters; false runs on CPU")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs reserved per worker; leave the rest to Ray Data decoding")
    gpus_per_worker: float = Field(1.0, gt=0.0, description="1; used only when use_gpu")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the latest checkpoint; -1 = unlimited")


# --------------------------------------------------------------------------- eval
class EvalDataset(Section):
    """One evaluation set; ``kind`` selects the layout reader (REFERENCE §3)."""

    name: str = Field(description="label in tables and output folders, unique per config")
    kind: EvalKind = Field(description="layout: folder (images/ + masks/), ecssd, duts_te, dut_omron, sod (saliency); voc07, voc12, coco20k, coco (images + an instances JSON, e.g. coco-mini) (discovery, CorLoc); scenes (generated)")
    root: str | None = Field(None, description="dataset root, local or s3://; required unless kind is scenes")
    annotations: str | None = Field(None, description="annotation file/folder when not at its usual place under root (e.g. COCO20k json)")
    image_list: str | None = Field(None, description="text file of image ids (COCO20k's 19,817, VOC trainval); null = the kind's default")
    limit: int | None = Field(None, ge=1, description="first N images only (quick checks); for scenes the number generated (null = data.val_scenes)")
    include_crowd: bool = Field(False, description="COCO layouts: keep iscrowd=1 regions as ground-truth boxes; false (default) drops them, as LOST, TokenCut, FOUND and MOST do")
    task: Literal["segmentation"] | None = Field(None, description="null = the kind's task (saliency, or discovery for voc07/voc12/coco20k/coco); segmentation (coco kind, needs annotations): unsupervised semantic segmentation (Table 3 protocol, eval.segmentation) of the polygons rasterised to the 21 PASCAL VOC classes")

    @model_validator(mode="after")
    def _check_root(self) -> EvalDataset:
        if self.kind != "scenes" and self.root is None:
            raise ValueError(f"dataset {self.name!r} of kind {self.kind!r} needs a root")
        if self.task == "segmentation" and (self.kind != "coco" or not self.annotations):
            raise ValueError(f"dataset {self.name!r}: task segmentation needs kind coco and 'annotations' "
                             f"(an instances JSON with polygons), got kind {self.kind!r}")
        return self


class SegmentationEval(Section):
    """Unsupervised semantic segmentation (paper Table 3; Leopart's protocol, REFERENCE §7)."""

    image_size: int = Field(448, ge=16, description="448 (protocol): images resized to image_size x image_size, bilinear")
    overcluster_k: int = Field(500, ge=2, description="500 (protocol) clusters for the majority-vote score; 100 suits a few hundred images")
    seeds: Annotated[list[int], AfterValidator(_non_empty)] = Field(default_factory=lambda: [0, 1, 2, 3, 4], description="k-means seeds, mean reported (protocol: 5)")


class EvalConfig(Section):
    """Saliency (IoU, accuracy, maxFβ) and discovery (CorLoc) evaluation (REFERENCE §3)."""

    datasets: list[EvalDataset] = Field(default_factory=lambda: [EvalDataset(name="scenes", kind="scenes")], description="sets to evaluate; default one generated-scenes set")
    methods: Annotated[list[EvalMethod], AfterValidator(_non_empty)] = Field(default_factory=lambda: ["simple"], description="simple (paper, z2 > 0), tokencut (seed + connected component), most (multi-object boxes, discovery sets only), found (a trained 1x1 head: eval.found_heads)")
    found_heads: list[str] = Field(default_factory=list, description="FOUND head files (dncut found-train writes <run>/found_head.safetensors), local or s3://; each (backbone, checkpoint) evaluated with method found uses the head trained on exactly those weights")
    bilateral: bool = Field(False, description="also score the bilateral-solver refinement (slow on CPU)")
    checkpoints: Annotated[list[str | None], AfterValidator(_non_empty)] = Field(default_factory=lambda: [None], description="checkpoints to compare, local or s3://; null = the backbone's pretrained weights")
    backbones: Annotated[list[Backbone], AfterValidator(_non_empty)] | None = Field(None, description="null = [model.backbone]")
    image_size: int | None = Field(320, ge=16, description="saliency: long side resized to this; null = keep size, pad to the patch multiple (discovery protocol)")
    batch_size: int = Field(16, ge=1, description="images per inference batch; same-size images share one batched NCut call (16-32 is fastest on CPU)")
    num_actors: int = Field(1, ge=1, description="Ray Data inference actors (backbone + NCut): one per GPU; on CPU, CPUs beyond the actors decode and score in parallel tasks (2 cores: 1 actor beats 2)")
    gpus_per_actor: float = Field(0.0, ge=0.0, description="0 on CPU; fractional (e.g. 0.25) packs actors on one GPU")
    examples: int = Field(8, ge=0, description="images in the PNG example grid; 0 = none")
    segmentation: SegmentationEval = Field(default_factory=SegmentationEval, description="datasets with task: segmentation")

    @model_validator(mode="after")
    def _check_found(self) -> EvalConfig:
        if "found" in self.methods and not self.found_heads:
            raise ValueError("method found needs eval.found_heads: the head files `dncut found-train` writes "
                             "(<output_dir>/<run_name>/found_head.safetensors)")
        return self

    @field_validator("datasets")
    @classmethod
    def _check_names(cls, value: list[EvalDataset]) -> list[EvalDataset]:
        names = [d.name for d in _non_empty(value)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"dataset names must be unique, repeated: {dupes}")
        return value


class FoundConfig(Section):
    """FOUND's head (``dncut found-train``, REFERENCE §7): one 1x1 convolution trained on the frozen
    ``model.backbone`` / ``model.checkpoint`` features of the unlabelled ``data.train`` images;
    defaults are FOUND's recipe."""

    steps: int = Field(500, ge=1, description="500 (FOUND) optimizer steps")
    batch_size: int = Field(50, ge=1, description="50 (FOUND) GLOBAL batch, split across scaling.num_workers")
    lr: float = Field(0.05, gt=0.0, description="0.05 (FOUND, AdamW)")
    lr_step: int = Field(50, ge=1, description="50 (FOUND): StepLR period in steps")
    lr_gamma: float = Field(0.95, gt=0.0, le=1.0, description="0.95 (FOUND): StepLR factor")
    bkg_steps: int = Field(100, ge=0, description="100 (FOUND): steps that learn from the background pseudo-mask; later steps learn from the head's own mask")
    crop_size: int = Field(224, ge=16, description="224 (FOUND); a multiple of the backbone stride")
    crop_scale: tuple[float, float] = Field((0.1, 3.0), description="(0.1, 3.0) (FOUND) RandomResizedCrop area range; draws above 1 do not fit and are redrawn, as in torchvision")
    blur_p: float = Field(0.5, ge=0.0, le=1.0, description="0.5 (FOUND): probability of a Gaussian blur, sigma U(0.1, 2)")

    @field_validator("crop_scale")
    @classmethod
    def _check_scale(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < value[0] <= value[1]:
            raise ValueError(f"crop_scale must be (a, b) with 0 < a <= b, got {tuple(value)}")
        return value


# --------------------------------------------------------------------------- tune
class LogUniform(Section):
    """Log-uniform distribution on [low, high); YAML ``{low: 0.01, high: 0.2}``."""

    low: float = Field(description="lower bound, > 0")
    high: float = Field(description="upper bound, > low")

    @model_validator(mode="after")
    def _check_range(self) -> LogUniform:
        if self.low <= 0:
            raise ValueError(f"log-uniform low must be > 0, got {self.low}")
        if self.low >= self.high:
            raise ValueError(f"log-uniform needs low < high, got low={self.low} high={self.high}")
        return self


def _space_tag(value: Any) -> str:
    return "loguniform" if isinstance(value, (dict, LogUniform)) else "grid"


_Grid = Annotated[list[float], AfterValidator(_non_empty), Tag("grid")]
SearchSpace = Annotated[Union[Annotated[LogUniform, Tag("loguniform")], _Grid], Discriminator(_space_tag)]
"""A list of values (grid search) or ``{low, high}`` (log-uniform sampling); a scalar means [x]."""
UNION_TAGS: dict[str, Any] = {"loguniform": LogUniform, "grid": list[float]}


class ASHA(Section):
    """Asynchronous successive halving; times are in units of ``time_attr``."""

    grace_period: int = Field(ge=1, description="a trial runs at least this long before it can be stopped; too short kills slow starters")
    reduction_factor: int = Field(2, ge=2, description="2-4; keeps 1/reduction_factor of trials per rung")
    max_t: int | None = Field(None, ge=1, description="null = the trial's full length")
    time_attr: str = Field("training_iteration", description="result key that measures progress (one training_iteration per report)")

    @model_validator(mode="after")
    def _check_max_t(self) -> ASHA:
        if self.max_t is not None and self.max_t <= self.grace_period:
            raise ValueError(f"asha needs max_t > grace_period, got {self.max_t} <= {self.grace_period}")
        return self


class TuneConfig(Section):
    """Ray Tune sweep: one TorchTrainer per trial (REFERENCE §5)."""

    alpha: SearchSpace = Field(default_factory=lambda: [0.05], description="loss.alpha values or {low, high}; 0 collapses")
    lr: SearchSpace = Field(default_factory=lambda: [5e-4], description="train.lr values (before batch scaling) or {low, high}")
    backbones: Annotated[list[Backbone], AfterValidator(_non_empty)] | None = Field(None, description="grid over model.backbone; null = [model.backbone]")
    checkpoints: dict[str, str] = Field(default_factory=dict, description="per-backbone starting weights {backbone: local path or s3://}, e.g. the DINO ResNet-50 or MoCo v3 checkpoints; replaces model.checkpoint / model.pretrained for that backbone")
    num_samples: int = Field(1, ge=1, description="repeats of the grid (samples of log-uniform axes)")
    metric: str = Field("val_iou", description="reported metric to optimise")
    mode: Literal["max", "min"] = Field("max", description="max for val_iou")
    asha: ASHA | None = Field(None, description="null = run every trial to the end (FIFO)")
    max_concurrent_trials: int | None = Field(None, ge=1, description="null = derived from cluster resources; too many starves Ray Data and hangs at 'backpressured'")
    storage_path: str | None = Field(None, description="null = <output_dir>/tune; local or s3://")
    name: str = Field("sweep", description="experiment name; rerun with the same storage_path + name to resume")
    evaluate_best: bool = Field(True, description="after the sweep, run the eval section on the best trial's exported backbone (results table under <sweep>/best_eval)")

    @field_validator("alpha", "lr", mode="before")
    @classmethod
    def _scalar_to_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @field_validator("alpha", "lr")
    @classmethod
    def _check_signs(cls, value: LogUniform | list[float], info: ValidationInfo) -> Any:
        bad = [v for v in value if v < 0 or (info.field_name == "lr" and v == 0)] if isinstance(value, list) else []
        if bad:
            raise ValueError(f"{info.field_name} values must be {'> 0' if info.field_name == 'lr' else '>= 0'}, got {bad}")
        return value


class TrackingConfig(Section):
    """Experiment tracking, written by rank 0 (``dncut.tracking``): ``metrics.jsonl`` always,
    TensorBoard event files, and MLflow / W&B through their own clients (Ray Train's guide)."""

    tensorboard: bool = Field(True, description="TensorBoard event files under output_dir/run_name/tensorboard (tensorboardX)")
    mlflow: bool = Field(False, description="log params and metrics to MLflow (pip install mlflow-skinny)")
    mlflow_tracking_uri: str | None = Field(None, description="null = MLFLOW_TRACKING_URI, else ./mlruns")
    mlflow_experiment: str = Field("dncut", min_length=1, description="MLflow experiment name")
    wandb: bool = Field(False, description="log config and metrics to Weights & Biases (pip install wandb; WANDB_API_KEY)")
    wandb_project: str = Field("dncut", min_length=1, description="W&B project")
    wandb_mode: Literal["online", "offline"] = Field("online", description="offline writes ./wandb for a later `wandb sync`")
