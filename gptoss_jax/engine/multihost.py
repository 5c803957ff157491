"""One engine schedule run by every process of a `jax.distributed` job, requests taken by process 0.

Process 0 (the leader) takes `submit` and `cancel` as usual; each step that has work, it publishes
that step's events (the requests that arrived, with their ids and resolved seeds, the
cancellations, and its measured decode step time, which sizes the step's dispatch) under a
numbered key of jax.distributed's key-value store before running it. The other processes
(followers) run `follow`: they read each step's events, in order, and run the same
step, so every process issues the same jitted calls in the same order (as a mesh spanning the
processes needs) and holds the same handles and tokens. `shutdown` (leader) ends the followers.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
from jax._src import distributed

from gptoss_jax.engine.engine import Engine, _Request
from gptoss_jax.engine.request import Handle, RequestSettings


def _client() -> Any:
    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("MultihostEngine needs jax.distributed.initialize(...) first")
    return client


class MultihostEngine(Engine):
    """An `Engine` whose schedule process 0 decides and every process runs (see the module doc)."""

    def __init__(self, *args: Any, namespace: str = "gptoss_jax/engine", timeout_s: float = 3600, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._client, self._namespace = _client(), namespace
        self._timeout_ms = int(timeout_s * 1000)
        self._published = 0
        self._following = False
        self.leader = jax.process_index() == 0
        self.handles: dict[str, Handle] = {}  # every request this process has seen, by id

    def submit(self, prompt: Any, settings: RequestSettings, request_id: str | None = None) -> Handle:
        """Leader only: as `Engine.submit`."""
        if not self.leader:
            raise RuntimeError("requests go to process 0; this process follows its schedule (`follow`)")
        handle = super().submit(prompt, settings, request_id)
        self.handles[handle.request_id] = handle
        return handle

    def cancel(self, request_id: str) -> None:
        """Leader only: as `Engine.cancel`."""
        if not self.leader:
            raise RuntimeError("cancellations go to process 0")
        super().cancel(request_id)

    def _key(self, index: int) -> str:
        return f"{self._namespace}/step/{index}"

    def _take_events(self) -> tuple[list[_Request], list[str]] | None:
        events = super()._take_events()
        if self.leader and events is not None:
            arrivals, cancels = events
            self._publish({"arrivals": [{"id": r.handle.request_id, "prompt": r.prompt, "seed": r.seed,
                                         "settings": dataclasses.asdict(r.settings)} for r in arrivals],
                           "cancels": cancels, "step_seconds": self._step_seconds})
        return events

    def step(self) -> bool:
        """Leader: as `Engine.step`, publishing the step's events first."""
        if not self.leader and not self._following:
            raise RuntimeError("a follower runs `follow`, not `step`")
        return super().step()

    def _publish(self, message: dict) -> None:
        self._client.key_value_set(self._key(self._published), json.dumps(message))
        self._published += 1

    def shutdown(self) -> None:
        """Leader: tells the followers that the schedule has ended."""
        self._publish({"stop": True})

    def follow(self) -> None:
        """Follower: runs the leader's steps, in order, until it calls `shutdown`."""
        if self.leader:
            raise RuntimeError("process 0 leads: it runs `step`, not `follow`")
        while True:
            message = json.loads(self._client.blocking_key_value_get(self._key(self._published), self._timeout_ms))
            self._published += 1
            if message.get("stop"):
                return
            arrivals = []
            for item in message["arrivals"]:
                settings = RequestSettings(**{name: tuple(value) if isinstance(value, list) else value
                                              for name, value in item["settings"].items()})
                request = _Request(Handle(item["id"], len(item["prompt"])), item["prompt"], settings, item["seed"])
                self.handles[item["id"]] = request.handle
                arrivals.append(request)
            with self._lock:
                for request in arrivals:
                    self._admit_locally(request)
                self._cancels.extend(message["cancels"])
            self._step_seconds = message["step_seconds"]  # the leader's: the same dispatch length
            self._following = True
            try:
                self.step()
            finally:
                self._following = False
