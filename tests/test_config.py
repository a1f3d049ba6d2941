"""Tests for dncut.config: YAML files, dotted overrides, readable errors, round trips."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest
import yaml
from pydantic import BaseModel

from dncut import config as cfg
from dncut import storage
from dncut.config import Config, ConfigError, LogUniform, load_config, parse_config, save_config

ROOT = Path(__file__).resolve().parents[1]
YAML_FILES = sorted((ROOT / "configs").glob("*/*.yaml"))
EXPECTED_FILES = {
    "train/smoke.yaml", "train/demo.yaml", "train/vits16_dino.yaml", "train/vits8_dino.yaml",
    "train/vitb16_mae.yaml", "train/vits16_mocov3.yaml", "train/resnet50_dino.yaml",
    "eval/smoke.yaml", "eval/paper.yaml", "sweep/smoke.yaml", "sweep/paper.yaml",
}


def _error(data: dict | None = None, overrides: list[str] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data or {}, overrides)
    return str(info.value)


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- YAML files
def test_all_config_files_present():
    names = {str(p.relative_to(ROOT / "configs")) for p in YAML_FILES}
    assert EXPECTED_FILES <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_yaml_loads_round_trips_and_pickles(path: Path, tmp_path: Path):
    config = load_config(path)
    # Every key written in the file is what the config holds (nothing silently dropped).
    raw = yaml.safe_load(path.read_text())
    dumped = config.model_dump(mode="json")
    for section, values in raw.items():
        if isinstance(values, dict):
            for key, value in values.items():
                if not isinstance(value, (dict, list)):
                    assert dumped[section][key] == value, f"{section}.{key}"
        else:
            assert dumped[section] == values
    again = load_config(_write(tmp_path, config.to_yaml()))
    assert again == config
    assert pickle.loads(pickle.dumps(config)) == config
    assert cloudpickle.loads(cloudpickle.dumps(config)) == config


def test_smoke_and_paper_settings():
    smoke = load_config(ROOT / "configs/train/smoke.yaml")
    assert (smoke.model.backbone, smoke.model.pretrained) == ("vit_tiny_test", False)
    assert (smoke.data.crop_size, smoke.train.batch_size, smoke.train.checkpoint_every) == (64, 4, 3)
    assert smoke.data.train is None and smoke.train.max_steps <= 10
    paper = load_config(ROOT / "configs/train/vits16_dino.yaml")
    assert paper.train.optimizer == "lars" and paper.train.epochs == 2
    assert paper.train.batch_size == 256 and math.isclose(paper.train.effective_lr(), 5e-4)
    assert paper.data.train.startswith("s3://") and paper.scaling.use_gpu
    vits8 = load_config(ROOT / "configs/train/vits8_dino.yaml")
    assert vits8.train.batch_size == 64 and math.isclose(vits8.train.effective_lr(), 5e-4)
    sweep = load_config(ROOT / "configs/sweep/smoke.yaml")
    assert len(sweep.tune_backbones()) == 2 and sweep.tune.alpha == [0.02, 0.1] and sweep.tune.lr == [5e-4]


# --------------------------------------------------------------------------- defaults
def test_empty_yaml_and_none_give_defaults(tmp_path: Path):
    assert load_config(_write(tmp_path, "")) == Config()
    config = load_config(None)
    assert config == Config()
    assert config.model.backbone == "efficientnet_lite0"
    assert config.eval_backbones() == ["efficientnet_lite0"] == config.tune_backbones()
    assert [d.kind for d in config.eval.datasets] == ["scenes"]
    assert config.eval.checkpoints == [None]


def test_every_field_is_documented():
    seen = set()

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
        for sub in (Config, cfg.ASHA, LogUniform, cfg.EvalDataset):
            walk(sub)
        for field in model.model_fields.values():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation)

    walk(Config)
    assert cfg.TrainConfig in seen and cfg.ASHA in seen


# --------------------------------------------------------------------------- overrides
def test_overrides_of_each_type(tmp_path: Path):
    path = _write(tmp_path, "train:\n  batch_size: 8\n")
    config = load_config(path, [
        "train.max_steps=70",                      # int
        "train.lr=1e-4",                           # float (YAML reads '1e-4' as a string)
        "loss.alpha=0.125",                        # float
        "model.pretrained=false",                  # bool
        "model.backbone=resnet50",                 # str
        "train.grad_clip=null",                    # None
        "eval.methods=[simple, tokencut]",         # list
        "data.crop_scale=[0.3, 0.9]",              # tuple
        "tune.lr={low: 1.0e-5, high: 1.0e-3}",     # mapping -> LogUniform
        "tune.asha.grace_period=2",                # section that is null by default
        "eval.datasets.0.limit=3",                 # list item by index
        "run_name=my-run",
    ])
    assert config.train.batch_size == 8  # from the file
    assert config.train.max_steps == 70 and isinstance(config.train.max_steps, int)
    assert config.train.lr == 1e-4 and config.loss.alpha == 0.125
    assert config.model.pretrained is False and config.model.backbone == "resnet50"
    assert config.train.grad_clip is None
    assert config.eval.methods == ["simple", "tokencut"]
    assert config.data.crop_scale == (0.3, 0.9)
    assert config.tune.lr == LogUniform(low=1e-5, high=1e-3)
    assert config.tune.asha is not None and config.tune.asha.grace_period == 2
    assert config.tune.asha.reduction_factor == 2
    assert config.eval.datasets[0].limit == 3 and config.eval.datasets[0].kind == "scenes"
    assert config.run_name == "my-run"


def test_later_override_wins_and_scalar_search_space():
    config = parse_config({}, ["loss.alpha=0.1", "loss.alpha=0.2", "tune.alpha=0.3"])
    assert config.loss.alpha == 0.2 and config.tune.alpha == [0.3]


def test_with_overrides_mapping_keeps_original():
    base = load_config(ROOT / "configs/sweep/smoke.yaml")
    trial = base.with_overrides({"loss.alpha": 0.02, "model.backbone": "efficientnet_lite0_s16"})
    assert trial.loss.alpha == 0.02 and trial.model.backbone == "efficientnet_lite0_s16"
    assert base.loss.alpha == 0.05 and base.model.backbone == "vit_tiny_test"
    with pytest.raises(ConfigError, match=r"loss\.alpha"):
        base.with_overrides({"loss.alpha": -1.0})


@pytest.mark.parametrize("override, fragment", [
    ("train.max_steps", "key.sub=value"),
    ("=3", "key.sub=value"),
    ("train..lr=1", "empty part"),
    ("model.backbone.name=x", "model.backbone"),
    ("eval.datasets.5.limit=1", "eval.datasets.5"),
    ("train.lr=[1", "not valid YAML"),
])
def test_malformed_overrides(override: str, fragment: str):
    assert fragment in _error(overrides=[override])


# --------------------------------------------------------------------------- error messages
def test_unknown_top_level_key_in_yaml(tmp_path: Path):
    path = _write(tmp_path, "modle:\n  backbone: resnet50\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "modle: unknown key" in msg and "did you mean 'model'" in msg
    assert "run_name" in msg and "tune" in msg  # the valid keys at that level
    assert str(path) in msg
    assert info.value.__suppress_context__  # no pydantic traceback chained for users


def test_unknown_nested_key_in_yaml_and_override():
    msg = _error({"train": {"bach_size": 8}})
    assert "train.bach_size: unknown key" in msg and "did you mean 'batch_size'" in msg
    assert "valid keys under 'train'" in msg and "warmup_steps" in msg
    msg = _error(overrides=["ncut.solvr=eigh"])
    assert "ncut.solvr" in msg and "'solver'" in msg
    msg = _error(overrides=["eval.datasets.0.nmae=x"])
    assert "eval.datasets.0.nmae" in msg and "'name'" in msg
    msg = _error(overrides=["tune.alpha={low: 0.1, hihg: 1.0}"])
    assert "tune.alpha.hihg" in msg and "'high'" in msg


def test_credentials_are_not_config_keys():
    msg = _error({"storage": {"aws_secret_access_key": "x"}})
    assert "storage.aws_secret_access_key: unknown key" in msg


@pytest.mark.parametrize("override, key", [
    ("train.batch_size=abc", "train.batch_size"),
    ("train.lr=fast", "train.lr"),
    ("model.pretrained=maybe", "model.pretrained"),
    ("data.crop_scale=[0.2, x]", "data.crop_scale.1"),
    ("eval.checkpoints=oops", "eval.checkpoints"),
    ("model=resnet50", "model"),
])
def test_wrong_type_names_the_key(override: str, key: str):
    msg = _error(overrides=[override])
    assert f"\n  {key}:" in msg, msg


def test_bad_literal_lists_choices():
    msg = _error(overrides=["ncut.affinity=reul"])
    assert "ncut.affinity" in msg and "'reul'" in msg and "'relu'" in msg and "'binary'" in msg
    msg = _error(overrides=["train.optimizer=sgd"])
    assert "train.optimizer" in msg and "'adamw'" in msg and "'lars'" in msg
    msg = _error(overrides=["eval.methods=[simple, bogus]"])
    assert "eval.methods.1" in msg and "'tokencut'" in msg
    msg = _error({"eval": {"datasets": [{"name": "x", "kind": "voc"}]}})
    for kind in ("folder", "ecssd", "duts_te", "dut_omron", "sod", "voc07", "voc12", "coco20k", "scenes"):
        assert f"'{kind}'" in msg


def test_several_errors_reported_together():
    msg = _error({"loss": {"alpha": -1, "temperature": 0}, "ncut": {"laplacian": "sym"}})
    assert "loss.alpha" in msg and "loss.temperature" in msg and "ncut.laplacian" in msg


def test_range_checks():
    assert "loss.alpha" in _error(overrides=["loss.alpha=-0.1"])
    assert "loss.temperature" in _error(overrides=["loss.temperature=0"])
    assert "data.crop_scale" in _error(overrides=["data.crop_scale=[0.9, 0.2]"])
    assert "run_name" in _error(overrides=["run_name=a/b"])
    assert "needs a root" in _error({"eval": {"datasets": [{"name": "E", "kind": "ecssd"}]}})
    assert "unique" in _error({"eval": {"datasets": [{"name": "s", "kind": "scenes"}] * 2}})
    assert "eval.methods" in _error(overrides=["eval.methods=[]"])
    assert "train.warmup_steps" in _error(overrides=["train.warmup_steps=200", "train.max_steps=100"])
    assert "train.min_lr" in _error(overrides=["train.min_lr=1.0"])


def test_batch_must_split_over_workers():
    msg = _error(overrides=["train.batch_size=10", "scaling.num_workers=4"])
    assert "train.batch_size=10" in msg and "scaling.num_workers=4" in msg
    config = parse_config({}, ["train.batch_size=12", "scaling.num_workers=4"])
    assert config.train.batch_size // config.scaling.num_workers == 3


@pytest.mark.parametrize("batch,workers", [(1, 1), (2, 2), (4, 4)])
def test_batch_of_one_row_per_worker_is_refused_with_the_reason(batch: int, workers: int):
    # a worker's step skips batches under MIN_ROWS_PER_STEP rows: such a run could only stop later
    # with a misleading "non-finite loss" error, so it is refused at validation
    msg = _error(overrides=[f"train.batch_size={batch}", f"scaling.num_workers={workers}"])
    assert "1 row per worker" in msg and "BatchNorm" in msg and f"train.batch_size >= {2 * workers}" in msg
    parse_config({}, [f"train.batch_size={2 * workers}", f"scaling.num_workers={workers}"])


def test_backbone_names():
    """Config validation reads the one backbone table: every registered name passes (the two
    registries once disagreed on resnet50_s32), anything else fails with the valid names."""
    from dncut.backbone_specs import list_backbones

    for name in list_backbones():
        crop = {"efficientnet_lite0": 224, "resnet50_s32": 224}.get(name, 224)
        assert parse_config({}, [f"model.backbone={name}", f"data.crop_size={crop}"]).model.backbone == name
    msg = _error(overrides=["model.backbone=resnet5"])
    assert "model.backbone" in msg and "'resnet50'" in msg and "resnet50_s32" in msg
    assert "model.backbone" in _error(overrides=["model.backbone=vit_large_patch14_dinov2"])
    assert "tune.backbones.1" in _error(overrides=["tune.backbones=[resnet50, resnet18]"])
    assert "eval.backbones.0" in _error(overrides=["eval.backbones=[convnext]"])


def test_crop_size_must_fit_the_backbone_stride():
    """The stride comes from the table, so a bad crop fails at load time, naming both keys."""
    msg = _error(overrides=["model.backbone=efficientnet_lite0", "data.crop_size=208"])
    assert "data.crop_size=208" in msg and "stride 32" in msg
    assert parse_config({}, ["model.backbone=efficientnet_lite0_s16", "data.crop_size=208"]).data.crop_size == 208


# --------------------------------------------------------------------------- tune search space
@pytest.mark.parametrize("override, fragment", [
    ("tune.alpha=[]", "tune.alpha: empty"),
    ("tune.lr=[]", "tune.lr: empty"),
    ("tune.backbones=[]", "tune.backbones: empty"),
    ("tune.alpha={low: 0.2, high: 0.1}", "low < high"),
    ("tune.alpha={low: 0.1, high: 0.1}", "low < high"),
    ("tune.lr={low: 0, high: 0.1}", "low must be > 0"),
    ("tune.lr={low: -1.0e-3, high: 0.1}", "low must be > 0"),
    ("tune.lr=[0.0, 1.0e-3]", "tune.lr"),
    ("tune.alpha=[-0.05]", "tune.alpha"),
    ("tune.asha={grace_period: 5, max_t: 5}", "max_t > grace_period"),
    ("tune.asha.reduction_factor=3", "tune.asha.grace_period: required"),
    ("tune.mode=maximize", "'max'"),
])
def test_search_space_errors(override: str, fragment: str):
    assert fragment in _error(overrides=[override])


def test_search_space_forms():
    config = parse_config({"tune": {"alpha": {"low": 0.01, "high": 0.2}, "lr": [1e-4, 5e-4]}})
    assert isinstance(config.tune.alpha, LogUniform) and config.tune.alpha.high == 0.2
    assert config.tune.lr == [1e-4, 5e-4]
    assert parse_config(yaml.safe_load(config.to_yaml())) == config


# --------------------------------------------------------------------------- schedule rules
def test_effective_lr_rules():
    # lr 4e-4 given for batch 256; run at batch 64: r = 1/4.
    base = {"lr": 4e-4, "base_batch_size": 256, "batch_size": 64}
    linear = parse_config({"train": {**base, "lr_scaling": "linear"}}).train.effective_lr()
    sqrt = parse_config({"train": {**base, "lr_scaling": "sqrt"}}).train.effective_lr()
    none = parse_config({"train": {**base, "lr_scaling": "none"}}).train.effective_lr()
    assert math.isclose(linear, 1e-4) and math.isclose(sqrt, 2e-4) and math.isclose(none, 4e-4)


def test_total_steps_from_epochs():
    train = parse_config({"train": {"epochs": 2, "batch_size": 256}}).train
    assert train.total_steps(1_281_167) == 2 * 5004  # ImageNet, last partial batch dropped
    assert train.total_steps(10) == 2  # at least one step per epoch
    with pytest.raises(ValueError, match="train.epochs"):
        train.total_steps()
    assert parse_config({"train": {"max_steps": 33}}).train.total_steps(10**6) == 33


# --------------------------------------------------------------------------- files and hooks
def test_save_config_round_trip(tmp_path: Path):
    config = load_config(ROOT / "configs/train/smoke.yaml", ["tune.alpha={low: 0.01, high: 0.1}"])
    target = tmp_path / "run" / "checkpoint_000003" / "config.yaml"
    save_config(config, target)
    assert load_config(target) == config
    assert yaml.safe_load(target.read_text())["model"]["backbone"] == "vit_tiny_test"


def test_remote_paths_need_hooks(tmp_path: Path):
    config = Config()
    with pytest.raises(ConfigError, match="writer"):
        save_config(config, "s3://bucket/run/config.yaml")
    with pytest.raises(ConfigError, match="reader"):
        load_config("s3://bucket/run/config.yaml")
    store: dict[str, bytes] = {}
    save_config(config, "s3://bucket/c.yaml", writer=store.__setitem__)
    assert load_config("s3://bucket/c.yaml", reader=store.__getitem__) == config


def test_bad_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(_write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))
    assert issubclass(ConfigError, ValueError)


def test_import_has_no_side_effects():
    code = "import sys, dncut.config; print(any(m in sys.modules for m in ('torch', 'ray', 'timm')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bundled_configs_resolve_by_name_and_kind(tmp_path):
    from dncut.config import ConfigError, resolve_config

    root = Path(__file__).resolve().parents[1] / "configs"
    assert Path(resolve_config("vits16_dino")) == root / "train" / "vits16_dino.yaml"
    assert Path(resolve_config("smoke", "sweep")) == root / "sweep" / "smoke.yaml"  # the command's folder first
    assert Path(resolve_config("eval/smoke.yaml", "train")) == root / "eval" / "smoke.yaml"
    with pytest.raises(ConfigError, match="ambiguous: train/smoke, sweep/smoke, eval/smoke"):
        resolve_config("smoke")
    with pytest.raises(ConfigError, match="no bundled config.*train/vits16_dino"):
        resolve_config("vits16_dinov2")
    own = tmp_path / "smoke.yaml"
    own.write_text("seed: 1\n")
    assert resolve_config(str(own)) == str(own)  # an existing file wins over a bundled name
    assert resolve_config("missing/dir/x.yaml") == "missing/dir/x.yaml"  # a path: load_config names it


def test_absolute_paths_cover_every_local_path_a_worker_reads(tmp_path: Path, monkeypatch):
    """What the driver hands Ray workers and Tune's trials (other working directories): every local
    path of the config made absolute against the driver's directory, ``~`` expanded; URIs and nulls
    as given."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = parse_config({
        "output_dir": "runs", "model": {"checkpoint": "~/w.pth"}, "data": {"train": "s3://b/train", "val": "val"},
        "tune": {"backbones": ["vit_tiny_test", "resnet50"],
                 "checkpoints": {"vit_tiny_test": "w/t.pth", "resnet50": "s3://b/r.pth"}},
        "eval": {"datasets": [{"name": "a", "kind": "coco", "root": "coco", "annotations": "ann/i.json",
                               "image_list": "ids.txt", "limit": 3},
                              {"name": "b", "kind": "duts_te", "root": "s3://b/duts"},
                              {"name": "c", "kind": "scenes"}],
                 "checkpoints": [None, "ck/a.pth", "s3://b/c.pth"], "found_heads": ["h/head.safetensors"]}})
    out = cfg.with_absolute_paths()
    here = str(tmp_path)
    assert (out.output_dir, out.model.checkpoint) == (f"{here}/runs", f"{here}/home/w.pth")
    assert (out.data.train, out.data.val) == ("s3://b/train", f"{here}/val")
    assert [(d.root, d.annotations) for d in out.eval.datasets] == [
        (f"{here}/coco", f"{here}/ann/i.json"), ("s3://b/duts", None), (None, None)]
    assert (out.eval.datasets[0].image_list, out.eval.datasets[0].limit) == (f"{here}/ids.txt", 3)
    assert out.tune.checkpoints == {"vit_tiny_test": f"{here}/w/t.pth", "resnet50": "s3://b/r.pth"}
    assert out.eval.checkpoints == [None, f"{here}/ck/a.pth", "s3://b/c.pth"]
    assert out.eval.found_heads == [f"{here}/h/head.safetensors"]
    assert out.with_absolute_paths() is out  # nothing left to resolve: the same object
    assert storage.absolute("s3://b/x") == "s3://b/x" and storage.absolute(None) is None
    assert storage.absolute("gs://b/x") == "gs://b/x"  # left for the storage to refuse by its scheme
    with pytest.raises(storage.StorageError, match="unsupported URI scheme 'gs'"):
        storage.read_bytes(storage.absolute("gs://b/x"))
