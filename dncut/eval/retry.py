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
one byte an image up to 8 methods), indexed by the records' positions: every row carries its
record's index (``dncut.eval.streamed.RECORD_INDEX``, set by ``dncut.eval.streamed.indexed``) to the
driver, so a batch is marked by position, at the cost of its own size, with no lookup of image ids.
It is dropped when the pipeline ends.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dncut.eval.streamed import RECORD_INDEX

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


def _positions(records) -> np.ndarray:
    """The ``RECORD_INDEX`` of each of ``records`` (an ``indexed`` ``pyarrow.Table``, or dicts with
    the key) ``(n,)`` int64.

    Raises:
        ValueError: the records carry no record index.
    """
    if hasattr(records, "column"):
        if RECORD_INDEX not in records.column_names:
            raise ValueError(f"the records carry no {RECORD_INDEX} column (dncut.eval.streamed.indexed)")
        return np.asarray(records.column(RECORD_INDEX).to_numpy(), np.int64)
    try:
        return np.fromiter((r[RECORD_INDEX] for r in records), np.int64, len(records))
    except KeyError:
        raise ValueError(f"the records carry no {RECORD_INDEX} key (dncut.eval.streamed.indexed)") from None


class RowLedger:
    """Which of each record's rows (one per method name) reached the driver in this pipeline: one
    small unsigned int per record (a bit per method; ``uint8`` up to 8 methods), indexed by the
    records' positions (``RECORD_INDEX``), not a Python object per image.

    Args:
        names: the method names every record gives a row for (``dncut.eval.stages.row_methods``).
        records: the pipeline's records (an ``indexed`` ``records_table``, or dicts carrying
            ``RECORD_INDEX``), or their number: the positions the ledger holds from the start.
            A position beyond them (or any, without ``records``) is added when its row arrives.
    """

    def __init__(self, names: Sequence[str], records=0) -> None:
        self.bits = {name: 1 << i for i, name in enumerate(dict.fromkeys(names))}
        self.full = (1 << len(self.bits)) - 1
        n = records if isinstance(records, (int, np.integer)) else len(records)
        self.seen = np.zeros(n, np.min_scalar_type(max(self.full, 1)))  # (n,) bits of the arrived rows

    def first_batch(self, positions, method: str) -> np.ndarray:
        """Record the rows of (each record of ``positions``, ``method``) (``(m,)`` record indices) ->
        ``(m,)`` bool: ``False`` for a row that had arrived already, in an earlier call or earlier in
        ``positions`` (``first`` of each in turn).

        Raises:
            KeyError: ``method`` is not one of ``names``.
            ValueError: a negative position.
        """
        bit = self.bits[method]
        at = np.asarray(positions, np.int64).reshape(-1)  # (m,)
        if not len(at):
            return np.zeros(0, bool)
        if at.min() < 0:
            raise ValueError(f"record index {int(at.min())}: record indices are positions, >= 0")
        if at.max() >= len(self.seen):
            self.seen = np.concatenate([self.seen, np.zeros(int(at.max()) + 1 - len(self.seen), self.seen.dtype)])
        fresh = np.zeros(len(at), bool)
        fresh[np.unique(at, return_index=True)[1]] = True  # the first of each record in the batch
        fresh &= (self.seen[at] & bit) == 0
        self.seen[at] |= bit
        return fresh

    def first(self, position: int, method: str) -> bool:
        """Record the row of (the record at ``position``, ``method``); ``False`` when it had arrived
        already (a re-run image: the row is not counted again).

        Raises:
            KeyError: ``method`` is not one of ``names``.
        """
        return bool(self.first_batch([position], method)[0])

    def _arrived(self, records) -> np.ndarray:
        at = _positions(records)  # (n,)
        inside = at < len(self.seen)
        return np.where(inside, self.seen[np.where(inside, at, 0)] if len(self.seen) else 0, 0)  # (n,)

    def complete(self, position: int) -> bool:
        """Every row of the record at ``position`` arrived."""
        return 0 <= position < len(self.seen) and int(self.seen[position]) == self.full

    def forget(self, positions) -> None:
        """Drop what arrived of the records at ``positions`` (their rows will be counted again)."""
        at = np.asarray(positions, np.int64).reshape(-1)
        self.seen[at[at < len(self.seen)]] = 0

    def counted(self, records) -> dict[str, np.ndarray]:
        """Per method, the record indices ``(k,)`` int64 of ``records`` whose row arrived already (what a
        re-run's writers leave out, ``dncut.eval.streamed.driver_rows``); methods without one left out."""
        at, arrived = _positions(records), self._arrived(records)
        out = {name: at[(arrived & bit) != 0] for name, bit in self.bits.items()}
        return {name: done for name, done in out.items() if len(done)}

    def missing(self, records):
        """The ``records`` whose record has not given all its rows yet: a list of record dicts, or a
        ``pyarrow.Table`` of them (the rows of the table, their ``RECORD_INDEX`` kept)."""
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
