"""How the Ray backend tells Ray's own failures: whether the cluster's GCS answers (without a Ray
call, which would wait for it), whether a node is alive, an actor's state, Ray's words for an
actor's end. Only the driver imports this; every Ray call here is one that may fail, so none
raises: each says what it could not learn.
"""

from __future__ import annotations

import socket
import time
from typing import Any

__all__ = [
    "GcsWatch",
    "actor_state",
    "free_per_node",
    "gcs_address",
    "kill_quietly",
    "node_alive",
    "ray_error",
    "room_on_a_node",
    "still_waiting",
]

#: Ray's states of an actor that has no process yet.
_NOT_PLACED = ("DEPENDENCIES_UNREADY", "PENDING_CREATION")
#: Between two looks at whether the GCS answers.
_GCS_PROBE_S = 2.0


def still_waiting(actor: Any) -> bool:
    """Ray has not given the actor a process yet (from the cluster's actor table)."""
    try:
        from ray._private.state import actors  # no public call says this without the dashboard

        entry = actors(actor._actor_id.hex())
    except Exception:  # noqa: BLE001 - the table could not be read: the free resources decide alone
        return True
    return entry.get("State") in _NOT_PLACED and not entry.get("Pid")


def ray_error(exc: BaseException) -> str:
    """Ray's own words for an actor's end: the class, and the lines that say why (its
    ActorDiedError lists class, id, pid and IP, then the cause)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    why = [line for line in lines if not line.startswith(("class_name:", "actor_id:", "namespace:"))]
    text = " ".join(why)
    return f"{type(exc).__name__}: {text[:600]}" if text else type(exc).__name__


def kill_quietly(ray: Any, actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001, S110 - already gone, or the cluster with it
        pass


def gcs_address(ray: Any) -> str | None:
    """host:port of the cluster's GCS, as this driver reached it."""
    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - no such field in this Ray: the cluster's loss is then not watched
        return None


class GcsWatch:
    """Whether the cluster's GCS answers (a TCP connect: no Ray call, which would wait for it)."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self.silent_since: float | None = None
        self.looked = 0.0

    def answers(self) -> bool:
        if not self.address:
            return True
        host, _, port = self.address.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return True
        except (OSError, ValueError):
            return False

    def gone_for(self) -> float:
        """Seconds the GCS has not answered (0 while it does); looks every ``_GCS_PROBE_S``."""
        now = time.monotonic()
        if now - self.looked >= _GCS_PROBE_S:
            self.looked = now
            if self.answers():
                self.silent_since = None
            elif self.silent_since is None:
                self.silent_since = now
        return 0.0 if self.silent_since is None else now - self.silent_since


def node_alive(ray: Any, node_id: str, gcs: str | None) -> tuple[bool | None, str]:
    """Whether the node ``node_id`` is still there, and in what words: None when the cluster itself
    does not answer (its GCS is asked only once a TCP connect says it is there, so the call does
    not wait), False when Ray counts the node dead or its raylet does not take a connection (Ray
    takes seconds to notice a raylet killed; its socket says so at once)."""
    if not GcsWatch(gcs).answers():
        return None, f"the Ray cluster is gone: its GCS at {gcs} does not answer"
    try:
        nodes = {n["NodeID"]: n for n in ray.nodes()}
    except Exception:  # noqa: BLE001 - the GCS went while asked
        return None, f"the Ray cluster is gone: its GCS at {gcs} stopped answering"
    node = nodes.get(node_id)
    ip = node.get("NodeManagerAddress", "?") if node else "?"
    if node is None or not node.get("Alive"):
        why = (node or {}).get("DeathReasonMessage") or "Ray counts it dead"
        return False, f"Ray node {ip} is gone: {why}"
    raylet = f"{ip}:{node.get('NodeManagerPort')}"
    if not GcsWatch(raylet).answers():
        return False, f"Ray node {ip} is gone: its raylet at {raylet} does not answer"
    return True, f"on Ray node {ip}"


def actor_state(actor: Any) -> str:
    try:
        from ray._private.state import actors

        entry = actors(actor._actor_id.hex())
    except Exception:  # noqa: BLE001 - the table could not be read
        return "Ray did not say why"
    return f"Ray's state for it: {entry.get('State', 'unknown')}"


def free_per_node(ray: Any) -> list[dict[str, float]]:
    """Each live node's free resources (the whole cluster's as one, where Ray cannot say)."""
    try:
        from ray._private import state

        per_node: Any = state.available_resources_per_node
        return [dict(free) for free in per_node().values()]
    except Exception:  # noqa: BLE001 - a private call that may move between Ray versions
        return [dict(ray.available_resources())]


def room_on_a_node(ray: Any, needs: dict[str, float]) -> bool:
    """Some live node has ``needs`` free and its raylet takes a connection (a node whose raylet
    was just killed keeps its free resources in Ray's tables for the seconds Ray takes to notice)."""
    try:
        from ray._private import state

        available: Any = state.available_resources_per_node
        per_node: dict[str, Any] = dict(available())
        raylets = {n["NodeID"]: f"{n['NodeManagerAddress']}:{n['NodeManagerPort']}" for n in ray.nodes()}
    except Exception:  # noqa: BLE001 - a private call that may move between Ray versions
        return any(_fits(free, needs) for free in free_per_node(ray))
    fitting = [node_id for node_id, free in per_node.items() if _fits(dict(free), needs)]
    return any(GcsWatch(raylets.get(node_id)).answers() for node_id in fitting)


def _fits(free: dict[str, float], needs: dict[str, float]) -> bool:
    return all(free.get(name, 0.0) >= amount for name, amount in needs.items())
