"""Standard exports: a backbone as safetensors weights in timm's Hugging Face layout, and back.

A finetuned backbone leaves dncut as the folder timm writes for the Hub (``timm.models._hub.save_for_hf``)::

    export_hf(backbone, "out/hf")  ->  out/hf/model.safetensors   the FULL timm model's state dict
                                       out/hf/config.json         timm's config: architecture, model_args,
                                                                  pretrained_cfg (mean/std of the backbone's
                                                                  row), and a "dncut" block (backbone name,
                                                                  tap, stride, channels)

which loads without dncut, e.g. ``timm.create_model("local-dir:out/hf", pretrained=True)`` or
``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file="out/hf/model.safetensors"),
**model_args)``, and with dncut: ``load_hf("out/hf")`` (the ``Backbone``) or
``create_backbone(name, checkpoint="out/hf/model.safetensors")``. ``push_hf`` uploads the same folder
with timm's ``push_to_hf_hub``. ``readme=True`` adds ``README.md``, the model card (``model_card``):
from a run folder (``dncut export RUN``, ``RunFacts``) it states the starting weights and their
licence (``license:`` in its front matter), the training data and image count, the steps and the
recipe, the validation results, and the paper's citation.

The timm model is ``dncut.backbones.timm_arch(spec)``: heads dncut builds without (ViT ``head``) are
absent from it too; layers after the tapped one (frozen, never finetuned) are exported as they are.

A training run folder is exported by ``dncut export RUN``, and at the end of every run by the
training's rank-0 worker (``dncut.train``). Note: ``pretrained_cfg_overlay=dict(file=...)`` keeps
timm's default ``pretrained_cfg`` (ImageNet mean/std); ``local-dir:`` reads ``config.json``'s.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from dncut.backbone_specs import BackboneSpec
from dncut.backbones import EXPORT_FORMAT, Backbone, create_backbone, timm_arch
from dncut.storage import Storage

HF_WEIGHTS_FILE = "model.safetensors"  # timm.models._hub.HF_SAFE_WEIGHTS_NAME
HF_CONFIG_FILE = "config.json"
README_FILE = "README.md"
ExportFormat = Literal["safetensors", "hf"]
_TASK = "image-feature-extraction"  # the Hub's pipeline tag for backbones
# pretrained_cfg entries that describe timm's own weights of the architecture, not the exported ones
_SOURCE_FACTS = ("tag", "license", "origin_url", "paper_ids", "paper_name", "notes")
HUB_LICENCES = ("apache-2.0", "cc-by-nc-4.0", "bsd-3-clause")  # licence ids of the Hub's own list we meet
# the paper (title, authors and affiliations as /work/shared/paper.md gives them; it names no venue or year)
CITATION = """@misc{liu_gould_dncut,
  title  = {Unsupervised Dense Prediction using Differentiable Normalized Cuts},
  author = {Liu, Yanbin and Gould, Stephen},
  note   = {Auckland University of Technology; Australian National University}
}"""


# ----------------------------------------------------------------------------------------------
# Backbone -> timm model and its Hub metadata
# ----------------------------------------------------------------------------------------------


def timm_model(backbone: Backbone) -> nn.Module:
    """The full timm model of ``backbone``'s row (``timm_arch``), holding ``backbone``'s weights, in eval mode.

    Raises:
        ValueError: the backbone's state dict does not load strictly into the timm model (names the keys).
    """
    import timm

    arch, kwargs = timm_arch(backbone.spec)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    try:
        model.load_state_dict(backbone.model.state_dict(), strict=True)
    except RuntimeError as err:
        raise ValueError(f"{backbone.name}: its weights do not fit timm's {arch}({kwargs}): {err}") from err
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in _SOURCE_FACTS}
    return model.eval()


def _save_args(backbone: Backbone) -> dict[str, Any]:
    """``model_config`` / ``data_config`` for timm's ``save_for_hf`` and ``push_to_hf_hub``."""
    s = backbone.spec
    dncut = {"format": EXPORT_FORMAT, "version": 1, "backbone": s.name, "tap": s.tap, "stride": s.stride,
             "channels": s.channels}
    return {"model_config": {"dncut": dncut}, "data_config": {"mean": list(s.mean), "std": list(s.std)}}


@dataclass(frozen=True)
class RunFacts:
    """What a model card says about the training run behind the weights
    (``dncut.train.driver.run_facts`` reads them from a run folder).

    Attributes:
        run: the run folder.
        pretrained: ``model.pretrained``; checkpoint: ``model.checkpoint`` (the starting weights).
        data: where the training images came from (``data.train``, or the generated scenes).
        images: how many training images the run listed (``None``: not recorded).
        steps: the last step in the metric history; total_steps: the run's planned steps.
        recipe: name -> value of the training recipe (batch, lr, optimizer, loss, crops, NCut).
        validation: name -> value of the validation results (first, best and final ``val_iou`` with steps).
    """

    run: str
    pretrained: bool
    checkpoint: str | None
    data: str
    images: int | None
    steps: int | None
    total_steps: int | None
    recipe: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)


def weights_licence(spec: BackboneSpec, pretrained: bool, checkpoint: str | None) -> str | None:
    """The licence of the weights a run started from, where ``spec`` knows it: the row's built-in
    weights (``pretrained``, no checkpoint), or for a row without built-in weights the release its
    checkpoint comes from (``spec.licence``, e.g. MoCo v3); ``None`` otherwise (another checkpoint,
    random initialisation, an unknown licence)."""
    if not spec.licence:
        return None
    if checkpoint is None:
        return spec.licence if pretrained and spec.weights else None
    return None if spec.weights else spec.licence


def _starting_weights(spec: BackboneSpec, run: RunFacts) -> str:
    if run.checkpoint:
        return f"`model.checkpoint` {run.checkpoint}"
    if run.pretrained and spec.weights:
        return f"pretrained: {spec.weights}"
    return "random initialisation (no pretrained weights)"


def model_card(backbone: Backbone, run: RunFacts | None = None) -> dict[str, Any]:
    """The model card fields of timm's ``generate_readme`` for ``backbone``; with ``run``, also the
    starting weights and their licence, the training data, steps and recipe, the validation results
    and the paper's citation. ``license`` is the starting weights' (``weights_licence``) where known:
    a Hub licence id as it is, another (``dinov3-license``) as ``other`` + ``license_name``; else ``other``."""
    s = backbone.spec
    arch, _ = timm_arch(s)
    licence = weights_licence(s, run.pretrained, run.checkpoint) if run is not None else None
    card: dict[str, Any] = {
        "description": f"Dense feature extractor finetuned with dncut (differentiable normalized cuts) from "
                       f"`{s.name}`. Features: `{s.tap}`, (B, 3, H, W) -> (B, {s.channels}, H/{s.stride}, "
                       f"W/{s.stride}). The license follows the starting weights.",
        "details": {"Model Type": "Image feature backbone (dense features)", "Architecture": arch,
                    "dncut backbone": s.name,
                    "Input": f"RGB in [0, 1], normalised with mean {list(s.mean)}, std {list(s.std)}"},
        "tags": [_TASK, "timm", "dncut"],
        "usage": "```python\nimport timm\nmodel = timm.create_model('local-dir:FOLDER', pretrained=True)"
                 "  # or 'hf-hub:REPO_ID'\n# dncut: dncut.export.load_hf('FOLDER')\n```",
        "license": licence if licence in HUB_LICENCES else "other",
        "citation": [CITATION],
    }
    if licence is not None and licence not in HUB_LICENCES:
        card["license_name"] = licence
    if run is not None:
        card["details"].update({
            "Starting weights": _starting_weights(s, run),
            "Licence of the starting weights": licence or (
                "unknown (see the starting weights)" if run.checkpoint or (run.pretrained and s.weights)
                else "none: random initialisation"),
            "Training data": f"{run.data}, {run.images if run.images is not None else 'an unrecorded number of'} "
                             "images",
            "Training steps": f"{run.steps if run.steps is not None else 'unknown'} of {run.total_steps}",
            "Training recipe": dict(run.recipe),
            "Validation": dict(run.validation) or "none recorded",
            "Run folder": run.run,
        })
    return card


# ----------------------------------------------------------------------------------------------
# Write, push, read
# ----------------------------------------------------------------------------------------------


def _join(folder: str, name: str) -> str:
    return Storage.join(str(folder), name) if "://" in str(folder) else str(Path(folder).expanduser() / name)


def export_hf(backbone: Backbone, folder: str, store: Storage | None = None, *, readme: bool = False,
              run: RunFacts | None = None) -> list[str]:
    """Write ``backbone`` in timm's Hugging Face layout with timm's ``save_for_hf``.

    Args:
        backbone: Any dncut backbone.
        folder: Local folder or ``s3://`` prefix (created / overwritten file by file).
        store: the storage handle for an ``s3://`` folder (``None``: the environment's defaults).
        readme: Also write ``README.md``, the model card timm's ``push_to_hf_hub`` would add.
        run: the training run's facts for the model card (``model_card``).

    Returns:
        The written files: ``model.safetensors``, ``config.json`` (and ``README.md``).

    Raises:
        ValueError: the weights do not fit the timm architecture (see ``timm_model``).
    """
    from timm.models._hub import generate_readme, save_for_hf

    store = store or Storage()
    model = timm_model(backbone)
    names = [HF_WEIGHTS_FILE, HF_CONFIG_FILE] + ([README_FILE] if readme else [])
    with tempfile.TemporaryDirectory() as tmp:
        save_for_hf(model, tmp, safe_serialization=True, **_save_args(backbone))
        if readme:
            text = generate_readme(model_card(backbone, run), f"{backbone.name} (dncut)", task_name=_TASK)
            Path(tmp, README_FILE).write_text(text, encoding="utf-8")
        uris = [_join(folder, name) for name in names]
        for name, uri in zip(names, uris):  # weights first: a config.json is never ahead of its weights
            store.write_bytes(uri, Path(tmp, name).read_bytes())
    return uris


def push_hf(backbone: Backbone, repo_id: str, *, token: str | None = None, private: bool = False,
            run: RunFacts | None = None) -> str:
    """Upload ``backbone`` to the Hugging Face Hub with timm's ``push_to_hf_hub`` (safetensors only).

    Returns:
        The commit URL.

    Raises:
        RuntimeError: the push failed (no network, no or read-only token, bad repo id); names the repo.
    """
    from timm.models._hub import push_to_hf_hub

    model = timm_model(backbone)
    try:
        commit = push_to_hf_hub(model, repo_id, token=token, private=private, safe_serialization=True,
                                model_card=model_card(backbone, run), task_name=_TASK, **_save_args(backbone))
    except Exception as err:  # the hub client's network/auth errors share no base class across its versions
        raise RuntimeError(f"could not push {backbone.name} to the Hugging Face Hub repo {repo_id!r}: "
                           f"{type(err).__name__}: {err} (needs network access to the Hub and a write token: "
                           f"HF_TOKEN or `hf auth login`)") from err
    return str(getattr(commit, "commit_url", commit))


def load_hf(uri: str, store: Storage | None = None) -> Backbone:
    """Rebuild the backbone of an ``export_hf`` folder: its ``config.json`` names it, ``model.safetensors`` fills it.

    Args:
        uri: The folder (local or ``s3://``), or its ``config.json`` / ``model.safetensors``.
        store: the storage handle for ``s3://`` (``None``: the environment's defaults).

    Returns:
        The backbone (train mode, CPU), as ``create_backbone`` returns it.

    Raises:
        ValueError: ``config.json`` without a ``dncut`` block, or unreadable/corrupted weights (names the file).
        FileNotFoundError: a file is missing.
    """
    store = store or Storage()
    folder = str(uri).rstrip("/")
    if folder.endswith((HF_CONFIG_FILE, HF_WEIGHTS_FILE)):
        folder = folder.rsplit("/", 1)[0] if "/" in folder else "."
    config_uri = _join(folder, HF_CONFIG_FILE)
    try:
        cfg = json.loads(store.read_bytes(config_uri))
        name = str(cfg["dncut"]["backbone"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{config_uri}: not a dncut export config (needs \"dncut\": {{\"backbone\": NAME}}): "
                         f"{err!r}") from err
    backbone = create_backbone(name, checkpoint=_join(folder, HF_WEIGHTS_FILE), store=store)
    norm = cfg.get("pretrained_cfg", {})
    if (tuple(norm.get("mean", ())), tuple(norm.get("std", ()))) != (backbone.mean, backbone.std):
        warnings.warn(f"{config_uri}: mean/std {norm.get('mean')}/{norm.get('std')} differ from {name}'s row in "
                      f"dncut.backbone_specs {backbone.mean}/{backbone.std}; the backbone applies the row's",
                      stacklevel=2)
    return backbone
