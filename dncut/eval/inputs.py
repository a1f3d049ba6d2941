"""The evaluation jobs' inputs: folders listed into stems, stems paired into records.

    stems(folder, ...)                      {stem: URI} of the images below a folder (sub-folders kept)
    dataset_name(folder)                    ``.../DUTS/images`` -> ``DUTS``
    stem_columns(folder, ...)               the same as two sorted ``pyarrow`` arrays (stems, URIs)
    saliency_records(images, masks, store)  an images / masks folder pair -> one ``records_table``
    map_folders(maps_dirs, store)           (method, folder) per run of ``dncut eval-maps``
    map_records(masks, maps_dirs, store)    the records of ``dncut eval-maps``, one ``records_table``

Every listing fails before any Ray work with a ``DatasetLayoutError`` naming the folder and the
layout expected.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Sequence

from dncut import storage
from dncut.data.datasets import DatasetLayoutError, relative_stem, stem_array
from dncut.data.images import IMAGE_SUFFIXES
from dncut.eval.outputs import pair_maps
from dncut.eval.streamed import records_table
from dncut.storage import Storage


def _listing(folder: str, what: str, layout: str, store: Storage) -> list[str]:
    try:
        return store.check_source(folder, IMAGE_SUFFIXES)
    except storage.StorageError as exc:
        raise DatasetLayoutError(f"{what} folder {folder}: {exc}; expected layout: {layout}") from None


def stems(folder: str, what: str, layout: str, store: Storage) -> dict[str, str]:
    """``stem -> URI`` of the images below ``folder`` (stems keep their sub-folder; of two files with
    one stem, the later in the sorted listing).

    Raises:
        DatasetLayoutError: the folder is missing, unreachable or holds no image, naming ``layout``.
    """
    return {relative_stem(folder, f): f for f in _listing(folder, what, layout, store)}


LIST_CHUNK = 4_096
"""Files of a local folder listed at a time into ``pyarrow`` arrays (``stem_columns``): the Python
strings alive at once, not one per file of the folder."""


def _local_columns(folder: str, store: Storage):
    """``(uris, stems)`` of the images below the local ``folder`` as two ``pyarrow`` string arrays in
    listing order, the files walked ``LIST_CHUNK`` at a time (``os.scandir``; symbolic links followed,
    as the storage's listing follows them); ``None`` when it cannot say (an error, an empty folder):
    the storage's listing then decides, with its message. URIs as ``dncut.storage.list_files`` gives
    them: the folder's expanded path without a trailing ``/``, then ``/`` and the relative path."""
    import os

    import pyarrow as pa

    path = store.filesystem(folder)[1]
    wanted = tuple(s.lower() for s in IMAGE_SUFFIXES)
    chunks: list[tuple] = []
    names: list[str] = []

    def flush() -> None:
        chunks.append((pa.array(names, pa.string()), stem_array(folder, names)))
        names.clear()

    try:
        pending = [path]
        while pending:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    if entry.is_dir():
                        pending.append(entry.path)
                    elif entry.is_file() and entry.name.lower().endswith(wanted):
                        names.append(entry.path)
                        if len(names) == LIST_CHUNK:
                            flush()
        flush()
    except (OSError, ValueError, pa.ArrowException):  # unreadable, or a name Arrow cannot hold: the storage decides
        return None
    uris = pa.concat_arrays([u for u, _ in chunks])
    return (uris, pa.concat_arrays([k for _, k in chunks])) if len(uris) else None


def stem_columns(folder: str, what: str, layout: str, store: Storage):
    """What ``stems`` gives as two ``pyarrow`` string arrays ``(stems, uris)``, sorted by stem (code
    point order, as ``sorted``), without a Python object per file: a local folder is walked
    ``LIST_CHUNK`` files at a time (``_local_columns``); an ``s3://`` prefix (and a local folder the
    walk cannot list) goes through the storage's listing, one Python string per file while it lasts.

    Raises:
        DatasetLayoutError: as ``stems``.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = None if store.is_s3(folder) else _local_columns(folder, store)
    if columns is None:
        files = _listing(folder, what, layout, store)
        uris, keys = pa.array(files, pa.string()), stem_array(folder, files)
        del files
    else:
        uris, keys = columns
        by_uri = pc.sort_indices(uris)  # the storage's listing order: sorted URIs
        uris, keys = uris.take(by_uri), keys.take(by_uri)
    order = pc.sort_indices(keys)  # a stable sort: files of one stem stay in listing order
    keys, uris = keys.take(order), uris.take(order)
    last = pc.not_equal(keys.slice(0, len(keys) - 1), keys.slice(1))  # (n-1,): the next file has another stem
    keep = pa.concat_arrays([last, pa.array([True])])  # the last file of each stem, as the dict keeps
    return keys.filter(keep), uris.filter(keep)


def dataset_name(folder: str) -> str:
    """A dataset's name from its folder: ``.../DUTS/images`` -> ``DUTS``, ``.../ECSSD`` -> ``ECSSD``."""
    parts = [p for p in folder.rstrip("/").split("/") if p]
    generic = {"images", "masks", "gt", "imgs", "image", "mask"}
    return parts[-2] if len(parts) > 1 and parts[-1].lower() in generic else (parts[-1] if parts else folder)


def saliency_records(images_dir: str, masks_dir: str, store: Storage):
    """The records of an images / masks folder pair as one ``records_table`` (``dncut.eval.streamed``),
    built column by column (no dict per record, no object per pair): the pairs by stem, sorted, then
    the images without a mask and the masks without an image, each a record with ``missing`` set (a
    failed row). The rows equal ``records_table`` of the ``dncut.eval.stages.record`` dicts of
    ``dncut.data.datasets.pair_by_stem`` on the two ``stems`` dicts.

    Raises:
        DatasetLayoutError: a folder is missing, unreachable or holds no image.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    layout = "--images DIR of <stem>.jpg|png images and --masks DIR of <stem>.png masks (same stems)"
    image_ids, image_uris = stem_columns(images_dir, "images", layout, store)
    mask_ids, mask_uris = stem_columns(masks_dir, "masks", layout, store)
    has_mask = pc.is_in(image_ids, value_set=mask_ids)
    has_image = pc.is_in(mask_ids, value_set=image_ids)
    no_mask, no_image = pc.invert(has_mask), pc.invert(has_image)
    lonely, lonely_masks = image_ids.filter(no_mask), mask_ids.filter(no_image)
    n_pairs, n = pc.sum(has_mask).as_py() or 0, len(image_ids) + len(lonely_masks)
    blank = lambda k: pa.repeat("", k)  # noqa: E731
    suffixes = " ".join(IMAGE_SUFFIXES)
    columns = {  # every input is a row: the pairs, the images without a mask, the masks without an image
        "image_id": pa.concat_arrays([image_ids.filter(has_mask), lonely, lonely_masks]),
        "image_uri": pa.concat_arrays([image_uris.filter(has_mask), image_uris.filter(no_mask),
                                       blank(len(lonely_masks))]),
        "mask_uri": pa.concat_arrays([mask_uris.filter(has_image), blank(len(lonely)), mask_uris.filter(no_image)]),
        "gt_boxes": pa.repeat("[]", n),
        "missing": pa.concat_arrays([
            blank(n_pairs), pc.binary_join_element_wise("no mask named ", lonely, f".* in {masks_dir}", ""),
            pc.binary_join_element_wise("no image named ", lonely_masks,
                                        f".* in {images_dir} (image suffixes: {suffixes})", "")]),
        "gt_size": pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)),
                                            pa.array(np.zeros(2 * n, np.int64))),  # [0, 0] each, as ``record``
    }
    return pa.table(columns)


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


def map_records(masks_dir: str, maps_dirs: Sequence[str], store: Storage):
    """The records of ``dncut eval-maps``: per run of ``map_folders``, one record per mask (sorted by
    stem) ``{image_id, method, mask_uri, map_uri, missing, maps_dir}`` (pairing rule:
    ``dncut.eval.outputs.pair_maps``), as one ``records_table``; and the number of masks.

    Raises:
        DatasetLayoutError: a folder is missing, unreachable or holds no image.
    """
    masks = stems(masks_dir, "masks", "a folder of <stem>.png ground-truth masks", store)
    records = []
    for method, folder in map_folders(maps_dirs, store):
        maps = stems(folder, "maps", "a folder of <stem>.png maps", store)
        paired = pair_maps(masks, maps)  # predict's <stem>.<ext>.png maps pair with <stem>.png masks
        records += [{"image_id": s, "method": method, "mask_uri": u, "map_uri": paired[s][0],
                     "missing": paired[s][1], "maps_dir": folder} for s, u in sorted(masks.items())]
    return records_table(records), len(masks)
