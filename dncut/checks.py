"""User mistakes caught before Ray starts: every input of a command checked on the driver.

Each check takes seconds at most (a folder listing, a file's existence, one S3 request with a short
timeout) and raises :class:`InputError` with a one-line message that names the input (the option or
config key) and the fix. ``dncut.cli.precheck`` runs them after the config loads and before
``ray.init``; an ``InputError`` there ends the command with exit code 2 and no traceback.

What is checked:

* folders of images (``--images``, ``--masks``, ``--maps``, ``data.train``, ``data.val``): exist, are
  reachable (S3: credentials, endpoint, bucket; ``dncut.storage.Storage.check_source``) and hold images;
* files: ``--checkpoint``, ``model.checkpoint``, ``eval.checkpoints``, ``eval.found_heads`` (read and
  matched to each backbone x checkpoint), ``--annotations``;
* evaluation datasets (``eval.datasets``): their layout, through the same readers the job uses;
* output folders (``--out``, ``output_dir``): a local one's nearest existing parent is a writable folder;
* config consistency: a backbone without downloadable weights (``weights`` empty in
  ``dncut.backbone_specs``) needs a checkpoint or ``model.pretrained=false``;
* run folders (``dncut export`` / ``dncut report``): hold ``config.yaml`` (and ``backbone.pth``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence

from dncut.backbone_specs import spec as backbone_spec
from dncut.config import Config, ConfigError
from dncut.storage import Storage, StorageError

logger = logging.getLogger(__name__)

MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class InputError(ValueError):
    """A user's mistake found before any Ray work; the message names the input and the fix."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def check_folder(uri: str, what: str, store: Storage, fix: str = "",
                 suffixes: Iterable[str] | None = None) -> list[str]:
    """The files of folder ``uri`` (images unless ``suffixes`` says otherwise).

    Raises:
        InputError: missing, unreachable (S3: credentials, endpoint, bucket), or no file of ``suffixes``.
    """
    from dncut.data.images import IMAGE_SUFFIXES

    if not Storage.is_s3(uri) and not os.path.isdir(uri):
        kind = "a file, not a folder" if os.path.exists(uri) else "no such folder"
        raise InputError(f"{what} {uri}: {kind}{'; ' + fix if fix else ''}")
    try:
        return store.check_source(uri, tuple(suffixes) if suffixes is not None else IMAGE_SUFFIXES)
    except StorageError as exc:
        raise InputError(f"{what} {uri}: {_one_line(exc)}{'; ' + fix if fix else ''}") from None


def check_saliency_pairs(images: str, image_files: Sequence[str], masks: str, mask_files: Sequence[str]) -> None:
    """Images and masks pair on their stem below their folders (``dncut.data.datasets.relative_stem``):
    a layout where none pairs is a mistake, not a run of failed rows; some unpaired files are failed
    rows of the run, announced here with their counts.

    Raises:
        InputError: no image has a mask of its stem, naming one of each and the naming rule.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from dncut.data.datasets import stem_array

    image_stems = pc.unique(stem_array(images, image_files))
    mask_stems = pc.unique(stem_array(masks, mask_files))
    has_mask, has_image = pc.is_in(image_stems, value_set=mask_stems), pc.is_in(mask_stems, value_set=image_stems)
    paired = pc.sum(has_mask).as_py() or 0
    if not paired:
        image, mask = image_files[0].rsplit("/", 1)[-1], mask_files[0].rsplit("/", 1)[-1]
        raise InputError(f"--masks {masks}: none of the {len(image_stems)} images of --images has a mask of its stem "
                         f"(e.g. image {image}, mask {mask}): name each mask <image stem>.png")
    lonely, lonely_masks = len(image_stems) - paired, len(mask_stems) - paired
    if lonely or lonely_masks:
        unpaired = pa.concat_arrays([image_stems.filter(pc.invert(has_mask)), mask_stems.filter(pc.invert(has_image))])
        logger.warning("%d of %d images have no mask of their stem and %d masks no image: each is a failed row "
                       "of the run (e.g. %s)", lonely, len(image_stems), lonely_masks, pc.min(unpaired).as_py())


def check_file(uri: str, what: str, store: Storage, fix: str = "") -> None:
    """Raises InputError when file ``uri`` does not exist or cannot be reached."""
    try:
        found = os.path.isfile(uri) if not Storage.is_s3(uri) else store.exists(uri)
    except (StorageError, OSError) as exc:
        raise InputError(f"{what} {uri}: {_one_line(exc)}") from None
    if not found:
        kind = "a folder, not a file" if not Storage.is_s3(uri) and os.path.isdir(uri) else "does not exist"
        raise InputError(f"{what} {uri} {kind}{'; ' + fix if fix else ''}")


def check_output(uri: str, what: str) -> None:
    """A local output folder's nearest existing parent must be a writable folder (S3 is checked
    when written: a bucket may accept writes without listing rights).

    Raises:
        InputError: ``uri`` is a file, or its nearest existing parent is not a writable folder.
    """
    if Storage.is_s3(uri):
        return
    path = os.path.abspath(uri)
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{what} {uri} is a file; give a folder")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError(f"{what} {uri}: {parent} is a file, not a folder; choose another output folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{what} {uri}: {parent} is not writable; choose another output folder")


PREDICT_OUTPUTS = ("predictions.parquet", "masks", "z2")
"""What ``dncut predict`` writes under its output folder (``dncut.eval.jobs.predict_folder``)."""


def check_no_earlier_prediction(uri: str, what: str, store: Storage) -> None:
    """``dncut predict`` writes into a folder that holds no earlier prediction: its file names follow the
    inputs, so a second run's masks would sit beside the first's, which ``predictions.parquet`` no longer
    lists and ``dncut eval-maps`` would score all the same.

    Raises:
        InputError: naming what is there and the two ways forward.
    """
    found = [name for name in PREDICT_OUTPUTS if store.exists(Storage.join(uri, name))]
    if found:
        raise InputError(f"{what} {uri} already holds a prediction ({', '.join(found)}): its files would mix with "
                         "this run's; give a new output folder, or delete that one first")


def check_weights(backbone: str, pretrained: bool, checkpoint: str | None, where: str) -> None:
    """A backbone without downloadable weights needs a checkpoint (or ``model.pretrained=false``).

    Raises:
        InputError: naming the backbone and both fixes.
    """
    if pretrained and checkpoint is None and not backbone_spec(backbone).weights:
        raise InputError(f"{where}: backbone {backbone} has no pretrained weights to download; pass a checkpoint "
                         f"(--checkpoint / model.checkpoint) or --set model.pretrained=false for random weights")


def check_checkpoint(uri: str | None, what: str, store: Storage) -> None:
    """Raises InputError when a checkpoint is given and does not exist."""
    if uri is not None:
        check_file(uri, what, store, "give the path of a .pth / .safetensors file (local or s3://)")


def check_found_heads(cfg: Config, backbones: Sequence[str], checkpoints: Sequence[str | None],
                      store: Storage) -> None:
    """Every (backbone, checkpoint) evaluated with method found has a head (``eval.found_heads``)."""
    from dncut.eval.jobs import found_head_for

    for backbone in backbones:
        for checkpoint in checkpoints:
            try:
                found_head_for(cfg, backbone, checkpoint, store)
            except ConfigError as exc:
                raise InputError(_one_line(exc)) from None


def check_eval_datasets(cfg: Config, store: Storage, what: str | None = None) -> None:
    """Every ``eval.datasets`` entry reads (layout, annotations, images), as the job will read it;
    ``what`` names the input in messages (default ``eval.datasets.<i> (<name>)``)."""
    from dncut.data.datasets import DatasetLayoutError
    from dncut.eval.stages import dataset_records

    for i, spec in enumerate(cfg.eval.datasets):
        try:
            records = dataset_records(spec, store, cfg.data.val_scenes)
        except (DatasetLayoutError, StorageError, OSError) as exc:
            raise InputError(f"{what or f'eval.datasets.{i} ({spec.name})'}: {_one_line(exc)}") from None
        if not records:
            raise InputError(f"{what or f'eval.datasets.{i} ({spec.name})'}: no images under {spec.root}")


def check_training(cfg: Config, store: Storage) -> None:
    """``data.train``, ``data.val``, ``model.checkpoint``, the backbone's weights and ``output_dir``."""
    if cfg.data.train:
        check_folder(cfg.data.train, "data.train", store, "a folder (or s3:// prefix) of training images")
    if cfg.data.val:
        for sub in ("images", "masks"):
            check_folder(Storage.join(cfg.data.val, sub), f"data.val ({sub}/)", store,
                         "data.val is a folder with images/ and masks/ sub-folders",
                         None if sub == "images" else MASK_SUFFIXES)
    check_checkpoint(cfg.model.checkpoint, "model.checkpoint", store)
    check_weights(cfg.model.backbone, cfg.model.pretrained, cfg.model.checkpoint, "model.backbone")
    check_output(cfg.output_dir, "output_dir")


def check_evaluation(cfg: Config, store: Storage, what: str | None = None) -> None:
    """``eval.checkpoints``, the backbones' weights, FOUND heads, ``eval.datasets`` and ``output_dir``."""
    for i, checkpoint in enumerate(cfg.eval.checkpoints):
        check_checkpoint(checkpoint, f"eval.checkpoints.{i}", store)
        for backbone in cfg.eval_backbones():
            check_weights(backbone, cfg.model.pretrained, checkpoint, "eval.backbones")
    check_found_heads(cfg, cfg.eval_backbones(), cfg.eval.checkpoints, store)
    check_eval_datasets(cfg, store, what)
    check_output(cfg.output_dir, "output_dir")


def check_run_folder(run: str, store: Storage, need: Sequence[str]) -> None:
    """A training run folder (``output_dir/run_name``) holding the files ``need``.

    Raises:
        InputError: "not a run folder", naming what is missing and how runs are made.
    """
    if not Storage.is_s3(run) and not os.path.isdir(run):
        raise InputError(f"{run}: no such folder; give a training run folder output_dir/run_name "
                         "(`dncut train` writes one)")
    try:
        missing = [name for name in need if not store.exists(Storage.join(run, name))]
    except (StorageError, OSError) as exc:
        raise InputError(f"{run}: {_one_line(exc)}") from None
    if missing:
        raise InputError(f"{run} is not a run folder (no {', '.join(missing)}); give a training run folder "
                         "output_dir/run_name that `dncut train` wrote")
