"""What an evaluation's driver holds and receives per image: its records as one compact Arrow table,
and from the workers each scored row without its Fβ curves, each batch's curves summed on one row per
method.

Records: ``records_table(records)`` holds a pipeline's input records (``dncut.eval.stages.record``
dicts) as one ``pyarrow.Table``, ~150 bytes an image (image id, URIs, JSON boxes) against ~1 KB for
the dicts and the listing's dicts behind them; ``record_blocks(table, rows)`` cuts it into compact
blocks of ``rows`` records (copies, not slices: a pickled slice carries its parent's buffers) for
``ray.data.from_arrow``. The rows each block gives are those ``ray.data.from_items`` gives for the
same dicts (the same Arrow conversion).

Rule: the per-image Fβ curves (``fbeta_curve`` (255,) and ``pysod_curve`` (256,) float64, ~4 KB a
row, ``dncut.eval.stages.result_row``) never reach the driver one by one. The Parquet-writing step
(``dncut.eval.report.write_per_image``) returns ``driver_rows(batch)``: the batch's rows with every
other column unchanged, the curve columns null except on the last ``ok`` row of each method, which
carries the sum of that method's ``ok`` curves in the batch (added in row order). The driver's
``Accumulator`` adds the curves a row carries, so its dataset curve is the same sum, grouped by batch
(float64: equal to the row-by-row sum up to the rounding of the grouping, ~1e-16 relative).

Why: the rows the driver reads are pages of Ray's object store mapped into the driver, counted in its
RSS (``RssShmem``); with the curves, ~4.3 MiB per 1,000 images (docs/operations.md, "Evaluation
driver memory"), without them, ~0.4.

Rows counted already: a row summed in a batch cannot be taken out on the driver, so a re-run after an
actor died (``dncut.eval.retry``) passes ``counted``, the (image_id, method) pairs that reached the
driver in an earlier run; those rows are written to the Parquet part (the merge keeps one) but
neither returned nor summed.
"""

from __future__ import annotations

from collections.abc import Sequence, Set

import numpy as np

CURVES = ("fbeta_curve", "pysod_curve")  # per-image curve columns, summed per batch and method


def records_table(records: Sequence[dict]):
    """``records`` (``dncut.eval.stages.record`` dicts, one schema) -> one ``pyarrow.Table``, a row each,
    in order; an empty list -> a table of no row and no column."""
    import pyarrow as pa

    return pa.Table.from_pylist(list(records)) if len(records) else pa.table({})


def record_blocks(table, rows: int) -> list:
    """``table`` -> tables of at most ``rows`` rows each (at least one), copied out of ``table``."""
    import pyarrow as pa

    if table.num_rows == 0:
        return [table]
    return [table.take(pa.array(np.arange(start, min(start + rows, table.num_rows))))
            for start in range(0, table.num_rows, rows)]


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


def driver_rows(batch, counted: Set[tuple[str, str]] = frozenset()):
    """The rows of a ``pyarrow.Table`` of scored rows (``dncut.eval.stages.result_row`` columns) that
    the driver receives: those not in ``counted`` (``(image_id, method)`` pairs), each ``CURVES``
    column null except on the last ``ok`` row of each method, which holds the sum of the method's
    ``ok`` curves of the returned rows, ``(L,)`` float64.

    Raises:
        ValueError: a curve is null or the curves of the batch differ in length.
    """
    import pyarrow as pa

    if counted:
        keys = zip(batch.column("image_id").to_pylist(), batch.column("method").to_pylist())
        batch = batch.filter(pa.array([(str(i), str(m)) not in counted for i, m in keys], pa.bool_()))
    methods = [str(m) for m in batch.column("method").to_pylist()]
    ok = [str(s) == "ok" for s in batch.column("status").to_pylist()]
    last: dict[str, int] = {}  # method -> index of its last ok row
    for i, (method, good) in enumerate(zip(methods, ok)):
        if good:
            last[method] = i
    for name in CURVES:
        if name not in batch.column_names:
            continue
        curves = _curves(batch.column(name), batch.num_rows)  # (n, L)
        sums: list[np.ndarray | None] = [None] * batch.num_rows
        for method, at in last.items():
            total = None
            for i in range(at + 1):  # row order: the driver's sum, grouped by batch
                if ok[i] and methods[i] == method:
                    total = curves[i].copy() if total is None else total + curves[i]
            sums[at] = total
        index = batch.column_names.index(name)
        batch = batch.set_column(index, name, pa.array(sums, pa.list_(pa.float64())))
    return batch
