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
(``dncut.eval.report.merge_parts(unique=...)``), and the driver counts each (image, method) once
(``RowLedger.first``). Rows of a re-run image equal the first run's: the weights are fixed
(a checkpoint, pretrained weights, or a random initialisation drawn from
``dncut.eval.stages.RANDOM_INIT_SEED``).

Driver memory: the ledger holds one small int per image of the pipeline (a bit per method), about
150 bytes per image, dropped when the pipeline ends; the records may be a ``pyarrow.Table``
(``dncut.eval.streamed.records_table``) rather than a list of dicts.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

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


class RowLedger:
    """Which of each image's rows (one per method name) reached the driver in this pipeline.

    Args:
        names: the method names every image gives a row for (``dncut.eval.stages.row_methods``).
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.bits = {name: 1 << i for i, name in enumerate(dict.fromkeys(names))}
        self.full = (1 << len(self.bits)) - 1
        self.seen: dict[str, int] = {}  # image_id -> bits of the methods whose row arrived

    def first(self, image_id: str, method: str) -> bool:
        """Record the row of (``image_id``, ``method``); ``False`` when it had arrived already (a
        re-run image: the row is not counted again).

        Raises:
            KeyError: ``method`` is not one of ``names``.
        """
        bit, had = self.bits[method], self.seen.get(image_id, 0)
        self.seen[image_id] = had | bit
        return not had & bit

    def complete(self, image_id: str) -> bool:
        """Every row of ``image_id`` arrived."""
        return self.seen.get(image_id, 0) == self.full

    def forget(self, image_ids) -> None:
        """Drop what arrived of ``image_ids`` (their rows will be counted again from a re-run)."""
        for image_id in image_ids:
            self.seen.pop(image_id, None)

    def missing(self, records):
        """The ``records`` whose image has not given all its rows yet: a list of record dicts, or a
        ``pyarrow.Table`` of them (``dncut.eval.streamed.records_table``: the rows of the table)."""
        if hasattr(records, "column"):
            import pyarrow as pa

            ids = records.column("image_id").to_pylist()
            return records.filter(pa.array([not self.complete(str(i)) for i in ids], pa.bool_()))
        return [r for r in records if not self.complete(str(r["image_id"]))]


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
