"""The one typed run configuration: YAML file + dotted overrides -> a validated ``Config``.

The driver builds it once (``load_config``), Ray pickles it to every worker, and the resolved
copy is written next to every checkpoint and evaluation output (``save_config``). It holds no
tensors: ``load_config("configs/train/smoke.yaml", ["loss.alpha=0.1"]) -> Config``.

Each field's description gives the recommended value and what goes wrong away from it.
Every mistake surfaces as a ``ConfigError`` (a ``ValueError``) naming the dotted key::

    model.backbon: unknown key, did you mean 'backbone'? valid keys under 'model': backbone, ...
    ncut.affinity: invalid value 'reul'; valid choices: 'relu' or 'binary'

Credentials never live here: S3 access comes from the environment / the AWS credential chain.
"""

from __future__ import annotations

import copy
import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Mapping, Sequence, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from dncut import storage
from dncut.backbone_specs import spec

from dncut.config_sections import (  # noqa: F401 - the sections are part of this module's API
    ASHA, DISCOVERY_ONLY_METHODS, MIN_ROWS_PER_STEP, UNION_TAGS, Backbone, ConfigError, DataConfig, EvalConfig,
    EvalDataset, EvalKind, EvalMethod, FoundConfig, LogUniform, LossConfig, ModelConfig, NCutConfig, ScalingConfig,
    SearchSpace, Section, SegmentationEval, StorageConfig, TrackingConfig, TrainConfig, TuneConfig,
)


# --------------------------------------------------------------------------- root
class Config(Section):
    """Everything a run needs; an empty YAML file is a valid (demo) config."""

    run_name: str = Field("dncut", pattern=r"^[A-Za-z0-9._-]+$", description="name of the run folder under output_dir (letters, digits, . _ -)")
    output_dir: str = Field("outputs", description="local folder or s3://bucket/prefix for checkpoints, configs and reports")
    seed: int = Field(0, ge=0, description="fixes model init (torch, seed + rank), each epoch's file order and every augmentation draw (dncut.data.pipeline)")
    model: ModelConfig = Field(default_factory=ModelConfig, description="encoder + projector + predictor")
    ncut: NCutConfig = Field(default_factory=NCutConfig, description="graph and eigensolver of the NCut layer")
    loss: LossConfig = Field(default_factory=LossConfig, description="mask consistency + regularization")
    data: DataConfig = Field(default_factory=DataConfig, description="training / validation images and views")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="S3 endpoint (no credentials)")
    train: TrainConfig = Field(default_factory=TrainConfig, description="optimisation and checkpointing")
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="Ray Train workers")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="saliency / discovery evaluation")
    found: FoundConfig = Field(default_factory=FoundConfig, description="FOUND head training (dncut found-train)")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="Ray Tune sweep")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="metric history, TensorBoard, MLflow, W&B")

    @model_validator(mode="after")
    def _check_crop_stride(self) -> Config:
        stride = spec(self.model.backbone).stride
        for key, size in (("data.crop_size", self.data.crop_size), ("found.crop_size", self.found.crop_size)):
            if size % stride:
                raise ValueError(f"{key}={size} must be a multiple of the {self.model.backbone} stride {stride} "
                                 f"(e.g. {max(stride, size // stride * stride)})")
        if any(d.task == "segmentation" for d in self.eval.datasets):  # resized to S x S, not snapped
            size = self.eval.segmentation.image_size
            for name in self.eval_backbones():
                step = spec(name).stride
                if size % step:
                    raise ValueError(f"eval.segmentation.image_size={size} must be a multiple of the {name} stride "
                                     f"{step} (e.g. {max(step, size // step * step)})")
        return self

    @model_validator(mode="after")
    def _check_batch_split(self) -> Config:
        if self.train.batch_size % self.scaling.num_workers:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} (global) must be divisible by "
                f"scaling.num_workers={self.scaling.num_workers}"
            )
        per_worker = self.train.batch_size // self.scaling.num_workers
        if per_worker < MIN_ROWS_PER_STEP:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} over scaling.num_workers={self.scaling.num_workers} "
                f"gives {per_worker} row per worker; a training step needs at least {MIN_ROWS_PER_STEP} "
                f"(BatchNorm statistics and the batch-mean loss terms): set train.batch_size >= "
                f"{MIN_ROWS_PER_STEP * self.scaling.num_workers}"
            )
        return self

    def eval_backbones(self) -> list[str]:
        """Backbones to evaluate: ``eval.backbones`` or ``[model.backbone]``."""
        return list(self.eval.backbones or [self.model.backbone])

    def tune_backbones(self) -> list[str]:
        """Backbones to sweep: ``tune.backbones`` or ``[model.backbone]``."""
        return list(self.tune.backbones or [self.model.backbone])

    @property
    def run_dir(self) -> str:
        """The run folder ``output_dir/run_name`` (local path or ``s3://``): checkpoints, the resolved
        config, the export and every report of the run live under it."""
        return storage.join(self.output_dir, self.run_name)

    def with_absolute_paths(self) -> Config:
        """A copy whose local paths are absolute (``dncut.storage.absolute``: ``output_dir``,
        ``model.checkpoint``, ``data.train``, ``data.val``, every ``eval.datasets`` root, annotations
        and image list, ``eval.checkpoints``, ``eval.found_heads``, ``tune.checkpoints``; URIs and null
        stay). The driver calls it once: Ray workers (and Tune's trials, in their trial folders) run in
        their own working directories."""
        changed: dict[str, Any] = {}
        for key, value in (("output_dir", self.output_dir), ("model.checkpoint", self.model.checkpoint),
                           ("data.train", self.data.train), ("data.val", self.data.val)):
            if value and storage.absolute(value) != value:
                changed[key] = storage.absolute(value)
        datasets = [d.model_dump(mode="json") for d in self.eval.datasets]
        for d in datasets:
            d.update({k: storage.absolute(d[k]) for k in ("root", "annotations", "image_list")})
        if datasets != [d.model_dump(mode="json") for d in self.eval.datasets]:
            changed["eval.datasets"] = datasets
        for key, values in (("eval.checkpoints", self.eval.checkpoints), ("eval.found_heads", self.eval.found_heads)):
            if [storage.absolute(v) for v in values] != list(values):
                changed[key] = [storage.absolute(v) for v in values]
        per_backbone = {b: storage.absolute(v) for b, v in self.tune.checkpoints.items()}
        if per_backbone != self.tune.checkpoints:
            changed["tune.checkpoints"] = per_backbone
        return self.with_overrides(changed) if changed else self

    def storage_handle(self) -> storage.Storage:
        """The :class:`dncut.storage.Storage` built from this config's ``storage`` section; build it
        once on the driver and pass it down."""
        return storage.Storage.from_config(self.storage)

    def to_yaml(self) -> str:
        """The resolved config as YAML text that ``load_config`` reads back to an equal object."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def with_overrides(self, overrides: Sequence[str] | Mapping[str, Any]) -> Config:
        """A validated copy with dotted overrides applied; ``self`` is unchanged.

        Args:
            overrides: ``["loss.alpha=0.1"]`` (values parsed as YAML) or ``{"loss.alpha": 0.1}``
                (values used as given, e.g. Tune samples).
        """
        return parse_config(self.model_dump(mode="json"), overrides, "<config>")


# --------------------------------------------------------------------------- loading
def _unwrap(tp: Any) -> Any:
    """Strip ``Annotated`` and ``X | None`` until a model, list, tuple or real union remains."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) > 1:
                return tp
            tp = args[0]
        else:
            return tp


def _resolve_loc(loc: tuple[str | int, ...]) -> tuple[str, str, list[str]]:
    """Map a pydantic error location to (dotted key, parent key, valid keys at the parent)."""
    tp: Any = Config
    parts: list[str] = []
    parent, valid = "", list(Config.model_fields)
    for item in loc:
        tp = _unwrap(tp)
        if isinstance(item, int):
            parts.append(str(item))
            args = typing.get_args(tp)
            tp = args[item] if typing.get_origin(tp) is tuple and item < len(args) else (args[0] if args else Any)
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            parent, valid = ".".join(parts), list(tp.model_fields)
            parts.append(item)
            field = tp.model_fields.get(item)
            tp = field.annotation if field is not None else Any
        elif item in UNION_TAGS and typing.get_origin(tp) in (Union, types.UnionType):
            tp = UNION_TAGS[item]
        else:
            parts.append(str(item))
    return ".".join(parts), parent, valid


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format_error(err: Mapping[str, Any]) -> str:
    key, parent, valid = _resolve_loc(tuple(err["loc"]))
    kind, msg = err["type"], str(err["msg"]).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        name = key.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(name, valid, n=3)
        hint = f", did you mean {' or '.join(map(repr, close))}?" if close else ""
        where = f"under {parent!r}" if parent else "at the top level"
        return f"{key}: unknown key{hint} valid keys {where}: {', '.join(valid)}"
    if kind == "literal_error":
        return f"{key}: invalid value {_short(err['input'])}; valid choices: {err['ctx']['expected']}"
    if kind == "missing":
        return f"{key}: required key is missing"
    if kind == "value_error":
        return msg if not key or msg.startswith(key) else f"{key}: {msg}"
    return f"{key}: {msg} (got {_short(err['input'])})"


def _set_dotted(data: dict, dotted: str, value: Any, defaults: Mapping[str, Any]) -> None:
    """Set ``data[a][b]... = value`` for ``dotted = "a.b..."``; creates missing sections."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"override key {dotted!r} has an empty part")
    node: Any = data
    default: Any = defaults
    for depth, part in enumerate(parts):
        where = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{where}: {part!r} is not an index of a list of {len(node)}")
            index: Any = int(part)
            default = None
        elif isinstance(node, dict):
            index = part
            default = default.get(part) if isinstance(default, dict) else None
        else:
            prefix = ".".join(parts[:depth])
            raise ConfigError(f"cannot set {dotted!r}: {prefix!r} holds {_short(node)}, not a section")
        if last:
            node[index] = value
            return
        if isinstance(node, dict) and node.get(index) is None:
            if default is not None and not isinstance(default, (dict, list)):
                raise ConfigError(f"cannot set {dotted!r}: {where!r} is a value, not a section")
            node[index] = copy.deepcopy(default) if isinstance(default, list) else {}
        node = node[index]


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc


def parse_config(
    data: Mapping[str, Any],
    overrides: Sequence[str] | Mapping[str, Any] = (),
    source: str = "<dict>",
) -> Config:
    """Validate a plain mapping (e.g. parsed YAML) plus dotted overrides into a ``Config``.

    Args:
        data: nested sections as in the YAML files; ``{}`` gives the defaults.
        overrides: ``"key.sub=value"`` strings (value parsed with ``yaml.safe_load``), or a
            mapping ``{"key.sub": value}``; list items are addressed by index (``eval.datasets.0.limit``).
        source: where ``data`` came from, for error messages.

    Returns:
        The validated ``Config``; otherwise raises ``ConfigError`` naming every bad dotted key.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(data).__name__}")
    merged = copy.deepcopy(dict(data))
    pairs = overrides.items() if isinstance(overrides, Mapping) else map(_parse_override, overrides)
    defaults = Config().model_dump(mode="json")
    for key, value in pairs:
        _set_dotted(merged, key, value, defaults)
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        lines = [_format_error(err) for err in exc.errors(include_url=False)]
        raise ConfigError(f"invalid config ({source}):\n  " + "\n  ".join(lines), problems=lines,
                          source=str(source)) from None


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (lists are values)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def config_diff(old: Config, new: Config, ignore: Sequence[str] = ()) -> dict[str, tuple[Any, Any]]:
    """The dotted keys whose values differ between two configs, sorted: ``{"loss.alpha": (0.05, 0.1)}``
    (values as in the YAML; lists compared whole).

    Args:
        ignore: keys left out: an entry ending in ``.`` is a prefix (``"eval."``: every key of the
            section), any other entry one key (``"train.max_steps"``).
    """
    a, b = _flat(old.model_dump(mode="json")), _flat(new.model_dump(mode="json"))

    def ignored(key: str) -> bool:
        return any(key.startswith(f) if f.endswith(".") else key == f for f in ignore)

    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not ignored(k)}


CONFIG_KINDS = ("train", "sweep", "eval", "found")
"""Sub-folders of the bundled configs (``configs/`` in the repository, ``dncut/configs`` in the wheel)."""


def bundled_configs() -> dict[str, Path]:
    """``{"train/vits16_dino": path, ...}``: the configs shipped with dncut (the wheel's package
    data, else the repository's ``configs/`` beside the package)."""
    here = Path(__file__).resolve().parent
    for root in (here / "configs", here.parent / "configs"):
        if root.is_dir():
            return {f"{p.parent.name}/{p.stem}": p for kind in CONFIG_KINDS for p in sorted((root / kind).glob("*.yaml"))}
    return {}


def resolve_config(name: str | None, kind: str | None = None) -> str | None:
    """A ``--config`` argument -> the file to read.

    An existing file or a URI (``s3://``) is used as given; otherwise ``name`` is a bundled
    config: ``vits16_dino``, ``train/vits16_dino`` or ``train/vits16_dino.yaml``, looked up in
    ``kind``'s folder first (``dncut train --config smoke`` = ``train/smoke``).

    Raises:
        ConfigError: no such file and no (or more than one) bundled config of that name.
    """
    if name is None or "://" in name or Path(name).exists():
        return name
    stem = name[:-5] if name.endswith(".yaml") else name
    stem = stem[len("configs/"):] if stem.startswith("configs/") else stem
    bundled = bundled_configs()
    matches = [k for k in bundled if k == stem] or [k for k in bundled if k == f"{kind}/{stem}"] or \
              [k for k in bundled if k.split("/")[1] == stem]
    if len(matches) == 1:
        return str(bundled[matches[0]])
    if matches:
        raise ConfigError(f"config {name!r} is ambiguous: {', '.join(matches)}")
    if "/" in name or name.endswith((".yaml", ".yml")):
        return name  # a path: load_config names the missing file
    raise ConfigError(f"no config file {name!r} and no bundled config of that name; bundled: {', '.join(bundled)}")


def load_config(
    path: str | Path | None,
    overrides: Sequence[str] = (),
    reader: Callable[[str], bytes] | None = None,
) -> Config:
    """Read a YAML config, apply ``key.sub=value`` overrides and validate.

    Args:
        path: YAML file; ``None`` = all defaults (the demo). Remote URIs (``s3://``) need ``reader``.
        overrides: dotted ``key.sub=value`` strings applied after the file, in order.
        reader: hook for non-local paths, e.g. ``dncut.storage.read_bytes``.

    Returns:
        The validated ``Config``; ``ConfigError`` for an unreadable file, bad YAML, unknown
        keys, wrong types or values.
    """
    if path is None:
        return parse_config({}, overrides, "<defaults>")
    path = str(path)
    try:
        if reader is not None:
            text = reader(path).decode("utf-8")
        elif "://" in path:
            raise ConfigError(f"{path}: remote configs need reader=..., e.g. dncut.storage.read_bytes")
        else:
            text = Path(path).read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    return parse_config({} if data is None else data, overrides, path)


def save_config(config: Config, path: str | Path, writer: Callable[[str, bytes], None] | None = None) -> None:
    """Write ``config.to_yaml()`` to ``path`` (parents created for local paths).

    Args:
        config: the resolved config.
        path: destination file, e.g. ``<checkpoint dir>/config.yaml``.
        writer: hook for non-local paths, e.g. ``dncut.storage.write_bytes``.
    """
    text = config.to_yaml()
    if writer is not None:
        writer(str(path), text.encode("utf-8"))
        return
    if "://" in str(path):
        raise ConfigError(f"{path}: remote destinations need writer=..., e.g. dncut.storage.write_bytes")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text, encoding="utf-8")
