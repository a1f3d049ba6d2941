"""Ray Data training input: image source -> decode -> two views, streamed to the workers.

    epoch_rows(uris, seed, epochs)            {"uri", "epoch", "index"}: every epoch's files in a
                                              permutation seeded by (seed, epoch), epochs in order
      -> map (CPU task): read bytes, decode to RGB, TwoViewTransform with an rng seeded by
                         (seed, epoch, index of the file in the sorted source)
      -> rows {"view1", "view2": (3, S, S) uint8 RGB, "box1", "box2": (4,) float32,
               "flip1", "flip2": bool, "epoch": int, "ok": bool, "error": str}

So ``seed`` fixes the file order of every epoch and every augmentation draw: the same config
gives the same views (the Ray Data order is preserved, ``train_data_config``). The views stay
uint8; the backbone normalises (``dncut.backbones.Backbone``).

An image that cannot be read or decoded (corrupt, truncated, smaller than
``data.min_image_size``) becomes a row with ``ok=False`` and the reason in ``error``; the
training loop counts and drops those rows, and logs the first reasons, so nothing is lost
silently and no bad file stops the run. Generated scenes (``data.train: null``) use the same
path with ``scene://<seed>`` URIs.
"""

from __future__ import annotations

import logging

import numpy as np

from dncut import storage
from dncut.config import Config
from dncut.data.images import IMAGE_SUFFIXES, decode_image
from dncut.data.scenes import make_scene
from dncut.views import TwoViewTransform

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
    return storage.check_source(cfg.data.train, s3_options(cfg), suffixes=IMAGE_SUFFIXES)


def load_image(uri: str, *, size: int, min_size: int, s3: storage.S3Options | None):
    """RGB PIL image of a URI (``scene://<seed>`` is generated at ``size`` px)."""
    if uri.startswith(SCENE_SCHEME):
        image, _ = make_scene(int(uri[len(SCENE_SCHEME):]), size=size)
        return image
    return decode_image(storage.read_bytes(uri, s3), min_size=min_size)


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
        zeros = np.zeros((3, self.size, self.size), np.uint8)
        return {"uri": row["uri"], "epoch": row["epoch"], "view1": zeros, "view2": zeros,
                "box1": np.zeros(4, np.float32), "box2": np.zeros(4, np.float32), "flip1": False, "flip2": False,
                "ok": False, "error": error}

    def __call__(self, row: dict) -> dict:
        uri = row["uri"]
        rng = np.random.default_rng([self.seed, AUGMENT_STREAM, int(row["epoch"]), int(row["index"])])
        try:
            image = load_image(uri, size=self.scene_size, min_size=self.min_size, s3=self.s3)
            views = self.transform(image, rng)
        except Exception as exc:  # noqa: BLE001 - any unreadable image becomes a counted skip
            return self.empty_row(row, f"{type(exc).__name__}: {exc}")
        return {"uri": uri, "epoch": row["epoch"], "view1": views["view1"].numpy(), "view2": views["view2"].numpy(),
                "box1": views["box1"].numpy(), "box2": views["box2"].numpy(),
                "flip1": bool(views["flip1"]), "flip2": bool(views["flip2"]), "ok": True, "error": ""}


def num_blocks(num_rows: int) -> int:
    """Blocks for ``num_rows`` rows: ``ceil(num_rows / ROWS_PER_BLOCK)`` in ``[1, MAX_BLOCKS]``."""
    return max(1, min(MAX_BLOCKS, -(-num_rows // ROWS_PER_BLOCK)))


def epoch_rows(uris: list[str], seed: int, epochs: int) -> list[dict]:
    """``epochs`` passes over ``uris``, each in its own permutation seeded by ``(seed, epoch)``.

    Returns:
        ``[{"uri", "epoch", "index"}]`` of length ``epochs * len(uris)``; ``index`` is the file's
        position in ``sorted(uris)`` (with ``epoch``, it seeds the file's augmentation).
    """
    ordered = sorted(uris)
    rows = []
    for epoch in range(epochs):
        for i in np.random.default_rng([seed, ORDER_STREAM, epoch]).permutation(len(ordered)):
            rows.append({"uri": ordered[i], "epoch": epoch, "index": int(i)})
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

    The row list lives in the driver until Ray Data takes it (~220 bytes a row: 0.6 GB for two
    ImageNet epochs).
    """
    import ray.data

    epochs = epochs_needed(len(uris), total_steps, cfg.train.batch_size, cfg.scaling.num_workers, start_step)
    rows = epoch_rows(uris, cfg.seed, epochs)[start_step * cfg.train.batch_size:]
    ds = ray.data.from_items(rows, override_num_blocks=num_blocks(len(rows)))
    # a callable instance (not a class) runs as stateless CPU tasks that Ray Data scales
    return ds.map(ViewMaker(cfg), num_cpus=cfg.data.decode_cpus)


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
