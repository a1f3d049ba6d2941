"""Ray Data training input: image source -> decode -> two views, streamed to the workers.

    source rows {"uri"}                       local files, s3:// objects or scene://<seed>
      -> random_shuffle (new order every epoch: the plan re-executes per epoch)
      -> map (CPU task): read bytes, decode to RGB, TwoViewTransform
      -> rows {"view1", "view2": (3, S, S) float32, "box1", "box2": (4,) float32,
               "flip1", "flip2": bool, "ok": bool, "error": str}

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
from dncut.views import IMAGENET_MEAN, IMAGENET_STD, TwoViewTransform

log = logging.getLogger(__name__)

SCENE_SCHEME = "scene://"
ROWS_PER_BLOCK = 16
"""URIs per Ray Data block, i.e. per decode task: a task per image costs more than the image
(bench/ingest.py: 1 URI per block ran at ~0.3x a torch DataLoader, 16 per block at ~1x)."""
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
    """Row function for ``Dataset.map``: URI -> two views (or an ``ok=False`` row).

    Args:
        cfg: the run config (``data``, ``storage``) and the backbone's normalisation.
        mean, std: per-channel normalisation expected by the backbone.
    """

    def __init__(self, cfg: Config, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        d = cfg.data
        self.size = d.crop_size
        self.scene_size = max(2 * d.crop_size, 256)
        self.min_size = d.min_image_size
        self.s3 = s3_options(cfg)
        self.transform = TwoViewTransform(size=d.crop_size, scale=tuple(d.crop_scale), min_overlap=d.min_overlap,
                                          mean=mean, std=std, photometric=d.photometric)

    def empty_row(self, uri: str, error: str) -> dict:
        s = self.size
        zeros = np.zeros((3, s, s), np.float32)
        return {"uri": uri, "view1": zeros, "view2": zeros, "box1": np.zeros(4, np.float32),
                "box2": np.zeros(4, np.float32), "flip1": False, "flip2": False, "ok": False, "error": error}

    def __call__(self, row: dict) -> dict:
        uri = row["uri"]
        try:
            image = load_image(uri, size=self.scene_size, min_size=self.min_size, s3=self.s3)
            views = self.transform(image, np.random.default_rng())
        except Exception as exc:  # noqa: BLE001 - any unreadable image becomes a counted skip
            return self.empty_row(uri, f"{type(exc).__name__}: {exc}")
        return {"uri": uri, "view1": views["view1"].numpy(), "view2": views["view2"].numpy(),
                "box1": views["box1"].numpy(), "box2": views["box2"].numpy(),
                "flip1": bool(views["flip1"]), "flip2": bool(views["flip2"]), "ok": True, "error": ""}


def num_blocks(num_uris: int) -> int:
    """Blocks for ``num_uris`` rows: ``ceil(num_uris / ROWS_PER_BLOCK)`` in ``[1, MAX_BLOCKS]``."""
    return max(1, min(MAX_BLOCKS, -(-num_uris // ROWS_PER_BLOCK)))


def train_dataset(cfg: Config, uris: list[str], mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The Ray Dataset of two-view rows (lazy; executed once per epoch by each consumer).

    Args:
        cfg: run config.
        uris: from :func:`source_uris` (validated in the driver).
        mean, std: the backbone's input normalisation.
    """
    import ray.data

    ds = ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=num_blocks(len(uris)))
    ds = ds.random_shuffle()
    # a callable instance (not a class) runs as stateless CPU tasks that Ray Data scales
    return ds.map(ViewMaker(cfg, mean, std), num_cpus=cfg.data.decode_cpus)
