"""Ray Data training input: image source -> decode and crop (CPU) -> two uint8 views, streamed to
the workers, who augment them on their device (``dncut.photometric``).

    epoch_rows(uris, seed, epochs)            {"uri", "epoch", "key" = crc32(uri)}: every epoch's
                                              files in a permutation seeded by (seed, epoch)
      -> map (CPU task, ViewMaker): read bytes -> header -> crop boxes -> decode (torchvision's
         libjpeg-turbo, or a JPEG draft at the smallest DCT scale that serves both crops) -> two
         crops resized to S, flips, the photometric parameters; every draw from an rng seeded
         by (seed, epoch, key)
      -> rows {"view1", "view2": (3, S, S) uint8, "box1", "box2": (4,) float32, "flip1", "flip2":
               bool, "aug1", "aug2": (13,) float32, "epoch", "key": int, "ok": bool,
               "failure": (1024,) uint8 "<reason>\n<uri>" when not ok}
      -> worker: iter_torch_batches (device, pinned memory, prefetch) -> dncut.train.model_inputs

So ``seed`` fixes the file order of every epoch and every augmentation draw: the same config
gives the same views (the Ray Data order is preserved, ``train_data_config``). Every column is
numeric, so batches arrive as tensors on the worker's device; the views stay uint8 through the
object store (a quarter of float32's bytes) and the backbone normalises (``dncut.backbones``).

An image that cannot be read or decoded (missing, corrupt, truncated, smaller than
``data.min_image_size``) becomes a row with ``ok=False`` and its reason and URI in ``failure``;
the training loop counts and drops those rows, and logs the first reasons, so nothing is lost
silently and no bad file stops the run. Generated scenes (``data.train: null``) use the same
path with ``scene://<seed>`` URIs.
"""

from __future__ import annotations

import logging
import zlib

import numpy as np
import torch

from dncut.config import Config
from dncut.data.deferred import Deferred
from dncut.data.images import IMAGE_SUFFIXES, decode_image, decode_rgb, image_size, is_jpeg
from dncut.data.scenes import make_scene
from dncut import photometric

from dncut.views import ResizedCropTransform, TwoViewTransform, reduction_for

log = logging.getLogger(__name__)

SCENE_SCHEME = "scene://"
ROWS_PER_BLOCK = 64
"""URIs per Ray Data block, i.e. per decode task (~2 ms of decode and crops a row): each task
costs the driver and the scheduler a fixed amount, so short tasks leave cores idle
(``bench/ingest.py --parts e2e``: ``ray_data`` vs ``ray_data_16_rows_per_block`` in ``bench/results/ingest.json``)."""
ORDER_STREAM, AUGMENT_STREAM = 0, 1
"""Tags that keep the file-order and augmentation random streams apart (a SeedSequence pads
short entropy with zeros, so untagged [seed, epoch] and [seed, epoch, 0] would coincide)."""
MAX_BLOCKS = 200
"""Cap for huge sources (above 12,800 rows a block holds more than ``ROWS_PER_BLOCK`` rows):
Ray Data's per-block bookkeeping grows with the number of blocks."""


def source_uris(cfg: Config) -> list[str]:
    """All training image URIs, validated before any worker starts.

    Raises:
        dncut.storage.StorageError: unreachable endpoint, missing bucket or credentials,
            empty prefix or folder — with the URI and the cause.
    """
    if cfg.data.train is None:
        return [f"{SCENE_SCHEME}{seed}" for seed in range(cfg.data.num_scenes)]
    return cfg.storage_handle().check_source(cfg.data.train, IMAGE_SUFFIXES)




FAILURE_BYTES = 1024
"""Width of a row's ``failure`` column: ``"<reason>\n<uri>"`` UTF-8, zero-padded (all zeros when
the row is fine). A fixed-width uint8 column, so every column of a row is a tensor and rows reach
the workers through ``iter_torch_batches`` (strings cannot)."""


def encode_failure(uri: str, error: str) -> np.ndarray:
    """``(FAILURE_BYTES,)`` uint8: the reason (one line), then the URI (truncated to fit)."""
    data = f"{' '.join(error.splitlines())}\n{uri}".encode()[:FAILURE_BYTES]
    out = np.zeros(FAILURE_BYTES, np.uint8)
    out[:len(data)] = np.frombuffer(data, np.uint8)
    return out


def decode_failure(column) -> tuple[str, str]:
    """``(uri, reason)`` of one row's ``failure`` column (array or tensor of uint8)."""
    text = bytes(np.asarray(column, dtype=np.uint8)).rstrip(b"\0").decode(errors="replace")
    error, _, uri = text.partition("\n")
    return uri, error


class ViewMaker:
    """Row function for ``Dataset.map``: ``{"uri", "epoch", "key"}`` -> two views (or an ``ok=False`` row).

    Args:
        cfg: the run config (``seed``, ``data``, ``storage``).
    """

    def __init__(self, cfg: Config) -> None:
        d = cfg.data
        self.seed = cfg.seed
        self.size = d.crop_size
        self.scene_size = max(2 * d.crop_size, 256)
        self.min_size = d.min_image_size
        self.store = cfg.storage_handle()
        self.photometric = d.photometric
        self.transform = TwoViewTransform(size=d.crop_size, scale=tuple(d.crop_scale), min_overlap=d.min_overlap)

    def empty_row(self, row: dict, error: str) -> dict:
        zeros, identity = np.zeros((3, self.size, self.size), np.uint8), photometric.identity_params(1)[0]
        return {"epoch": row["epoch"], "key": row["key"], "view1": zeros, "view2": zeros,
                "box1": np.zeros(4, np.float32), "box2": np.zeros(4, np.float32), "flip1": False, "flip2": False,
                "aug1": identity, "aug2": identity, "ok": False, "failure": encode_failure(row["uri"], error)}

    def views(self, row: dict, rng: np.random.Generator) -> dict:
        """The two crops of one image and their photometric parameters (``aug1``, ``aug2``: drawn
        after the crops, whether or not ``data.photometric`` applies them)."""
        views = self._crops(row["uri"], rng)
        for branch in (1, 2):
            params = photometric.sample_params(rng, branch - 1)
            views[f"aug{branch}"] = params if self.photometric else photometric.identity_params(1)[0]
        return views

    def _crops(self, uri: str, rng: np.random.Generator) -> dict:
        """Read, decode (a JPEG header first: at the smallest DCT scale that serves both crops) and crop."""
        if uri.startswith(SCENE_SCHEME):
            image, _ = make_scene(int(uri[len(SCENE_SCHEME):]), size=self.scene_size)
            return self.transform(image, rng)
        data = self.store.read_bytes(uri)
        if not is_jpeg(data):  # other formats: one decode, boxes drawn on it
            return self.transform(decode_image(data, min_size=self.min_size), rng)
        full = image_size(data)  # (W, H) from the header
        boxes = self.transform.boxes(*full, rng)
        image = decode_rgb(data, min_size=self.min_size, reduce=reduction_for(boxes, self.size))
        if isinstance(image, torch.Tensor) and (image.shape[2], image.shape[1]) != full:
            image = decode_image(data, min_size=self.min_size)  # header and decoder disagree (e.g. XMP orientation)
        return self.transform(image, rng, boxes=boxes, full_size=full)

    def __call__(self, row: dict) -> dict:
        rng = np.random.default_rng([self.seed, AUGMENT_STREAM, int(row["epoch"]), int(row["key"])])
        try:
            views = self.views(row, rng)
        except Exception as exc:  # noqa: BLE001 - any unreadable image becomes a counted skip
            return self.empty_row(row, f"{type(exc).__name__}: {exc}")
        return {"epoch": row["epoch"], "key": row["key"], **views, "ok": True,
                "failure": np.zeros(FAILURE_BYTES, np.uint8)}


class FoundViewMaker(ViewMaker):
    """Row function for FOUND's head training (``dncut.found_train``): ``{"uri", "epoch", "key"}``
    -> one RandomResizedCrop view ``(3, S, S)`` uint8 (``found.crop_size``, ``found.crop_scale``)
    and its blur ``sigma`` (float32: 0 = no blur, else U(0.1, 2) with p = ``found.blur_p``,
    applied on the worker's device), read and decoded as :class:`ViewMaker` does."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        f = cfg.found
        self.size, self.blur_p = f.crop_size, f.blur_p
        self.transform = ResizedCropTransform(size=f.crop_size, scale=tuple(f.crop_scale))

    def empty_row(self, row: dict, error: str) -> dict:
        return {"epoch": row["epoch"], "key": row["key"], "view": np.zeros((3, self.size, self.size), np.uint8),
                "sigma": np.float32(0.0), "ok": False, "failure": encode_failure(row["uri"], error)}

    def views(self, row: dict, rng: np.random.Generator) -> dict:
        view = self._crops(row["uri"], rng)["view"]
        blur = rng.random() < self.blur_p
        sigma = rng.uniform(*photometric.BLUR_SIGMA)
        return {"view": view, "sigma": np.float32(sigma if blur else 0.0)}


def found_dataset(cfg: Config, uris: list[str], start_step: int = 0):
    """The Ray Dataset of FOUND training rows for ``found.steps`` steps (as :func:`train_dataset`,
    one view per row, ``found.batch_size`` rows per step)."""
    import ray.data

    f = cfg.found
    epochs = epochs_needed(len(uris), f.steps, f.batch_size, cfg.scaling.num_workers, start_step)
    rows = epoch_rows(uris, cfg.seed, epochs)[start_step * f.batch_size:]
    return _decoded(ray.data.from_items(rows, override_num_blocks=num_blocks(len(rows))),
                    Deferred(f"{__name__}:FoundViewMaker", cfg.model_dump(mode="json")), cfg)


def _decoded(ds, maker, cfg: Config):
    """``ds`` mapped by a view maker as stateless CPU tasks (a callable instance, not a class, so
    Ray Data scales the tasks; a ``dncut.data.deferred.Deferred``, so the processes that only
    plan the dataset do not import what the maker needs), with every CPU Ray Data may use available to them.

    Ray Data reserves by default half of its resources per operator for the others
    (``DataContext.op_resource_reservation_enabled``); with the decode the only operator that
    computes, that reservation only idles cores (on 2 CPUs: one decode task at a time;
    ``bench/ingest.py --parts e2e``, ``ray_data`` vs ``ray_data_reserved``). Set on this
    dataset's own context, nothing else."""
    ds.context.op_resource_reservation_enabled = False
    return ds.map(maker, num_cpus=cfg.data.decode_cpus)


def num_blocks(num_rows: int) -> int:
    """Blocks for ``num_rows`` rows: ``ceil(num_rows / ROWS_PER_BLOCK)`` in ``[1, MAX_BLOCKS]``."""
    return max(1, min(MAX_BLOCKS, -(-num_rows // ROWS_PER_BLOCK)))


def file_key(uri: str) -> int:
    """A file's stable augmentation key: CRC-32 of its URI (independent of listing order)."""
    return zlib.crc32(uri.encode())


def epoch_rows(uris: list[str], seed: int, epochs: int) -> list[dict]:
    """``epochs`` passes over ``uris``, each in its own permutation seeded by ``(seed, epoch)``.

    Returns:
        ``[{"uri", "epoch", "key"}]`` of length ``epochs * len(uris)`` (``key`` = ``file_key(uri)``;
        with ``epoch`` and ``seed`` it seeds the file's augmentation).
    """
    ordered = sorted(uris)
    rows = []
    for epoch in range(epochs):
        for i in np.random.default_rng([seed, ORDER_STREAM, epoch]).permutation(len(ordered)):
            rows.append({"uri": ordered[i], "epoch": epoch, "key": file_key(ordered[i])})
    return rows


def epochs_needed(num_uris: int, total_steps: int, batch_size: int, num_workers: int = 1,
                  start_step: int = 0) -> int:
    """Fewest passes over the source that give every worker its full batches for steps
    ``start_step .. total_steps`` once the rows of the earlier steps are left out (Ray Train's
    ``streaming_split(equal=True)`` gives each worker ``floor(rows / num_workers)`` rows, each
    worker drops its last partial batch)."""
    epochs = max(1, -(-total_steps * batch_size // max(1, num_uris)))
    per_worker_batch = max(1, batch_size // num_workers)
    while ((epochs * num_uris - start_step * batch_size) // num_workers) // per_worker_batch < total_steps - start_step:
        epochs += 1
    return epochs


def train_dataset(cfg: Config, uris: list[str], total_steps: int, start_step: int = 0):
    """The Ray Dataset of two-view rows for a whole run (lazy; consumed once by the workers).

    Args:
        cfg: run config.
        uris: from :func:`source_uris` (validated in the driver).
        total_steps: optimizer steps of the run (``cfg.train.total_steps``).
        start_step: a resumed run's step: the rows of the steps before it are left out, so the
            run continues the same seeded stream (exactly, on one worker).

    The row list (~150 bytes a row) lives in the driver until Ray Data takes it. Why not
    ``read_binary_files`` with a seeded file shuffle per epoch (tried, measured in
    ``bench/ingest.py --parts startup``): Ray's reader lists the source once per epoch (3x the
    driver start-up on 20,000 S3 objects), a union of per-epoch datasets interleaves their blocks
    under ``preserve_order`` (epochs would mix, and a resume would skip the wrong rows), and a
    file that cannot be read would fail the read task instead of becoming a counted skip.
    """
    import ray.data

    epochs = epochs_needed(len(uris), total_steps, cfg.train.batch_size, cfg.scaling.num_workers, start_step)
    rows = epoch_rows(uris, cfg.seed, epochs)[start_step * cfg.train.batch_size:]
    return _decoded(ray.data.from_items(rows, override_num_blocks=num_blocks(len(rows))),
                    Deferred(f"{__name__}:ViewMaker", cfg.model_dump(mode="json")), cfg)


def train_data_config():
    """``ray.train.DataConfig`` that keeps the seeded row order (``preserve_order``); otherwise the
    current DataContext's options, as ``DataConfig.default_ingest_options`` (which is not called:
    it passes the deprecated ``exclude_resources`` and warns on every run)."""
    import ray.train
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    options = ExecutionOptions(resource_limits=current.resource_limits, preserve_order=True,
                               verbose_progress=current.verbose_progress)
    return ray.train.DataConfig(execution_options=options)
