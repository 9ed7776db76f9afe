"""The one thread that owns the engine, for the HTTP server (`nanoseek.infer.server`).

HTTP handlers run on asyncio and never touch the engine: they hand `EngineLoop` a callable (add these requests,
abort that one, score this prompt) through a thread-safe queue and await its result. Between commands the loop
calls `engine.step()` while anything is unfinished, so every concurrent request shares the engine's continuous
batch, and posts each step's events back to the event loop, into the asyncio.Queue of the request that owns them.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable

import torch

from nanoseek.infer.engine import Engine, Event, Request

log = logging.getLogger("nanoseek.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------- the engine thread
class EngineLoop:
    """The only thread that touches the engine. `call(fn)` runs fn(engine) there between steps."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.commands: queue.Queue = queue.Queue()
        self.routes: dict[str, asyncio.Queue] = {}  # request id -> its HTTP request's queue (event-loop side)
        self.live: set[str] = set()  # request ids the engine holds (loop-thread side)
        self.aloop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.running = 0  # batch size after the last step
        self.history: deque[tuple[float, int]] = deque(maxlen=4096)  # (time, tokens made) per step
        self.tokens_total = self.prompt_tokens_total = self.served = self.steps = 0

    def start(self, aloop: asyncio.AbstractEventLoop) -> None:
        self.aloop = aloop
        self.thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.commands.put(None)
            self.thread.join(timeout=10)

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        future: Future = Future()
        self.commands.put((fn, future))
        return await asyncio.wrap_future(future)

    def _run(self) -> None:
        engine = self.engine
        while True:
            try:  # block while idle; otherwise take whatever arrived since the last step
                item = self.commands.get(block=not engine.has_unfinished())
            except queue.Empty:
                item = ()
            while item != ():
                if item is None:
                    return
                fn, future = item
                try:
                    future.set_result(fn(engine))
                except BaseException as e:  # the caller turns it into an error response
                    future.set_exception(e)
                try:
                    item = self.commands.get_nowait()
                except queue.Empty:
                    item = ()
            self.running = len(engine.running)
            if not engine.has_unfinished():
                continue
            try:
                events = engine.step()
            except Exception:
                log.exception("engine step failed; failing the requests in flight")
                for rid in list(self.live):
                    engine.abort(rid)
                failed, self.live = list(self.live), set()
                self.aloop.call_soon_threadsafe(self._fail, failed)
                continue
            made = sum(len(e.token_ids) for e in events)
            self.tokens_total += made
            self.steps += 1
            self.history.append((time.monotonic(), made))
            for e in events:
                if e.finished:
                    self.live.discard(e.request_id)
                    self.served += 1
            self.running = len(engine.running)
            if events:
                self.aloop.call_soon_threadsafe(self._dispatch, events)

    # these two run on the event loop
    def _dispatch(self, events: list[Event]) -> None:
        for e in events:
            q = self.routes.get(e.request_id)
            if q is not None:
                q.put_nowait(e)
                if e.finished:
                    del self.routes[e.request_id]

    def _fail(self, rids: list[str]) -> None:
        for rid in rids:
            q = self.routes.pop(rid, None)
            if q is not None:
                q.put_nowait(None)  # None: the engine failed

    async def submit(self, requests: list[Request], limit: int) -> asyncio.Queue:
        """Queue requests in the engine (all or none); their events arrive on the returned queue. 429 when the
        engine already holds `limit` requests."""
        if len(self.routes) + len(requests) > limit:
            raise APIError(429, f"the server is busy ({len(self.routes)} requests in flight, limit {limit}); "
                                f"retry shortly", "rate_limit_error", code="queue_full")
        q: asyncio.Queue = asyncio.Queue()
        for r in requests:
            self.routes[r.request_id] = q

        def add(engine: Engine) -> None:
            added = []
            try:
                for r in requests:
                    added.append(engine.add_request(r))
            except Exception:
                for rid in added:
                    engine.abort(rid)
                raise
            self.live.update(added)
            self.prompt_tokens_total += sum(len(r.prompt) for r in requests)

        try:
            await self.call(add)
        except BaseException:
            for r in requests:
                self.routes.pop(r.request_id, None)
            raise
        return q

    def abort(self, rids: list[str]) -> None:
        """Forget these requests now and free their slots at the loop's next turn (fire and forget)."""
        rids = [r for r in rids if self.routes.pop(r, None) is not None]
        if rids:
            def drop(engine: Engine) -> None:
                for rid in rids:
                    if engine.abort(rid):
                        self.live.discard(rid)
            self.commands.put((drop, Future()))

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self.history) if now - t <= window]
        if len(recent) < 2:
            return 0.0
        return sum(n for _, n in recent[1:]) / max(recent[-1][0] - recent[0][0], 1e-6)


@torch.inference_mode()
def prompt_logprobs(engine: Engine, ids: list[int], k: int) -> tuple[list, list]:
    """Log p(prompt token | everything before it) from one full forward (the first token has none), and the k
    likeliest tokens at each position: what echo + logprobs reports for the prompt. Runs on the engine thread."""
    x = torch.tensor([ids], device=engine.device)
    lp = engine.model(x)[0, :-1].float().log_softmax(dim=-1)
    chosen = lp.gather(1, x[0, 1:, None])[:, 0].tolist()
    tops: list = [None] * len(chosen)
    if k > 0:
        v, i = lp.topk(min(k, lp.shape[-1]), dim=-1)
        tops = [dict(zip(a, b)) for a, b in zip(i.tolist(), v.tolist())]
    return [None] + chosen, [None] + tops
