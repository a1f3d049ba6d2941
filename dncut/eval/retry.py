"""The evaluation jobs' rule for a dead inference actor: dncut runs the pipeline again, Ray does not
restart the actor.

Why not Ray's restart: Ray Data starts each actor-pool worker with its constructor arguments in the
object store (the ``DataContext`` and the map transformer are ``ray.put`` references), so an actor
with ``max_restarts > 0`` makes Ray core print an E-severity line on every job ("has constructor
arguments in the object store and max_restarts > 0", ray-project/ray#53727): the restart fails once
those objects are gone. So every ``map_batches`` with an ``ActorPoolStrategy`` in dncut passes
``max_restarts=0`` (``ACTOR_REMOTE_ARGS``), and when an actor dies (OOM kill, SIGKILL, node lost) the
Ray Data pipeline fails with ``ray.exceptions.ActorDiedError`` (a ``RayActorError``). The driver
then (``run_with_retries``) logs one WARNING line and runs the pipeline again on the images that do
not have all their rows yet (``RowLedger``), at most ``ATTEMPTS`` runs in all; after the last it
raises ``ActorRetriesExhausted`` (never a short table).

No row twice: a re-run image may already have rows in a Parquet part (the workers write parts
before the rows reach the driver), so the merge keeps one row per key
(``dncut.eval.streamed.merge_parts(unique=...)``), and the driver counts each (image, method) once
(``RowLedger.first``). Rows of a re-run image equal the first run's: the weights are fixed
(a checkpoint, pretrained weights, or a random initialisation drawn from
``dncut.eval.stages.RANDOM_INIT_SEED``).

Driver memory: the ledger holds one small unsigned int per record of the pipeline (a bit per method:
one byte an image up to 8 methods), indexed like the records: a batch's ids are found through the
records' sorted string hashes (16 bytes an image), so a batch costs its own size, not the number of
records. It is dropped when the pipeline ends. The records may be a ``pyarrow.Table``
(``dncut.eval.streamed.records_table``) rather than a list of dicts.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ATTEMPTS = 3
"""Runs of one pipeline (dataset, backbone, checkpoint) in all: the first and up to two re-runs after an
inference actor died. One death is an accident (a node lost, a process killed); a death in each of three
runs means something kills the actors every time (memory, a broken device), and a fourth run would
fail the same way, so the job stops and says so."""

ACTOR_REMOTE_ARGS = {"max_restarts": 0}
"""Ray options of every actor pool of the evaluation jobs (``map_batches(..., **ACTOR_REMOTE_ARGS)``):
no Ray restart (see the module docstring); Ray Data then sets no task retries on the actor either.
Ray Data 2.60 takes ``max_restarts`` only through ``map_batches``' extra keyword arguments, which it
marks deprecated (a ``RayDeprecationWarning``; removed in Ray 2.64, where this needs its replacement:
``ray`` is pinned in ``constraints.txt``)."""


# That warning would be the one line of noise in a quiet run (``dncut -q``): silenced for the jobs'
# own calls only (the warning is attributed to the calling module, dncut.eval.jobs).
warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated", module=r"dncut\.eval\.jobs")


class ActorRetriesExhausted(RuntimeError):
    """An inference actor died in each of the ``ATTEMPTS`` runs of one pipeline."""


def actor_death(exc: BaseException) -> BaseException | None:
    """The ``ray.exceptions.RayActorError`` (``ActorDiedError``, ``ActorUnavailableError``) that
    ``exc`` is or wraps (through ``__cause__``, ``__context__`` and ``RayTaskError.cause``), else ``None``.
    An actor whose constructor raised (``actor_init_failed``: a bad checkpoint, a missing file) is
    not a death to run again for: ``None``, and the error goes to the user unchanged."""
    from ray.exceptions import RayActorError

    seen: set[int] = set()
    pending = [exc]
    while pending:
        err = pending.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, RayActorError):  # raised in the actor's constructor: the same on every run
            return None if err.actor_init_failed else err
        pending += [err.__cause__, err.__context__, getattr(err, "cause", None)]
    return None


def _ids(records):
    """The image ids of ``records`` (record dicts, or a ``pyarrow.Table`` of them) as one
    ``pyarrow.StringArray``."""
    import pyarrow as pa

    if hasattr(records, "column"):
        return records.column("image_id").cast(pa.string()).combine_chunks()
    return pa.array([str(r["image_id"]) for r in records], pa.string())


HASH_SLICE = 4_096
"""Ids hashed at a time when the ledger's index is built (bounds the Python strings alive at once)."""


def _hashes(ids) -> np.ndarray:
    """``hash()`` of each id of the string array ``ids`` ``(n,) int64`` (this process's string hash)."""
    parts = [np.fromiter((hash(s) for s in ids.slice(i, HASH_SLICE).to_pylist()), np.int64)
             for i in range(0, len(ids), HASH_SLICE)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class RowLedger:
    """Which of each image's rows (one per method name) reached the driver in this pipeline: one
    small unsigned int per record (a bit per method; ``uint8`` up to 8 methods), indexed like the
    records, not a Python object per image.

    Args:
        names: the method names every image gives a row for (``dncut.eval.stages.row_methods``).
        records: the pipeline's records (dicts, or their ``dncut.eval.streamed.records_table``): the
            ids the ledger indexes (the table's own column, not a copy). Ids outside them (or all
            ids, without ``records``) are added as their rows arrive. Of two records with one id,
            the first holds the id's bits (a row of that id arriving twice is a repeat).
    """

    def __init__(self, names: Sequence[str], records=None) -> None:
        import pyarrow as pa

        self.bits = {name: 1 << i for i, name in enumerate(dict.fromkeys(names))}
        self.full = (1 << len(self.bits)) - 1
        self.ids = _ids(records) if records is not None else pa.array([], pa.string())  # (n,) the indexed ids
        self.seen = np.zeros(len(self.ids), np.min_scalar_type(max(self.full, 1)))  # (n,) bits of arrived rows
        self._order, self._sorted = np.zeros(0, np.int64), np.zeros(0, np.int64)  # (n,) the ids by hash, their hashes
        self._extend_index(0)

    def _extend_index(self, start: int) -> None:
        """Add ``self.ids[start:]`` to the hash index (stable: of equal hashes the earlier record first)."""
        hashes = np.concatenate([self._sorted, _hashes(self.ids.slice(start))])
        order = np.concatenate([self._order, np.arange(start, len(self.ids), dtype=np.int64)])
        by_hash = np.argsort(hashes, kind="stable")
        self._sorted, self._order = hashes[by_hash], order[by_hash]

    def _lookup(self, ids) -> np.ndarray:
        """``ids`` (string array) -> the index of each in ``self.ids`` ``(m,)`` int64, -1 when absent; the
        first record of a repeated id. The hash finds a candidate, the string decides."""
        import pyarrow as pa
        import pyarrow.compute as pc

        at = np.full(len(ids), -1, np.int64)
        if not len(ids) or not len(self._sorted):
            return at
        query = _hashes(ids)
        pos = np.minimum(np.searchsorted(self._sorted, query), len(self._sorted) - 1)
        hit = np.flatnonzero(self._sorted[pos] == query)
        cand = self._order[pos[hit]]
        same = np.asarray(pc.equal(self.ids.take(pa.array(cand)), ids.take(pa.array(hit)))
                          .to_numpy(zero_copy_only=False), bool)
        at[hit[same]] = cand[same]
        collided = hit[~same]  # another id with the same 64-bit hash sorts first: look it up in full
        if len(collided):
            found = pc.index_in(ids.take(pa.array(collided)), value_set=self.ids)
            at[collided] = np.asarray(pc.fill_null(found, -1).to_numpy(zero_copy_only=False), np.int64)
        return at

    def _index(self, ids, add: bool) -> np.ndarray:
        """``ids`` -> their indices ``(m,)`` int64 (-1: not indexed; added first when ``add``)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        ids = ids.cast(pa.string()) if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(
            [str(i) for i in ids], pa.string())
        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        at = self._lookup(ids)
        if add and (at < 0).any():
            new = pc.unique(ids.filter(pa.array(at < 0)))
            start = len(self.ids)
            self.ids = pa.concat_arrays([self.ids, new])
            self.seen = np.concatenate([self.seen, np.zeros(len(new), self.seen.dtype)])
            self._extend_index(start)
            at = self._lookup(ids)
        return at

    def first_batch(self, image_ids, method: str) -> np.ndarray:
        """Record the rows of (each of ``image_ids``, ``method``) (a sequence or a ``pyarrow`` string
        array) -> ``(m,)`` bool: ``False`` for a row that had arrived already, in an earlier call or
        earlier in ``image_ids`` (``first`` of each in turn).

        Raises:
            KeyError: ``method`` is not one of ``names``.
        """
        bit = self.bits[method]
        at = self._index(image_ids, add=True)  # (m,)
        fresh = np.zeros(len(at), bool)
        fresh[np.unique(at, return_index=True)[1]] = True  # the first of each id in the batch
        fresh &= (self.seen[at] & bit) == 0
        self.seen[at] |= bit
        return fresh

    def first(self, image_id: str, method: str) -> bool:
        """Record the row of (``image_id``, ``method``); ``False`` when it had arrived already (a
        re-run image: the row is not counted again).

        Raises:
            KeyError: ``method`` is not one of ``names``.
        """
        return bool(self.first_batch([image_id], method)[0])

    def _arrived(self, records) -> np.ndarray:
        at = self._index(_ids(records), add=False)  # (n,)
        return np.where(at >= 0, self.seen[np.maximum(at, 0)], 0) if len(self.seen) else np.zeros(len(at), np.int64)

    def complete(self, image_id: str) -> bool:
        """Every row of ``image_id`` arrived."""
        return bool(self._arrived([{"image_id": image_id}])[0] == self.full)

    def forget(self, image_ids) -> None:
        """Drop what arrived of ``image_ids`` (their rows will be counted again from a re-run)."""
        at = self._index(list(image_ids), add=False)
        self.seen[at[at >= 0]] = 0

    def counted(self, records) -> frozenset[tuple[str, str]]:
        """The ``(image_id, method)`` pairs of ``records`` whose rows arrived already (what a re-run's
        writers leave out, ``dncut.eval.streamed.driver_rows``); Python objects for those only."""
        arrived = self._arrived(records)
        some = np.flatnonzero(arrived)
        ids = _ids(records).take(some).to_pylist() if len(some) else []
        return frozenset((i, name) for i, got in zip(ids, arrived[some].tolist())
                         for name, bit in self.bits.items() if got & bit)

    def missing(self, records):
        """The ``records`` whose image has not given all its rows yet: a list of record dicts, or a
        ``pyarrow.Table`` of them (``dncut.eval.streamed.records_table``: the rows of the table)."""
        done = self._arrived(records) == self.full  # (n,)
        if hasattr(records, "column"):
            import pyarrow as pa

            return records.filter(pa.array(~done))
        return [r for r, d in zip(records, done.tolist()) if not d]


def run_with_retries(run: Callable[[Any], None], records, *, missing: Callable[[], Any],
                     what: str, attempts: int = ATTEMPTS) -> None:
    """Call ``run(records)``; while it fails because an actor died, call ``run(missing())`` again, at
    most ``attempts`` calls in all (no call when nothing is missing).

    Args:
        run: runs the pipeline on the records it is given, streaming its rows to the driver.
        records: every record of the pipeline (a list, or a ``pyarrow.Table`` of them).
        missing: the records still without all their rows (called after a failed run).
        what: the pipeline, for the messages (``"eval ECSSD vit_small @ pretrained"``).

    Raises:
        ActorRetriesExhausted: an actor died in each of the ``attempts`` runs (the last death chained).
        Exception: whatever ``run`` raised for any other reason, unchanged.
    """
    pending = records
    for attempt in range(1, attempts + 1):
        try:
            run(pending)
            return
        except Exception as exc:
            death = actor_death(exc)
            if death is None:
                raise
            pending = missing()
            if len(pending) == 0:
                return
            raised = "" if death is exc else f", raised as {type(exc).__name__}"
            reason = f"{type(death).__name__}{raised}: {' '.join(str(death).split())[:200]}"
            if attempt == attempts:
                raise ActorRetriesExhausted(
                    f"{what}: an inference actor died in each of {attempts} runs of the pipeline; "
                    f"{len(pending)} of {len(records)} images have no complete rows (last: {reason})") from exc
            log.warning("%s: an inference actor died; dncut runs the pipeline again on the %d of %d images "
                        "without all their rows (run %d of at most %d). %s", what, len(pending), len(records),
                        attempt + 1, attempts, reason)
