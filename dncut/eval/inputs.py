"""The evaluation jobs' inputs: folders listed into stems, stems paired into records.

    stems(folder, ...)                      {stem: URI} of the images below a folder (sub-folders kept)
    dataset_name(folder)                    ``.../DUTS/images`` -> ``DUTS``
    saliency_records(images, masks, store)  an images / masks folder pair -> one ``records_table``
    map_folders(maps_dirs, store)           (method, folder) per run of ``dncut eval-maps``

Every listing fails before any Ray work with a ``DatasetLayoutError`` naming the folder and the
layout expected.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable

from dncut import storage
from dncut.data.datasets import DatasetLayoutError, pair_by_stem
from dncut.data.images import IMAGE_SUFFIXES
from dncut.eval.stages import record
from dncut.eval.streamed import records_table
from dncut.storage import Storage


def stems(folder: str, what: str, layout: str, store: Storage) -> dict[str, str]:
    """``stem -> URI`` of the images below ``folder`` (stems keep their sub-folder).

    Raises:
        DatasetLayoutError: the folder is missing, unreachable or holds no image, naming ``layout``.
    """
    try:
        files = store.check_source(folder, IMAGE_SUFFIXES)
    except storage.StorageError as exc:
        raise DatasetLayoutError(f"{what} folder {folder}: {exc}; expected layout: {layout}") from None
    prefix = folder.rstrip("/") + "/"
    return {posixpath.splitext(f[len(prefix):] if f.startswith(prefix) else posixpath.basename(f))[0]: f
            for f in files}


def dataset_name(folder: str) -> str:
    """A dataset's name from its folder: ``.../DUTS/images`` -> ``DUTS``, ``.../ECSSD`` -> ``ECSSD``."""
    parts = [p for p in folder.rstrip("/").split("/") if p]
    generic = {"images", "masks", "gt", "imgs", "image", "mask"}
    return parts[-2] if len(parts) > 1 and parts[-1].lower() in generic else (parts[-1] if parts else folder)


def saliency_records(images_dir: str, masks_dir: str, store: Storage):
    """The records of an images / masks folder pair as one ``records_table`` (``dncut.eval.streamed``:
    the listing's dicts are dropped on return): the pairs by stem, sorted, then the images without a
    mask and the masks without an image, each a record with ``missing`` set (a failed row).

    Raises:
        DatasetLayoutError: a folder is missing, unreachable or holds no image.
    """
    layout = "--images DIR of <stem>.jpg|png images and --masks DIR of <stem>.png masks (same stems)"
    images = stems(images_dir, "images", layout, store)
    masks = stems(masks_dir, "masks", layout, store)
    samples, lonely, lonely_masks = pair_by_stem(images, masks)
    records = [record(s.image_id, s.image_uri, s.mask_uri) for s in samples]
    records += [record(s, images[s], missing=f"no mask named {s}.* in {masks_dir}") for s in lonely]
    records += [record(s, "", masks[s], missing=f"no image named {s}.* in {images_dir} (image suffixes: "
                       f"{' '.join(IMAGE_SUFFIXES)})") for s in lonely_masks]  # every input is a row
    return records_table(records)


def map_folders(maps_dirs: Iterable[str], store: Storage) -> list[tuple[str, str]]:
    """``(method name, folder)`` per run: a folder of maps, or a parent whose sub-folders are methods."""
    found = []
    for folder in maps_dirs:
        files = stems(folder, "maps", "a folder of <stem>.png maps, or a folder of such folders", store)
        prefix = folder.rstrip("/") + "/"
        subdirs = sorted({k.split("/")[0] for k in files if "/" in k})
        if any("/" not in k for k in files) or not subdirs:
            found.append((posixpath.basename(folder.rstrip("/")), folder))
        else:
            found.extend((d, prefix + d) for d in subdirs)
    return found
