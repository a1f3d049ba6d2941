"""Ray Data training input: image source -> decode and crop (CPU) -> two uint8 views, streamed to
the workers, who augment them on their device (``dncut.photometric``).

    per epoch e (the ones the run needs, in order):
      read_binary_files(source, seeded file shuffle: epoch_seed(seed, e))      Ray lists and reads
        -> {"uri", "bytes", "epoch", "key" = crc32(uri)}, cut to steps_per_epoch * batch rows
      (generated scenes, data.train null: from_items of a seeded permutation of scene://<i>)
    -> union -> map (CPU task, ViewMaker): header -> crop boxes -> decode (JPEG draft at the
       smallest DCT scale that serves both crops) -> two crops resized to S, flips, and the
       photometric parameters, all from an rng seeded by (seed, epoch, key)
    -> rows {"view1", "view2": (3, S, S) uint8, "box1", "box2": (4,) float32, "flip1", "flip2":
             bool, "aug1", "aug2": (13,) float32, "epoch", "key": int, "ok": bool,
             "failure": (1024,) uint8 "<uri>\n<reason>" when not ok}
    -> worker: iter_torch_batches (device, pinned memory, prefetch) -> dncut.train.model_inputs

So ``seed`` fixes the file order of every epoch and every augmentation draw: the same config
gives the same views (the Ray Data order is preserved, ``train_data_config``). Every column is
numeric, so batches arrive as tensors on the worker's device; the views stay uint8 through the
object store (a quarter of float32's bytes) and the backbone normalises (``dncut.backbones``).

An image that cannot be read or decoded (corrupt, truncated, smaller than
``data.min_image_size``) becomes a row with ``ok=False`` and its URI and reason in ``failure``;
the training loop counts and drops those rows, and logs the first reasons, so nothing is lost
silently and no bad file stops the run.
"""

from __future__ import annotations

import logging
import zlib

import numpy as np

from dncut import storage
from dncut.config import Config
from dncut.data.images import IMAGE_SUFFIXES, decode_rgb, image_size
from dncut.data.scenes import make_scene
from dncut.photometric import identity_params
from dncut.views import TwoViewTransform, reduction_for

log = logging.getLogger(__name__)

SCENE_SCHEME = "scene://"
ROWS_PER_BLOCK = 16
"""URIs per Ray Data block, i.e. per decode task: a task per image costs more than the image
(bench/ingest.py: 1 URI per block ran at ~0.3x a torch DataLoader, 16 per block at ~1x)."""
ORDER_STREAM, AUGMENT_STREAM = 0, 1
"""Tags that keep the file-order and augmentation random streams apart (a SeedSequence pads
short entropy with zeros, so untagged [seed, epoch] and [seed, epoch, 0] would coincide)."""
MAX_BLOCKS = 200
"""Cap for huge sources: the all-to-all shuffle costs grow with blocks^2."""


def s3_options(cfg: Config) -> storage.S3Options:
    """The config's S3 endpoint/region (credentials stay in the environment)."""
    return storage.S3Options(endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region)


def source_uris(cfg: Config) -> list[str]:
    """All training image URIs, validated before any worker starts.

    Raises:
        dncut.storage.StorageError: unreachable endpoint, missing bucket or credentials,
            empty prefix or folder — with the URI and the cause.
    """
    if cfg.data.train is None:
        return [f"{SCENE_SCHEME}{seed}" for seed in range(cfg.data.num_scenes)]
    uris = storage.check_source(cfg.data.train, s3_options(cfg), suffixes=IMAGE_SUFFIXES)
    root = cfg.data.train.rstrip("/") + "/"
    # Ray Data's file readers leave out paths (relative to the source) that start with "." or "_"
    return [u for u in uris if not u[len(root):].startswith((".", "_"))]




FAILURE_BYTES = 1024
"""Width of a row's ``failure`` column: ``"<uri>\n<reason>"`` UTF-8, zero-padded (all zeros when
the row is fine). A fixed-width uint8 column, so every column of a row is a tensor and rows reach
the workers through ``iter_torch_batches`` (strings cannot)."""


def encode_failure(uri: str, error: str) -> np.ndarray:
    """``(FAILURE_BYTES,)`` uint8: ``uri`` and ``error`` (truncated to fit)."""
    data = f"{uri}\n{error}".encode()[:FAILURE_BYTES]
    out = np.zeros(FAILURE_BYTES, np.uint8)
    out[:len(data)] = np.frombuffer(data, np.uint8)
    return out


def decode_failure(column) -> tuple[str, str]:
    """``(uri, reason)`` of one row's ``failure`` column (array or tensor of uint8)."""
    text = bytes(np.asarray(column, dtype=np.uint8)).rstrip(b"\0").decode(errors="replace")
    uri, _, error = text.partition("\n")
    return uri, error


class ViewMaker:
    """Row function for ``Dataset.map``: ``{"uri", "epoch", "index"}`` -> two views (or an ``ok=False`` row).

    Args:
        cfg: the run config (``seed``, ``data``, ``storage``).
    """

    def __init__(self, cfg: Config) -> None:
        d = cfg.data
        self.seed = cfg.seed
        self.size = d.crop_size
        self.scene_size = max(2 * d.crop_size, 256)
        self.min_size = d.min_image_size
        self.s3 = s3_options(cfg)
        self.transform = TwoViewTransform(size=d.crop_size, scale=tuple(d.crop_scale), min_overlap=d.min_overlap,
                                          photometric=d.photometric)

    def empty_row(self, row: dict, error: str) -> dict:
        zeros, identity = np.zeros((3, self.size, self.size), np.uint8), identity_params(1)[0]
        return {"epoch": row["epoch"], "key": row["key"], "view1": zeros, "view2": zeros,
                "box1": np.zeros(4, np.float32), "box2": np.zeros(4, np.float32), "flip1": False, "flip2": False,
                "aug1": identity, "aug2": identity, "ok": False, "failure": encode_failure(row["uri"], error)}

    def views(self, row: dict, rng: np.random.Generator) -> dict:
        """Decode (a JPEG at the smallest DCT scale that serves both crops) and crop one image."""
        uri = row["uri"]
        if uri.startswith(SCENE_SCHEME):
            image, _ = make_scene(int(uri[len(SCENE_SCHEME):]), size=self.scene_size)
            return self.transform(image, rng)
        data = row["bytes"] if row.get("bytes") is not None else storage.read_bytes(uri, self.s3)
        full = image_size(data)  # (W, H), from the header
        boxes = self.transform.boxes(*full, rng)
        image = decode_rgb(data, min_size=self.min_size, reduce=reduction_for(boxes, self.size))
        return self.transform(image, rng, boxes=boxes, full_size=full)

    def __call__(self, row: dict) -> dict:
        rng = np.random.default_rng([self.seed, AUGMENT_STREAM, int(row["epoch"]), int(row["key"])])
        try:
            views = self.views(row, rng)
        except Exception as exc:  # noqa: BLE001 - any unreadable image becomes a counted skip
            return self.empty_row(row, f"{type(exc).__name__}: {exc}")
        return {"epoch": row["epoch"], "key": row["key"], **views, "ok": True,
                "failure": np.zeros(FAILURE_BYTES, np.uint8)}


def num_blocks(num_rows: int) -> int:
    """Blocks for ``num_rows`` rows: ``ceil(num_rows / ROWS_PER_BLOCK)`` in ``[1, MAX_BLOCKS]``."""
    return max(1, min(MAX_BLOCKS, -(-num_rows // ROWS_PER_BLOCK)))


def file_key(uri: str) -> int:
    """A file's stable augmentation key: CRC-32 of its URI (independent of listing order)."""
    return zlib.crc32(uri.encode())


def epoch_seed(seed: int, epoch: int) -> int:
    """The file-shuffle seed of one epoch (a 32-bit draw of the tagged ``(seed, epoch)`` stream)."""
    return int(np.random.default_rng([seed, ORDER_STREAM, epoch]).integers(2**31))


def steps_per_epoch(num_files: int, batch_size: int) -> int:
    """Optimizer steps in one pass: ``floor(num_files / batch_size)`` (each epoch drops its last
    partial batch, as ``DataLoader(drop_last=True)``; ``train.epochs`` counts the same way)."""
    return num_files // batch_size


def epoch_rows(uris: list[str], seed: int, epoch: int) -> list[dict]:
    """Generated scenes only (``data.train: null``): one epoch's ``{"uri", "epoch", "key"}`` rows
    in a permutation seeded by ``(seed, epoch)``."""
    ordered = sorted(uris)
    order = np.random.default_rng(epoch_seed(seed, epoch)).permutation(len(ordered))
    return [{"uri": ordered[i], "epoch": epoch, "key": file_key(ordered[i])} for i in order]


def _epoch_files(cfg: Config, uris: list[str], epoch: int, rows: int):
    """One epoch's ``{"uri", "bytes", "epoch", "key"}`` rows: Ray Data's file reader with a seeded
    file shuffle over the source (listed by Ray), or the generated scenes."""
    import ray.data
    from ray.data import FileShuffleConfig

    if cfg.data.train is None:
        return ray.data.from_items(epoch_rows(uris, cfg.seed, epoch)[:rows], override_num_blocks=num_blocks(rows))
    fs, path = storage.filesystem(cfg.data.train, s3_options(cfg))
    ds = ray.data.read_binary_files(
        path, filesystem=fs, include_paths=True, file_extensions=[e.lstrip(".") for e in IMAGE_SUFFIXES],
        shuffle=FileShuffleConfig(seed=epoch_seed(cfg.seed, epoch)), override_num_blocks=num_blocks(len(uris)))
    source = cfg.data.train.rstrip("/")
    prefix = path.rstrip("/")

    def tag(row: dict) -> dict:  # the listed path back to the source's URI form
        uri = source + row["path"][len(prefix):] if row["path"].startswith(prefix) else row["path"]
        return {"uri": uri, "bytes": row["bytes"], "epoch": epoch, "key": file_key(uri)}

    return ds.map(tag).limit(rows)


def train_dataset(cfg: Config, uris: list[str], total_steps: int, start_step: int = 0):
    """The Ray Dataset of two-view rows for a whole run (lazy; consumed once by the workers).

    Epoch ``e`` is the source in the file order of a seeded shuffle (``epoch_seed(seed, e)``),
    cut to ``steps_per_epoch * batch_size`` rows, so every step's batch lies inside one epoch;
    the epochs the run needs are chained in order.

    Args:
        cfg: run config.
        uris: from :func:`source_uris` (validated in the driver; their number sizes the epochs).
        total_steps: optimizer steps of the run (``cfg.train.total_steps``).
        start_step: a resumed run's step: the epochs before it are left out; the workers skip
            the ``start_step - data_start_step(...)`` batches of its epoch that were trained.

    Raises:
        ValueError: fewer files than one global batch.
    """
    batch = cfg.train.batch_size
    per_epoch = steps_per_epoch(len(uris), batch)
    if per_epoch < 1:
        raise ValueError(f"{len(uris)} training images are fewer than one batch (train.batch_size={batch})")
    first, last = start_step // per_epoch, -(-total_steps // per_epoch)
    epochs = [_epoch_files(cfg, uris, e, per_epoch * batch) for e in range(first, max(last, first + 1))]
    ds = epochs[0].union(*epochs[1:]) if len(epochs) > 1 else epochs[0]
    return ds.map(ViewMaker(cfg), num_cpus=cfg.data.decode_cpus)


def data_start_step(num_files: int, batch_size: int, start_step: int) -> int:
    """The step the first row of ``train_dataset(..., start_step)`` belongs to (its epoch's first)."""
    per_epoch = steps_per_epoch(num_files, batch_size)
    return start_step // per_epoch * per_epoch


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
