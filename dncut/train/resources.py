"""Resource arithmetic at start: can the cluster hold a run's Train workers *and* its data?

A training run (``dncut train``, ``dncut found-train``, one ``dncut tune`` trial) needs, at once:

    Train workers      scaling.num_workers bundles of {CPU: scaling.cpus_per_worker,
                       GPU: scaling.gpus_per_worker if scaling.use_gpu}; one bundle on one node
    one decode task    data.decode_cpus CPUs on one node (a Ray Data map task: dncut.data.pipeline;
                       one task at a time is the smallest pipeline that moves)
    extra CPUs         on the decode task's node; a Tune trial's own driver (dncut.tune.DRIVER_CPUS)

Nothing else reserves CPUs: Ray Train's controller and Ray Data's split coordinator ask for 0, and
training-time validation runs inside rank 0 (``dncut.eval.validate``, no actors). When the workers
take every CPU the decode tasks need, Ray Data never starts one and the run hangs at step 0 with no
message; ``check_resources`` refuses such a run before any worker starts.

Rule (``check_resources``), with per-node sizes (``ray.nodes()``):

* a fixed cluster (no autoscaler): the run starts iff some node keeps ``data.decode_cpus`` (plus the
  extra CPUs) while the nodes hold ``num_workers`` bundles (bundles are identical, so this is exact:
  ``floor`` of each node's CPUs / GPUs per bundle, summed). Otherwise it is refused, naming the
  numbers and the keys to change.
* a cluster that may grow (``kinds``: node types with a ``max_count``; on a live cluster
  ``cluster_nodes`` passes the node shapes present, unbounded, since Ray's public API does not
  describe the autoscaler): the same test on the cluster as it is passes silently. Otherwise the run
  starts with a WARNING that it waits for the autoscaler when (a) the present nodes plus the listed
  kinds at their ``max_count`` hold the workers, and (b) on a node-size basis there is room for a
  decode task wherever the workers land: a present node that cannot hold a worker has the CPUs, or
  some node (present or of a listed kind) keeps them once filled with as many workers as fit. The
  run only needs more nodes of the same kind then. Else it is refused: a worker that takes a whole
  node of every kind leaves nothing for decoding however far the cluster grows (the autoscaler adds
  nodes for the workers' demand; Ray Data submits no decode task it has no CPU for, so no demand
  would add a node for decoding alone).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from dncut.config import Config, ConfigError

log = logging.getLogger("dncut.train")

EPS = 1e-9
KEYS = "scaling.num_workers, scaling.cpus_per_worker or data.decode_cpus"


class ResourceError(ConfigError):
    """A run the cluster cannot schedule (workers plus decode tasks); the message names the keys."""


@dataclass(frozen=True)
class NodeKind:
    """A node type an autoscaler may add: its resources (``{"CPU": 8.0, "GPU": 1.0}``) and how many
    nodes of it the cluster may hold (``max_count``; -1 = unbounded)."""

    resources: Mapping[str, float]
    max_count: int = -1


def _bundles(node: Mapping[str, float], cpus: float, gpus: float) -> int:
    """Worker bundles of ``cpus`` CPUs (and ``gpus`` GPUs, when > 0) that fit on ``node``."""
    k = math.floor(float(node.get("CPU", 0.0)) / cpus + EPS)
    if gpus > 0:
        k = min(k, math.floor(float(node.get("GPU", 0.0)) / gpus + EPS))
    return max(k, 0)


def _fits(nodes: Sequence[Mapping[str, float]], workers: int, cpus: float, gpus: float, decode: float) -> bool:
    """Do ``workers`` bundles fit on ``nodes`` with ``decode`` CPUs left on one of them? (Exact for
    identical bundles: try each node as the decode task's.)"""
    caps = [_bundles(n, cpus, gpus) for n in nodes]
    for j, node in enumerate(nodes):
        left = float(node.get("CPU", 0.0)) - decode
        if left >= -EPS and sum(caps) - caps[j] + _bundles({**node, "CPU": max(left, 0.0)}, cpus, gpus) >= workers:
            return True
    return False


def _describe(nodes: Sequence[Mapping[str, float]]) -> str:
    sizes: dict[str, int] = {}
    for n in nodes:
        cpu, gpu = float(n.get("CPU", 0.0)), float(n.get("GPU", 0.0))
        key = f"{cpu:g} CPUs" + (f" + {gpu:g} GPUs" if gpu else "")
        sizes[key] = sizes.get(key, 0) + 1
    return ", ".join(f"{c} x {s}" for s, c in sizes.items()) or "no node"


def check_resources(cfg: Config, nodes: Sequence[Mapping[str, float]], kinds: Sequence[NodeKind] | None = None,
                    *, extra_cpus: float = 0.0) -> str | None:
    """Refuse a run whose Train workers leave no CPU for its decode tasks (rule: module docstring).

    Args:
        cfg: the run config (``scaling``, ``data.decode_cpus``).
        nodes: each alive node's resources, e.g. ``[{"CPU": 4.0}]`` or ``[{"CPU": 8.0, "GPU": 1.0}] * 2``.
        kinds: the autoscaler's node kinds; ``None`` = a fixed cluster (no autoscaler).
        extra_cpus: CPUs the run also holds beside the decode task (a Tune trial's driver).

    Returns:
        ``None`` when the cluster as it is holds the run, else a warning line (it waits for the
        autoscaler).

    Raises:
        ResourceError: one line with the numbers and the keys to change.
    """
    sc = cfg.scaling
    n, cpus = sc.num_workers, sc.cpus_per_worker
    gpus = sc.gpus_per_worker if sc.use_gpu else 0.0
    decode = cfg.data.decode_cpus + extra_cpus
    need = (f"{n} Train worker(s) x {cpus:g} CPUs{f' + {gpus:g} GPUs' if gpus else ''} "
            f"(scaling.num_workers x scaling.cpus_per_worker{', scaling.gpus_per_worker' if gpus else ''}) plus "
            f"{decode:g} CPUs on one node for a Ray Data decode task (data.decode_cpus"
            f"{f' + {extra_cpus:g} for the trial driver' if extra_cpus else ''})")
    if _fits(nodes, n, cpus, gpus, decode):
        return None
    have = f"the cluster has {_describe(nodes)}"
    if kinds is None:
        if sum(_bundles(x, cpus, gpus) for x in nodes) >= n:
            why = "the workers leave no CPU for decoding and the run would hang at step 0"
        else:
            why = "the workers do not fit"
        raise ResourceError(f"this run needs {need} but {have} and no autoscaler: {why}; lower {KEYS}"
                            f"{' or set scaling.use_gpu=false' if gpus else ''}")
    grown = [k.resources for k in kinds for _ in range(n if k.max_count < 0 else min(k.max_count, n))]
    if sum(_bundles(x, cpus, gpus) for x in (*nodes, *grown)) < n:
        raise ResourceError(f"this run needs {need} but {have} and its autoscaler's kinds "
                            f"({_describe([k.resources for k in kinds])}, at their max_count) do not hold the workers; "
                            f"lower {KEYS}")
    if _decode_room(nodes, [k.resources for k in kinds], cpus, gpus, decode):
        return f"this run needs {need} but {have}: it waits for the autoscaler to add nodes"
    raise ResourceError(f"this run needs {need} but no node of this cluster ({_describe(nodes)}) or of its autoscaler's "
                        f"kinds ({_describe([k.resources for k in kinds])}) keeps CPUs for decoding next to the "
                        f"workers: the run would hang at step 0; lower {KEYS}")


def _decode_room(nodes: Sequence[Mapping[str, float]], kinds: Sequence[Mapping[str, float]], cpus: float, gpus: float,
                 decode: float) -> bool:
    """On a node-size basis, is there room for a decode task whatever node the workers land on? A
    present node that holds no worker and has the CPUs, or a node (present or of a listed kind) that
    keeps them once filled with as many workers as fit."""
    for j, node in enumerate((*nodes, *kinds)):
        k, cpu = _bundles(node, cpus, gpus), float(node.get("CPU", 0.0))
        if (k == 0 and j < len(nodes) and cpu + EPS >= decode) or (k >= 1 and cpu - k * cpus + EPS >= decode):
            return True
    return False


def cluster_nodes() -> tuple[list[dict[str, float]], list[NodeKind]]:
    """``(alive nodes' resources, node kinds the cluster may grow by)`` of the connected Ray cluster.

    Ray's public API does not say whether an autoscaler runs or what it may add, so the kinds are the
    node shapes present, unbounded: a run that only needs *more nodes like these* starts with a
    warning (an autoscaler adds them; without one, Ray Train waits and says so), and a run whose
    worker leaves no decode CPU on any node shape is refused, however far the cluster grows."""
    import ray

    nodes = [{k: float(v) for k, v in n.get("Resources", {}).items()} for n in ray.nodes() if n.get("Alive")]
    shapes = {(n.get("CPU", 0.0), n.get("GPU", 0.0)) for n in nodes}
    return nodes, [NodeKind({"CPU": cpu, "GPU": gpu}) for cpu, gpu in sorted(shapes)]


def check_cluster(cfg: Config, *, extra_cpus: float = 0.0) -> None:
    """``check_resources`` on the connected Ray cluster (nothing when Ray is not initialised yet);
    a run that waits for the autoscaler is logged as a WARNING.

    Raises:
        ResourceError: the run cannot schedule its data.
    """
    import ray

    if not ray.is_initialized():
        return
    nodes, kinds = cluster_nodes()
    warning = check_resources(cfg, nodes, kinds, extra_cpus=extra_cpus)
    if warning:
        log.warning(warning)
