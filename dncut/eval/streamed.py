"""What an evaluation's driver holds and receives per image: its records as one compact Arrow table,
and from the workers one payload row per batch and method instead of a row per image.

Records: ``records_table(records)`` holds a pipeline's input records (``dncut.eval.stages.record``
dicts) as one ``pyarrow.Table``, ~150 bytes an image (image id, URIs, JSON boxes) against ~1 KB for
the dicts; ``dncut.eval.inputs.saliency_records`` builds the same table column by column.
``indexed(table)`` adds the ``record_index`` column (int64, each record's position in the table),
which every stage carries to the scored rows (``dncut.eval.stages.score_row``), so that the driver
finds a row's record by position, never by its image id. ``record_blocks(table, rows)`` cuts it into
compact blocks of ``rows`` records (a multiple of ``rows`` past ``MAX_RECORD_BLOCKS`` blocks), one at
a time (copies, not slices: a pickled slice carries its parent's buffers) for ``ray.put`` and
``ray.data.from_arrow_refs``. The rows each block gives are
those ``ray.data.from_items`` gives for the same dicts (the same Arrow conversion).

Rule: no scored row reaches the driver on its own. The Parquet-writing step
(``dncut.eval.report.write_per_image``) returns ``driver_rows(batch)``: per method, one row with the
batch's per-image values as compact lists in row order (record indices, ok flags, the failed rows'
image ids and errors, the ``ok`` rows' metric values as float64, the example payloads present) and
the sum of the ``ok`` Fβ curves (``fbeta_curve`` (255,), ``pysod_curve`` (256,) float64, ~4 KB an
image, added in row order). ``batch_payloads`` reads a payload table back into dicts for the
driver's ``Accumulator.add_batch``, which adds the metric values one by one in row order, as ``add``
does for each row (the same float64 sums, bit for bit); its dataset curve is the sum of the batches'
sums (equal to the row-by-row sum up to the rounding of the grouping, ~1e-16 relative).

Why: the rows the driver reads are pages of Ray's object store mapped into the driver, counted in its
RSS (``RssShmem``), plus one Python dict per row; the payload holds ~45 bytes an ok image (index,
flag, four float64) in a few Arrow buffers per batch, no string (docs/operations.md, "Evaluation
driver memory").

Rows counted already: a row summed in a batch cannot be taken out on the driver, so a re-run after an
actor died (``dncut.eval.retry``) passes ``counted``, per method the record indices whose rows
reached the driver in an earlier run; those rows are written to the Parquet part (the merge keeps
one) but neither returned nor summed.
"""

from __future__ import annotations

import io
import logging
import posixpath
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from dncut import storage

CURVES = ("fbeta_curve", "pysod_curve")  # per-image curve columns, summed per batch and method
PARTS_SUFFIX = ".parts"  # <out>/<file>.parts/: the workers' Parquet parts of <out>/<file>, merged at the end
RECORD_INDEX = "record_index"  # int64 column: a record's position in its pipeline's records table (``indexed``)
MAX_RECORD_BLOCKS = 200
"""Cap on the record blocks of one pipeline run (``block_rows``): each block is a task of every stage,
and Ray Data and Ray keep state per block on the driver, so the driver's memory must not grow with
the number of blocks (docs/operations.md, "Evaluation driver memory"); the same cap as training's
``dncut.data.pipeline.MAX_BLOCKS``."""
log = logging.getLogger(__name__)


def records_table(records: Sequence[dict]):
    """``records`` (``dncut.eval.stages.record`` dicts, one schema) -> one ``pyarrow.Table``, a row each,
    in order; an empty list -> a table of no row and no column."""
    import pyarrow as pa

    return pa.Table.from_pylist(list(records)) if len(records) else pa.table({})


def indexed(table):
    """``table`` (a ``records_table``) with its ``RECORD_INDEX`` column appended: ``(n,)`` int64,
    0..n-1, each record's position; the table itself when it has the column already (a table that
    was indexed, or the rows of one: their positions in the whole stay)."""
    import pyarrow as pa

    if RECORD_INDEX in table.column_names:
        return table
    return table.append_column(RECORD_INDEX, pa.array(np.arange(table.num_rows, dtype=np.int64)))


def block_rows(n: int, rows: int) -> int:
    """Records per block for ``n`` records: ``rows``, or where that would make over
    ``MAX_RECORD_BLOCKS`` blocks, the least multiple of ``rows`` that makes at most that many (above
    12,800 records at 64 a block: 128 from 12,801, 256 at 50,000). A multiple, so that an actor's
    batches of ``rows`` (``eval.batch_size``) fill from one block, none left over but the last.

    Raises:
        ValueError: ``rows`` < 1.
    """
    if rows < 1:
        raise ValueError(f"records per block must be >= 1, got {rows}")
    least = -(-n // MAX_RECORD_BLOCKS)  # ceil(n / MAX_RECORD_BLOCKS)
    return max(rows, -(-least // rows) * rows)


def num_record_blocks(n: int, rows: int) -> int:
    """The number of blocks ``record_blocks`` cuts ``n`` records into (at least one)."""
    return max(1, -(-n // block_rows(n, rows)))


def record_blocks(table, rows: int) -> Iterator:
    """``table`` -> tables of ``block_rows(n, rows)`` rows each (the last may hold fewer; at least one
    table), copied out of ``table``, one at a time (a generator: put each in Ray's object store before
    the next is cut, and the driver holds one copy of the records, not two)."""
    import pyarrow as pa

    if table.num_rows == 0:
        yield table
        return
    rows = block_rows(table.num_rows, rows)
    for start in range(0, table.num_rows, rows):
        yield table.take(pa.array(np.arange(start, min(start + rows, table.num_rows))))


def _curves(column, n: int) -> np.ndarray:
    """A curve column of ``n`` rows -> ``(n, L)`` float64. Takes ``list<double>`` columns and Ray
    Data's tensor columns (an Arrow extension type, one ``(L,)`` tensor a row).

    Raises:
        ValueError: a curve is null or the curves differ in length.
    """
    chunks = column.chunks if hasattr(column, "chunks") else [column]
    parts = []
    for chunk in chunks:
        if chunk.null_count:
            raise ValueError("a curve to sum is null")
        values = chunk.to_numpy(zero_copy_only=False)
        if values.dtype == object:  # one array per row (list<double>, variable-shaped tensors)
            values = np.stack([np.asarray(v, np.float64) for v in values]) if len(values) else values
        parts.append(np.asarray(values, np.float64).reshape(len(chunk), -1))  # (rows, L)
    return np.concatenate(parts) if parts else np.zeros((n, 0))  # (n, L)


PAYLOAD_LISTS = (RECORD_INDEX, "ok", "failed_id", "error", "fbeta_curve", "pysod_curve", "example_id", "example")
"""List columns of a driver payload besides the ``metric:<key>`` ones (see ``driver_rows``)."""


def _payload_schema(metrics: Sequence[str]):
    import pyarrow as pa

    floats = pa.list_(pa.float64())
    return pa.schema([("method", pa.string()), (RECORD_INDEX, pa.list_(pa.int64())), ("ok", pa.list_(pa.bool_())),
                      ("failed_id", pa.list_(pa.string())), ("error", pa.list_(pa.string())),
                      *[(f"metric:{k}", floats) for k in metrics],
                      ("fbeta_curve", floats), ("pysod_curve", floats), ("example_id", pa.list_(pa.string())),
                      ("example", pa.list_(pa.binary()))])


def _floats(column) -> np.ndarray:
    """Any numeric or bool column -> ``(n,)`` float64, null -> NaN (what ``float()`` of each value gives)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return np.asarray(pc.fill_null(pc.cast(column, pa.float64()), np.nan).to_numpy(), np.float64)


def _left_out(batch, counted: Mapping[str, np.ndarray]):
    """``(n,)`` bool: the rows of ``batch`` whose (``RECORD_INDEX``, method) is in ``counted``."""
    import pyarrow as pa

    out = np.zeros(batch.num_rows, bool)
    if not counted or not batch.num_rows:
        return out
    if RECORD_INDEX not in batch.column_names:
        raise ValueError(f"rows to leave out by record index, and the batch has no {RECORD_INDEX} column")
    index = np.asarray(batch.column(RECORD_INDEX).to_numpy(), np.int64)  # (n,)
    methods = np.asarray(batch.column("method").cast(pa.string()).to_numpy(zero_copy_only=False), object)
    for method, done in counted.items():
        out |= (methods == method) & np.isin(index, np.asarray(done, np.int64))
    return out


def driver_rows(batch, counted: Mapping[str, np.ndarray] | None = None, metrics: Sequence[str] = ()):
    """What the driver receives of a ``pyarrow.Table`` of scored rows (``dncut.eval.stages.result_row``
    columns, and ``RECORD_INDEX`` when the rows come from ``indexed`` records): the rows not in
    ``counted`` (``{method: record indices}``), as ONE row per method (in order of first appearance;
    no row for a method without rows), every list in the batch's row order:

        method          the method
        record_index    list<int64>    every row's record index (the re-run ledger); null when the
                                       batch has no ``RECORD_INDEX`` column
        ok              list<bool>     status == "ok"
        failed_id       list<string>   the failed rows' image ids, failed rows only
        error           list<string>   their errors (null -> "None")
        metric:<key>    list<float64>  each key of ``metrics``: the ``ok`` rows' values (null -> NaN);
                                       null when no ``ok`` value is finite or the batch lacks the column
        fbeta_curve, pysod_curve       (L,) float64: the sum of the ``ok`` rows' curves, added in row
                                       order; null when no row is ``ok`` or the batch lacks the column
        example_id, example            the rows whose ``example`` is not empty, and their payloads

    No image id of an ``ok`` row without an example reaches the driver. ``batch_payloads`` reads it
    back; ``dncut.eval.report.Accumulator.add_batch`` adds one such row as ``add`` adds each of its
    rows. The schema is the same for every batch (``metrics`` fixed).

    Raises:
        ValueError: a curve is null or the curves of the batch differ in length; ``counted`` is given
            and the batch has no ``RECORD_INDEX`` column.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    skip = _left_out(batch, counted or {})
    if skip.any():
        batch = batch.filter(pa.array(~skip))
    schema = _payload_schema(metrics)
    out: dict[str, list] = {name: [] for name in schema.names}
    methods = batch.column("method").cast(pa.string())
    for method in pc.unique(methods).to_pylist():
        rows = batch.filter(pc.fill_null(pc.equal(methods, method), False))  # row order kept
        ok = pc.fill_null(pc.equal(rows.column("status").cast(pa.string()), "ok"), False)
        good, bad = rows.filter(ok), rows.filter(pc.invert(ok))
        out["method"].append(method)
        out[RECORD_INDEX].append(rows.column(RECORD_INDEX).cast(pa.int64()) if RECORD_INDEX in rows.column_names
                                 else None)
        out["ok"].append(ok)
        out["failed_id"].append(bad.column("image_id").cast(pa.string()))
        out["error"].append(pc.fill_null(bad.column("error").cast(pa.string()), "None"))
        for key in metrics:
            values = _floats(good.column(key)) if key in good.column_names else np.zeros(0)
            out[f"metric:{key}"].append(values if np.isfinite(values).any() else None)
        for name in CURVES:
            total = None
            if name in good.column_names and good.num_rows:
                for curve in _curves(good.column(name), good.num_rows):  # (L,) each, in row order
                    total = curve.copy() if total is None else total + curve
            out[name].append(total)
        if "example" in rows.column_names:
            example = rows.column("example")
            has = pc.fill_null(pc.greater(pc.binary_length(example), 0), False)
            out["example_id"].append(rows.column("image_id").filter(has).cast(pa.string()))
            out["example"].append(example.filter(has).cast(pa.binary()))
        else:
            out["example_id"].append([])
            out["example"].append([])
    plain = lambda v: None if v is None else (v.to_pylist() if hasattr(v, "to_pylist") else v)  # noqa: E731
    return pa.table({name: pa.array([plain(v) for v in out[name]], schema.field(name).type) for name in schema.names},
                    schema=schema)


def batch_payloads(table) -> Iterator[dict[str, Any]]:
    """The rows of a ``driver_rows`` table (``pyarrow.Table``), each as the dict that
    ``dncut.eval.report.Accumulator.add_batch`` takes: ``method`` (str), ``record_index`` ``(n,)``
    int64 (``None`` when the rows had no record index), ``ok`` ``(n,)`` bool, ``failed``
    ``[(image_id, error)]`` of the failed rows, ``metrics`` ``{key: (n_ok,) float64}`` (keys with a
    finite value only), ``fbeta_curve`` / ``pysod_curve`` ``(L,)`` float64 or ``None``, ``examples``
    ``[(image_id, bytes)]``, and every other column of the table as its Python value (``checkpoint``
    of ``dncut eval-maps``)."""
    known = set(PAYLOAD_LISTS) | {"method"}
    for i in range(table.num_rows):
        row = {name: table.column(name)[i] for name in table.column_names}
        ok = np.asarray(row["ok"].values.to_numpy(zero_copy_only=False), bool)  # (n,)
        index = row[RECORD_INDEX]
        curves = {name: None if not row[name].is_valid else np.array(row[name].values.to_numpy(), np.float64)
                  for name in CURVES}
        yield {
            "method": row["method"].as_py(), "ok": ok,
            RECORD_INDEX: np.asarray(index.values.to_numpy(), np.int64) if index.is_valid else None,  # (n,)
            "failed": list(zip(row["failed_id"].values.to_pylist(), row["error"].values.to_pylist())),
            "metrics": {name[len("metric:"):]: np.asarray(row[name].values.to_numpy(), np.float64)
                        for name in table.column_names if name.startswith("metric:") and row[name].is_valid},
            **curves,
            "examples": list(zip(row["example_id"].values.to_pylist(), row["example"].values.to_pylist())),
            **{name: row[name].as_py() for name in table.column_names if name not in known
               and not name.startswith("metric:")},
        }


# --------------------------------------------------------------------------- Parquet parts
def parts_folder(out_dir: str, name: str, store: storage.Storage) -> str:
    """``<out_dir>/<name>.parts``: where the workers write the parts of ``<out_dir>/<name>``."""
    return store.join(out_dir, name + PARTS_SUFFIX)


def write_part(table, folder: str, store: storage.Storage) -> str:
    """Write ``table`` (a ``pyarrow.Table``) as ``<folder>/<uuid4>.parquet``; returns its URI.
    Called in the workers (Ray tasks), so the rows never reach the driver."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    uri = store.join(folder, f"{uuid.uuid4().hex}.parquet")
    store.write_bytes(uri, buf.getvalue())
    return uri


def _remove(uri: str, store: storage.Storage) -> None:
    import pyarrow.fs as pafs

    fs, path = store.filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def clear_parts(out_dir: str, name: str, store: storage.Storage) -> None:
    """Remove the parts left by an interrupted run of ``<out_dir>/<name>`` (call before a job starts)."""
    _remove(parts_folder(out_dir, name, store), store)


def _keys(table, unique: Sequence[str]) -> list[tuple]:
    return list(zip(*(table.column(c).to_pylist() for c in unique)))


def row_groups(uri: str, store: storage.Storage, columns: Sequence[str] | None = None):
    """The row groups of the Parquet file ``uri``, one ``pyarrow.Table`` at a time (``columns`` only,
    when given): what ``merge_parts`` holds of a part at once."""
    import pyarrow.parquet as pq

    part_fs, part_path = store.filesystem(uri)
    with part_fs.open_input_file(part_path) as source:
        part = pq.ParquetFile(source)
        for i in range(part.num_row_groups):
            yield part.read_row_group(i, columns=list(columns) if columns else None, use_threads=False)


def _repeated_hashes(parts: list[str], unique: Sequence[str], store: storage.Storage) -> tuple[list, np.ndarray]:
    """Per part and row group, the ``hash()`` of each row's key ``(n,) int64``; and the hashes that occur
    more than once over all parts (the rows that may repeat a key: same key, or a rare hash collision)."""
    hashes = [np.fromiter((hash(k) for k in _keys(group, unique)), np.int64)
              for uri in parts for group in row_groups(uri, store, unique)]
    values, counts = np.unique(np.concatenate(hashes) if hashes else np.zeros(0, np.int64), return_counts=True)
    return hashes, values[counts > 1]


def merge_parts(out_dir: str, name: str, store: storage.Storage, schema=None, unique: Sequence[str] = ()) -> int:
    """Stream the parts of ``<out_dir>/<name>`` (``write_part``) into the single Parquet file
    ``<out_dir>/<name>``, one row group of one part in memory at a time (``row_groups``; each written
    as it is read, through one ``pyarrow.parquet.ParquetWriter``), then remove the parts.

    Args:
        schema: the file's schema (``None``: the first part's; an empty file without columns when
            there is no part).
        unique: key columns: of the rows with the same key, the first read is kept, the others
            dropped (rows written twice: an image run again, a task retried). Memory: one 8-byte
            hash per row (a first pass over the key columns), the exact keys of the rows whose
            hash repeats.

    Returns:
        The number of rows written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = parts_folder(out_dir, name, store)
    parts = store.list_files(folder, (".parquet",)) if store.exists(folder) else []
    hashes, repeated = _repeated_hashes(parts, unique, store) if unique else ([], np.zeros(0, np.int64))
    kept: set[tuple] = set()  # exact keys of the rows kept among those whose hash repeats
    dropped = 0
    out_fs, out_path = store.filesystem(store.join(out_dir, name))
    if not store.is_s3(out_dir):
        out_fs.create_dir(posixpath.dirname(out_path), recursive=True)
    n = 0
    writer = None
    groups = (group for uri in parts for group in row_groups(uri, store))
    with out_fs.open_output_stream(out_path) as sink:
        for i, table in enumerate(groups):
            if len(repeated) and np.isin(hashes[i], repeated).any():
                keys, keep = _keys(table, unique), np.ones(table.num_rows, bool)
                for j in np.flatnonzero(np.isin(hashes[i], repeated)):
                    keep[j] = keys[j] not in kept
                    kept.add(keys[j])
                dropped += int((~keep).sum())
                table = table.filter(pa.array(keep))
            if schema is not None:
                table = table.cast(schema)
            writer = writer or pq.ParquetWriter(sink, table.schema)
            writer.write_table(table)
            n += table.num_rows
        if writer is None:
            pq.write_table(pa.Table.from_pylist([], schema=schema) if schema is not None else pa.table({}), sink)
        else:
            writer.close()
    _remove(folder, store)
    if dropped:
        log.info("%s: %d rows written twice kept once (key %s)", name, dropped, ", ".join(unique))
    return n


def check_unique_ids(records, dataset: str) -> None:
    """Fail before a pipeline runs when two records share an image id (their rows would share one key of
    ``per_image.parquet`` and one would be dropped there while both are counted).

    Raises:
        ValueError: naming the dataset, how many ids repeat and one of them.
    """
    import pyarrow.compute as pc

    ids = records.column("image_id") if records.num_rows else None
    if ids is None or pc.count_distinct(ids).as_py() == len(ids):
        return
    counts = pc.value_counts(ids).flatten()  # struct (values, counts) -> two arrays
    repeated = counts[0].filter(pc.greater(counts[1], 1))
    raise ValueError(f"eval {dataset}: {len(repeated)} image ids name more than one record, e.g. "
                     f"{repeated[0].as_py()!r}; image ids must be unique within a dataset")
