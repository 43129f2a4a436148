"""Following a registry alias: the inference service's hot swap (docs/design.md §1).

One daemon thread, ``alias-follower``, does all of it, so no download or load runs on the request
path:
- It subscribes to the Redis channel ``draftopd:aliases`` (when ``redis_url`` is set). An event
  about its drafter and alias is only a wake-up: the thread then reads the alias from the registry
  (``GET /drafters/{name}/aliases/{alias}``) and acts on that answer. So events that arrive late,
  out of order or in a burst cannot swap in a stale version; a burst costs one read.
- It also reads the alias every ``alias_poll_s``: the fallback when Redis is down or an event was
  lost. A lost Redis connection is re-subscribed at the next poll.
- When the alias names a version other than the served one, it fetches the artifact into
  ``artifact_cache_dir`` (``RegistryClient.fetch_version``: sha256 checked against the registry),
  loads it for the service's target, and swaps the service's ``ServedDrafter`` holder. A request
  keeps the holder it started with. The last two loaded versions stay in memory, so flipping the
  alias back (a rollback) swaps at once.

The canary. A second follower (``CandidateFollower``) follows ``candidate_alias`` (default
``candidate``) the same way, and serves its version to the alias's traffic share of requests
(``InferenceService.set_candidate``). A missing candidate alias, or a share of 0, serves none.

Bad versions. A ValueError while fetching or loading (sha256 mismatch, a drafter built for another
target, unreadable weights or config) refuses that alias state (version, sha256, updated_at):
serving goes on with the old version, the error is logged and shown in ``/health``
(``registry.last_swap_error``), and the same state is not tried again. Setting the alias again
(even to the same version) is a new state and is tried. A transient failure (registry
unreachable, a 5xx) is retried at the next poll or event, never in a tight loop.
"""

from __future__ import annotations

import json
import logging
import tarfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import redis
import torch

from draftopd.models.target import default_cache_dir
from draftopd.wire.registry_client import RegistryClient, RegistryError, connect
from services.inference.drafters import (
    ServedDrafter,
    load_checkpoint_drafter,
    registry_version_label,
)
from services.inference.serving import InferenceService
from services.inference.settings import InferenceSettings
from services.inference.status import AliasFollowStatus, SwapError

logger = logging.getLogger(__name__)

ALIAS_CHANNEL = "draftopd:aliases"  # the registry's alias-event channel (docs/design.md §1)
LOADED_KEPT = 2  # loaded versions kept in memory (the served one and the one before)
_REFUSED = (ValueError, KeyError, TypeError, RuntimeError, tarfile.TarError)  # a bad artifact
_TRANSIENT = (RegistryError, httpx.HTTPError, OSError)  # the registry or the disk, for now


@dataclass(frozen=True)
class AliasState:
    """Where the registry says the alias points. ``updated_at`` changes on every PUT."""

    version: int
    sha256: str
    updated_at: str
    traffic: float | None = None  # the alias's share of requests (the canary)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AliasState:
        traffic = data.get("traffic")
        return cls(
            int(data["version"]),
            str(data["sha256"]),
            str(data["updated_at"]),
            None if traffic is None else float(traffic),
        )


class AliasFollower:
    """Keeps ``service`` serving the registry version that ``alias`` (default
    ``settings.drafter_alias``) names."""

    absent_ok = False  # a missing alias is a problem (production); the canary's is not

    def __init__(
        self,
        service: InferenceService,
        settings: InferenceSettings,
        *,
        client: RegistryClient | None = None,
        alias: str | None = None,
    ) -> None:
        if settings.registry_url is None or settings.drafter_name is None:
            raise ValueError("following an alias needs registry_url and drafter_name")
        self.service = service
        self.name, self.alias = settings.drafter_name, alias or settings.drafter_alias
        self.poll_s = settings.alias_poll_s
        self.client = client or connect(
            settings.registry_url, settings.registry_token, timeout=30.0
        )
        self.cache_dir = Path(settings.artifact_cache_dir or default_cache_dir() / "drafters")
        self.redis_url = settings.redis_url
        self.torch_threads = settings.torch_threads
        self._redis: redis.Redis | None = None  # the events connection while subscribed
        self._pubsub: Any = None  # its redis.client.PubSub
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sync_lock = threading.Lock()  # one sync at a time (the thread, or a caller)
        self._status_lock = threading.Lock()
        self._status = AliasFollowStatus(
            drafter=self.name,
            alias=self.alias,
            alias_version=None,
            in_sync=False,
            problem="the alias has not been read yet",
            events=False,
            swaps=0,
            last_checked_at=None,
            last_swap_error=None,
        )
        self._refused: dict[AliasState, str] = {}  # refused alias state -> the problem shown
        self._loaded: OrderedDict[tuple[int, str], ServedDrafter] = OrderedDict()

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Subscribe, serve what the alias names now, then follow it in the background.
        Blocking (the first load): call it off the event loop."""
        self.sync()
        self._thread = threading.Thread(target=self._run, name="alias-follower", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._unsubscribe()
        self.client.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> AliasFollowStatus:
        with self._status_lock:
            return self._status.model_copy()

    # -- one round: read the alias, swap if it moved -------------------------------------------
    def sync(self) -> None:
        """Read the alias and serve the version it names (downloads and loads: blocking)."""
        with self._sync_lock:
            if self.redis_url is not None and self._pubsub is None:
                self._subscribe()  # before the read, so no move after it goes unnoticed
            state = self._read_alias()
            if state is None:
                return
            if not self._wanted(state):
                self._serve(None, state)
                self._update(in_sync=True, problem=None)
                return
            served = self._served()
            label = registry_version_label(self.name, state.version)
            if served is not None and (served.version, served.sha256) == (label, state.sha256):
                self._serve(served, state)  # the same version; the share may have moved
                self._update(in_sync=True, problem=None)
            elif state in self._refused:  # not again until the alias is set again
                self._update(in_sync=False, problem=self._refused[state])
            else:
                self._swap_to(state, label)

    def _read_alias(self) -> AliasState | None:
        try:
            state = AliasState.from_json(self.client.get_alias(self.name, self.alias))
        except RegistryError as err:
            if err.status_code == 404 and self.absent_ok:
                self._serve(None, None)
                self._update(in_sync=True, problem=None, alias_version=None, last_checked_at=_now())
                return None
            if err.status_code == 404:
                problem = f"alias {self.name}/{self.alias} does not exist (yet): {err.detail}"
            else:
                problem = f"reading alias {self.name}/{self.alias}: {err}"
            self._not_read(problem, alias_version=None)
            return None
        except (httpx.HTTPError, KeyError, ValueError) as err:
            self._not_read(f"registry unreachable or answering nonsense: {err!r}")
            return None
        self._update(alias_version=state.version, last_checked_at=_now())
        return state

    def _not_read(self, problem: str, **fields: Any) -> None:
        """Record why the alias could not be read; logged once, not at every poll."""
        if self.status().problem != problem:
            logger.warning("%s", problem)
        self._update(in_sync=False, problem=problem, **fields)

    def _swap_to(self, state: AliasState, label: str) -> None:
        try:
            holder = self._loaded.get((state.version, state.sha256)) or self._load(state, label)
        except _TRANSIENT as err:
            self._failed(state, f"fetching {label} failed: {err}", refused=False)
            return
        except _REFUSED as err:
            self._refused[state] = self._failed(state, f"refused {label}: {err}", refused=True)
            return
        self._loaded[(state.version, state.sha256)] = holder
        self._loaded.move_to_end((state.version, state.sha256))
        while len(self._loaded) > LOADED_KEPT:
            self._loaded.popitem(last=False)
        previous = self._served()
        self._serve(holder, state)
        self.service.metrics.drafter_swaps.labels("swapped").inc()
        self._update(in_sync=True, problem=None, swaps=self.status().swaps + 1)
        logger.info(
            "hot swap: %s -> %s (alias %s)",
            previous.version if previous else None,
            label,
            self.alias,
        )

    # -- what this follower serves (production: the service's drafter) ------------------------
    def _wanted(self, state: AliasState) -> bool:
        """Whether the alias state asks for a drafter to be served at all."""
        return True

    def _served(self) -> ServedDrafter | None:
        return self.service.drafter

    def _serve(self, holder: ServedDrafter | None, state: AliasState | None) -> None:
        if holder is not None:
            self.service.swap_drafter(holder)

    def _load(self, state: AliasState, label: str) -> ServedDrafter:
        directory = self.client.fetch_version(
            self.name, state.version, self.cache_dir, expected_sha256=state.sha256
        )
        return load_checkpoint_drafter(
            directory, self.service.target, version=label, sha256=state.sha256
        )

    def _failed(self, state: AliasState, reason: str, *, refused: bool) -> str:
        """Log and show why ``state`` is not served; returns the problem shown in /health."""
        served = self._served()
        still = served.version if served else "no drafter"
        logger.error("%s; still serving %s", reason, still)
        error = SwapError(
            version=state.version, sha256=state.sha256, reason=reason, refused=refused, at=_now()
        )
        self.service.metrics.drafter_swaps.labels("refused" if refused else "failed").inc()
        problem = f"{reason}; serving {still}"
        self._update(in_sync=False, problem=problem, last_swap_error=error)
        return problem

    def _update(self, **fields: Any) -> None:
        with self._status_lock:
            self._status = self._status.model_copy(update=fields)

    # -- the background thread ------------------------------------------------------------------
    def _run(self) -> None:
        if self.torch_threads is not None:
            torch.set_num_threads(self.torch_threads)  # a per-thread setting, as in serving
        next_poll = time.monotonic() + self.poll_s
        while not self._stop.is_set():
            woken = self._wait_for_event(next_poll)
            if self._stop.is_set():
                break
            if woken or time.monotonic() >= next_poll:
                self.sync()
                next_poll = time.monotonic() + self.poll_s

    def _wait_for_event(self, deadline: float) -> bool:
        """Wait until an event about our alias (True) or ``deadline`` (False)."""
        while (remaining := deadline - time.monotonic()) > 0 and not self._stop.is_set():
            if self._pubsub is None:
                self._stop.wait(remaining)
                return False
            try:
                message = self._pubsub.get_message(timeout=min(remaining, 0.5))
            except (redis.RedisError, OSError) as err:
                logger.warning("alias events lost (%s); polling, re-subscribing at the next", err)
                self._unsubscribe()
                return False
            if message is not None and self._is_ours(message):
                self._drain()
                return True
        return False

    def _drain(self) -> None:
        """Drop the events already queued: the alias read that follows covers them all."""
        try:
            while self._pubsub is not None and self._pubsub.get_message(timeout=0.0) is not None:
                pass
        except (redis.RedisError, OSError):
            self._unsubscribe()

    def _is_ours(self, message: dict[str, Any]) -> bool:
        if message.get("type") != "message":
            return False
        try:
            event = json.loads(message["data"])
        except (TypeError, ValueError):
            logger.warning("ignoring a malformed alias event: %r", message.get("data"))
            return False
        return isinstance(event, dict) and (event.get("drafter"), event.get("alias")) == (
            self.name,
            self.alias,
        )

    def _subscribe(self) -> None:
        assert self.redis_url is not None
        client = redis.Redis.from_url(
            self.redis_url, socket_connect_timeout=2.0, health_check_interval=30
        )
        pubsub = client.pubsub()
        try:
            pubsub.subscribe(ALIAS_CHANNEL)
            reply = pubsub.get_message(timeout=2.0)  # the server's confirmation
        except (redis.RedisError, OSError) as err:
            if self.status().last_checked_at is None:  # once, not at every poll
                logger.warning("no alias events (%s); polling every %ss", err, self.poll_s)
            pubsub.close()
            client.close()
            self._update(events=False)
            return
        if reply is None or reply.get("type") != "subscribe":
            logger.warning("no confirmation of the subscription to %s: %r", ALIAS_CHANNEL, reply)
        self._redis, self._pubsub = client, pubsub
        self._update(events=True)
        logger.info("following %s/%s: subscribed to %s", self.name, self.alias, ALIAS_CHANNEL)

    def _unsubscribe(self) -> None:
        client, pubsub = self._redis, self._pubsub
        self._redis, self._pubsub = None, None
        if pubsub is not None:
            pubsub.close()
        if client is not None:
            client.close()
        self._update(events=False)


class CandidateFollower(AliasFollower):
    """Follows the canary alias: its version serves its traffic share of requests."""

    absent_ok = True

    def __init__(
        self,
        service: InferenceService,
        settings: InferenceSettings,
        *,
        client: RegistryClient | None = None,
    ) -> None:
        if not settings.candidate_alias:
            raise ValueError("following the canary needs candidate_alias")
        super().__init__(service, settings, client=client, alias=settings.candidate_alias)

    def _wanted(self, state: AliasState) -> bool:
        return bool(state.traffic)

    def _served(self) -> ServedDrafter | None:
        canary = self.service.canary
        return canary.drafter if canary is not None else None

    def _serve(self, holder: ServedDrafter | None, state: AliasState | None) -> None:
        traffic = state.traffic if state is not None else None
        if holder is None or not traffic:
            if self.service.canary is not None:
                logger.info("canary ended: %s serves no share", self.service.canary.drafter.version)
            self.service.set_candidate(None, 0.0)
        else:
            self.service.set_candidate(holder, traffic)


def _now() -> datetime:
    return datetime.now(UTC)
