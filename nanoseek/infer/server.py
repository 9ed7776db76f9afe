"""An OpenAI-compatible HTTP server over the engine, and a one-page chat: `nanoseek serve MODEL`.

How it fits together. One engine, one thread that owns it (`EngineLoop`, in engine_loop.py): HTTP handlers
(asyncio, uvicorn) hand it work and await the events of their own requests, so every concurrent request shares
the engine's continuous batch.

Endpoints follow OpenAI's shapes (see REFERENCE.md §5): /v1/models, /v1/chat/completions (reasoning in
`reasoning_content`), /v1/completions (token-id prompts, echo + logprobs for lm-evaluation-harness), SSE streaming
ending in `data: [DONE]`, `stream_options.include_usage`. Extras: per-request `thinking_budget`,
`min_thinking_tokens`, `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `speculative`; `usage.cost_usd` at
the configured prices; `/health`, `/metrics`, and the chat page at `/`. Every error is an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}`; nothing a client sends can produce a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Callable

import torch
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from nanoseek.infer.engine import Engine, Event, Output, Request
from nanoseek.infer.reasoning import count_thinking_tokens
from nanoseek.infer.engine_loop import APIError, EngineLoop, error_body, prompt_logprobs
from nanoseek.infer.sampling import SamplingParams
from nanoseek.tokenizer import ANSWER, END_ANSWER, END_THINK, THINK

log = logging.getLogger("nanoseek.server")
STATIC = Path(__file__).parent / "static"
# The DeepSeek API's price (V3.2, cache miss; REFERENCE.md §7.4): what the same tokens would cost there.
PRICE_INPUT, PRICE_OUTPUT = 0.28, 0.42


# ---------------------------------------------------------------------------------------------- request bodies
class Body(BaseModel):
    """Fields both endpoints share. Unknown fields (user, presence_penalty, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    # extras (vLLM spells these the same way), and nanoseek's thinking budgets
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    thinking_budget: int | None = None
    min_thinking_tokens: int | None = None
    speculative: bool = False


class ChatBody(Body):
    messages: list[dict]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    continue_final_message: bool = False  # the last (assistant) message is a prefix to continue, e.g. "<think>"


class CompletionBody(Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None


# ---------------------------------------------------------------------------------------------- the app
class Server:
    """Turns OpenAI requests into engine requests and engine events into OpenAI responses."""

    def __init__(self, engine: Engine, model_name: str, max_queue: int, max_prompt_tokens: int | None,
                 max_tokens_limit: int | None, price_input: float, price_output: float, defaults: dict):
        self.engine, self.tok, self.model_name = engine, engine.tokenizer, model_name
        self.loop = EngineLoop(engine)
        self.limit = engine.max_batch + max_queue
        self.max_prompt_tokens = min(max_prompt_tokens or engine.max_len - 1, engine.max_len - 1)
        self.max_tokens_limit = max_tokens_limit or engine.max_len
        self.price_input, self.price_output, self.defaults = price_input, price_output, defaults
        self.started = time.time()
        self._strings: dict[int, str] = {}

    # ---- helpers
    def check_model(self, name: str | None) -> None:
        if name not in (None, "", self.model_name):
            raise APIError(404, f"the model {name!r} does not exist here; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def token_str(self, i: int) -> str:
        if i not in self._strings:
            self._strings[i] = self.tok.decode([i]) if self.tok is not None else f"token_id:{i}"
        return self._strings[i]

    def params(self, body: Body, max_tokens: int | None, room: int, **extra) -> SamplingParams:
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"max_tokens must be a positive integer, got {max_tokens}", param="max_tokens")
        if max_tokens is not None and max_tokens > self.max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} is over this server's limit of {self.max_tokens_limit}",
                           param="max_tokens")
        if not 1 <= body.n <= 16:
            raise APIError(400, f"n must be between 1 and 16, got {body.n}", param="n")
        temperature = body.temperature if body.temperature is not None else self.defaults.get("temperature", 1.0)
        top_p = body.top_p if body.top_p is not None else self.defaults.get("top_p", 1.0)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return SamplingParams(
            max_tokens=max_tokens or max(1, min(self.max_tokens_limit, room)), temperature=temperature, top_p=top_p,
            top_k=body.top_k, min_p=body.min_p, repetition_penalty=body.repetition_penalty, seed=body.seed, stop=stop,
            ignore_eos=body.ignore_eos, thinking_budget=body.thinking_budget,
            min_thinking_tokens=body.min_thinking_tokens, speculative=body.speculative, **extra).validate()

    def check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(ids) > self.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server accepts at most "
                                f"{self.max_prompt_tokens}", param="prompt", code="context_length_exceeded")

    def usage(self, prompt_tokens: int, outputs: list[Output], think_open: bool = False) -> dict:
        completion = sum(len(o.token_ids) for o in outputs)
        reasoning = sum(self.reasoning_tokens(o.token_ids, think_open) for o in outputs)
        cost = (prompt_tokens * self.price_input + completion * self.price_output) / 1e6
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion, "cost_usd": round(cost, 10),
                "completion_tokens_details": {"reasoning_tokens": reasoning}}

    def reasoning_tokens(self, ids: list[int], think_open: bool) -> int:
        return count_thinking_tokens(ids, self.engine.think_id, self.engine.end_think_id, think_open)

    async def run(self, request: HTTPRequest, prompts: list[list[int]], params: SamplingParams,
                  on_event: Callable | None = None) -> list[Output]:
        """Submit n choices per prompt, feed each event to `on_event(index, event)` (streaming) or wait for the
        outputs; a client that goes away aborts them."""
        n = request.state.n
        reqs = []
        for p, ids in enumerate(prompts):
            for j in range(n):
                seed = None if params.seed is None else params.seed + j
                reqs.append(Request(ids, SamplingParams(**{**vars(params), "seed": seed}),
                                    request_id=f"{request.state.rid}-{p * n + j}"))
        index = {r.request_id: i for i, r in enumerate(reqs)}
        q = await self.loop.submit(reqs, self.limit)
        if on_event is not None:
            yield ""  # queued: a stream's headers can go now, while it waits for a slot
        outputs: list[Output | None] = [None] * len(reqs)
        pending = len(reqs)
        try:
            while pending:
                try:
                    e = await asyncio.wait_for(q.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if on_event is None and await request.is_disconnected():
                        break
                    continue
                if e is None:
                    raise APIError(500, "the engine failed while generating; see the server log", "server_error")
                if on_event is not None:
                    for chunk in on_event(index[e.request_id], e):
                        yield chunk
                if e.finished:
                    outputs[index[e.request_id]] = e.output
                    pending -= 1
        finally:
            if pending:
                self.loop.abort(list(index))
        request.state.outputs = outputs

    # ---- /v1/chat/completions
    def chat_prompt(self, body: ChatBody) -> tuple[list[int], bool]:
        if self.tok is None:
            raise APIError(400, "this model has no tokenizer, so it cannot chat; use /v1/completions with token-id "
                                "prompts", param="messages")
        if not body.messages:
            raise APIError(400, "messages must hold at least one message", param="messages")
        messages = []
        for i, m in enumerate(body.messages):
            role, content = m.get("role"), m.get("content")
            role = "system" if role == "developer" else role
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise APIError(400, "only text content parts are supported", param=f"messages[{i}].content")
                content = "".join(p["text"] for p in content)
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise APIError(400, f"messages[{i}] needs a role (system, user or assistant) and string content",
                               param=f"messages[{i}]")
            messages.append({"role": role, "content": content})
        if body.continue_final_message:
            if messages[-1]["role"] != "assistant":
                raise APIError(400, "continue_final_message needs an assistant message last", param="messages")
            ids = self.tok.render_chat_ids(messages[:-1]) + self.tok.encode(messages[-1]["content"])
        else:
            ids = self.tok.render_chat_ids(messages)
        e = self.engine
        last = [t for t in ids if t in (e.think_id, e.end_think_id)]
        return ids, bool(last) and last[-1] == e.think_id

    async def chat(self, request: HTTPRequest, body: ChatBody):
        self.check_model(body.model)
        ids, think_open = self.chat_prompt(body)
        self.check_prompt(ids)
        k = body.top_logprobs or 0
        if not 0 <= k <= 20:
            raise APIError(400, f"top_logprobs must be between 0 and 20, got {k}", param="top_logprobs")
        params = self.params(body, body.max_completion_tokens or body.max_tokens, self.engine.max_len - len(ids),
                             logprobs=body.logprobs or k > 0, top_logprobs=k)
        request.state.n, request.state.rid = body.n, uuid.uuid4().hex[:16]
        base = {"id": f"chatcmpl-{request.state.rid}", "created": int(time.time()), "model": self.model_name}

        def logprobs(o: Output) -> dict | None:
            if not params.logprobs:
                return None
            def entry(t: int, lp: float) -> dict:
                s = self.token_str(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            tops = o.top_logprobs or [{}] * len(o.token_ids)
            return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top.items()]}
                                for t, lp, top in zip(o.token_ids, o.logprobs, tops)]}

        if not body.stream:
            async for _ in self.run(request, [ids], params):
                pass
            outs = request.state.outputs
            choices = [{"index": i, "message": {"role": "assistant", "content": o.answer,
                                                "reasoning_content": o.reasoning},
                        "logprobs": logprobs(o), "finish_reason": o.finish_reason} for i, o in enumerate(outs)]
            return {**base, "object": "chat.completion", "choices": choices,
                    "usage": self.usage(len(ids), outs, think_open)}

        splitters = [ReasoningSplitter(think_open) for _ in range(body.n)]

        def chunk(choice: dict) -> str:
            return sse({**base, "object": "chat.completion.chunk", "choices": [choice], "usage": None})

        def on_event(i: int, e: Event):
            s = splitters[i]
            if not s.started:
                s.started = True
                yield chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})
            reasoning, content = s.feed(e.text, final=e.finished)
            delta = {k: v for k, v in (("reasoning_content", reasoning), ("content", content)) if v}
            if delta:
                yield chunk({"index": i, "delta": delta, "logprobs": None, "finish_reason": None})
            if e.finished:
                yield chunk({"index": i, "delta": {}, "logprobs": logprobs(e.output),
                             "finish_reason": e.finish_reason})

        def usage_chunk():
            return {**base, "object": "chat.completion.chunk", "choices": [],
                    "usage": self.usage(len(ids), request.state.outputs, think_open)}

        return await self.stream(self.run(request, [ids], params, on_event), body, usage_chunk)

    # ---- /v1/completions
    async def complete(self, request: HTTPRequest, body: CompletionBody):
        self.check_model(body.model)
        raw = body.prompt
        if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
            raw = [raw]
        if not raw:
            raise APIError(400, "the prompt is empty", param="prompt")
        prompts, texts = [], []
        for p in raw:
            if isinstance(p, str):
                if self.tok is None:
                    raise APIError(400, "this model has no tokenizer, so prompts must be token ids", param="prompt")
                prompts.append(self.tok.encode(p, add_bos=True))
                texts.append(p)
            else:
                if any(t < 0 or t >= self.engine.vocab_size for t in p):
                    raise APIError(400, f"prompt token ids must lie in [0, {self.engine.vocab_size})", param="prompt")
                prompts.append(list(p))
                texts.append(self.tok.decode(p, skip_special=True) if self.tok is not None else "")
            self.check_prompt(prompts[-1])
        k = body.logprobs
        if k is not None and not 0 <= k <= 20:
            raise APIError(400, f"logprobs must be between 0 and 20, got {k}", param="logprobs")
        want_lp = k is not None
        room = self.engine.max_len - max(map(len, prompts))
        if body.echo and body.max_tokens == 0:  # score the prompt only (lm-eval style), no generation
            params, skip = None, True
        else:
            params, skip = self.params(body, body.max_tokens, room, logprobs=want_lp, top_logprobs=k or 0), False
        request.state.n, request.state.rid = body.n, uuid.uuid4().hex[:16]
        prompt_lp = []
        if body.echo and want_lp:
            prompt_lp = await self.loop.call(lambda eng: [prompt_logprobs(eng, p, k) for p in prompts])
        base = {"id": f"cmpl-{request.state.rid}", "created": int(time.time()), "model": self.model_name,
                "object": "text_completion"}

        def logprobs(i: int, o: Output | None) -> dict | None:
            if not want_lp:
                return None
            toks, lps, tops = [], [], []
            p = i // body.n
            if body.echo:
                toks, (lps, tops) = list(prompts[p]), prompt_lp[p]
                lps, tops = list(lps), list(tops)
            if o is not None:
                toks += o.token_ids
                lps += o.logprobs
                tops += o.top_logprobs or [None] * len(o.token_ids)
            offsets, at = [], 0
            for t in toks:
                offsets.append(at)
                at += len(self.tok.decode([t], skip_special=True)) if self.tok is not None else 0
            return {"tokens": [self.token_str(t) for t in toks], "token_logprobs": lps,
                    "top_logprobs": [None if d is None else {self.token_str(a): b for a, b in d.items()} for d in tops],
                    "text_offset": offsets}

        if skip:
            outs = [None] * (len(prompts) * body.n)
        elif not body.stream:
            async for _ in self.run(request, prompts, params):
                pass
            outs = request.state.outputs
        if not body.stream:
            choices = [{"index": i, "text": (texts[i // body.n] if body.echo else "") + (o.text if o else ""),
                        "logprobs": logprobs(i, o), "finish_reason": o.finish_reason if o else "length"}
                       for i, o in enumerate(outs)]
            prompt_tokens = sum(map(len, prompts))
            return {**base, "choices": choices, "usage": self.usage(prompt_tokens, [o for o in outs if o])}

        echoed = set()

        def on_event(i: int, e: Event):
            text = e.text
            if body.echo and i not in echoed:
                echoed.add(i)
                text = texts[i // body.n] + text
            if text or e.finished:
                yield sse({**base, "choices": [{"index": i, "text": text, "finish_reason": e.finish_reason,
                                                "logprobs": logprobs(i, e.output) if e.finished else None}],
                           "usage": None})

        def usage_chunk():
            return {**base, "choices": [], "usage": self.usage(sum(map(len, prompts)), request.state.outputs)}

        return await self.stream(self.run(request, prompts, params, on_event), body, usage_chunk)

    async def stream(self, chunks, body: Body, usage_chunk: Callable) -> StreamingResponse:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        # Pull the first chunk before answering, so a full queue or a bad request still gets its status code.
        first = await anext(chunks, None)

        async def gen():
            try:
                if first:
                    yield first
                async for c in chunks:
                    if c:
                        yield c
                if include_usage:
                    yield sse(usage_chunk())
                yield "data: [DONE]\n\n"
            except APIError as e:  # headers are sent: report in-band, as OpenAI does
                yield sse(error_body(e.message, e.type, e.param, e.code))
            finally:
                await chunks.aclose()  # a client that went away: `run` aborts its requests

        return StreamingResponse(gen(), media_type="text/event-stream")

    def metrics(self) -> dict:
        lp = self.loop
        return {"model": self.model_name, "uptime_s": round(time.time() - self.started, 1),
                "tokens_per_second": round(lp.tokens_per_second(), 2), "tokens_generated_total": lp.tokens_total,
                "prompt_tokens_total": lp.prompt_tokens_total, "requests_served": lp.served,
                "requests_in_flight": len(lp.routes), "running_batch_size": lp.running,
                "queue_depth": max(0, len(lp.routes) - lp.running), "max_batch": self.engine.max_batch,
                "max_in_flight": self.limit, "engine_steps": lp.steps}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class ReasoningSplitter:
    """Streamed text -> (reasoning delta, content delta) by <think>/</think>, dropping <answer> tags; a tag split
    across deltas is held back until it is complete. Leading whitespace of each part is dropped (as the non-streamed
    split strips it)."""

    TAGS = (THINK, END_THINK, ANSWER, END_ANSWER)

    def __init__(self, think_open: bool = False):
        self.thinking, self.buf, self.started, self.seen = think_open, "", False, {True: False, False: False}

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        self.buf += text
        out = {True: "", False: ""}
        while self.buf:
            at = self.buf.find("<")
            if at != 0:  # plain text up to the next possible tag
                piece, self.buf = (self.buf, "") if at < 0 else (self.buf[:at], self.buf[at:])
                self._emit(out, piece)
                continue
            tag = next((t for t in self.TAGS if self.buf.startswith(t)), None)
            if tag is not None:
                self.buf = self.buf[len(tag):]
                self.thinking = {THINK: True, END_THINK: False}.get(tag, self.thinking)
            elif any(t.startswith(self.buf) for t in self.TAGS) and not final:
                break  # maybe the start of a tag: wait for more
            else:
                self._emit(out, "<")
                self.buf = self.buf[1:]
        return out[True], out[False]

    def _emit(self, out: dict, piece: str) -> None:
        if not self.seen[self.thinking]:
            piece = piece.lstrip()
            self.seen[self.thinking] = bool(piece)
        out[self.thinking] += piece


class Gate:
    """ASGI middleware in front of every route: the API key (on /v1/), then the body size. The body is read whole
    and counted (Content-Length is not trusted), answered with 413 past `max_bytes`, else replayed to the app;
    later receive() calls go to the client, so disconnects still arrive."""

    def __init__(self, app, api_key: str | None, max_bytes: int):
        self.app, self.expected, self.max_bytes = app, f"Bearer {api_key}".encode() if api_key else None, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.expected is not None and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                return await JSONResponse(error_body("missing or wrong API key: send the header 'Authorization: "
                                                     "Bearer <key>'", "invalid_request_error", code="invalid_api_key"),
                                          401)(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            size += len(msg.get("body", b""))
            if size <= self.max_bytes:
                chunks.append(msg.get("body", b""))
            elif size > 64 * self.max_bytes:
                break  # stop reading a flood; the connection closes after the answer
            more = msg.get("more_body", False)
        if size > self.max_bytes:
            return await JSONResponse(error_body(f"the request body is over this server's limit of {self.max_bytes} "
                                                 f"bytes", "invalid_request_error", code="body_too_large"),
                                      413)(scope, receive, send)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _model_name(path: Path) -> str:
    return path.parent.name if path.name == "model" else path.name


def create_app(engine_or_model_path: Engine | str | Path, *, api_key: str | None = None, max_batch: int = 16,
               max_queue: int = 64, max_body_bytes: int = 1 << 20, max_prompt_tokens: int | None = None,
               max_tokens_limit: int | None = None, price_input: float = PRICE_INPUT,
               price_output: float = PRICE_OUTPUT, model_name: str | None = None, device: str | None = None,
               dtype: torch.dtype | None = None, draft_tokens: int | None = None) -> FastAPI:
    """The FastAPI app. Give an `Engine` (tests) or a model/run directory (loaded here with `max_batch` slots and
    `draft_tokens` drafts per speculative step, for requests that ask for `speculative`)."""
    from contextlib import asynccontextmanager

    from nanoseek.checkpoint import resolve_model_dir

    defaults = {}
    if isinstance(engine_or_model_path, Engine):
        engine = engine_or_model_path
        model_name = model_name or "nanoseek"
    else:
        directory = resolve_model_dir(engine_or_model_path)
        engine = Engine(directory, dtype=dtype, device=device, max_batch=max_batch, draft_tokens=draft_tokens)
        model_name = model_name or _model_name(directory.resolve())
        gen = directory / "generation_config.json"
        if gen.is_file():  # the model's recommended sampling, as vLLM applies it
            defaults = {k: v for k, v in json.loads(gen.read_text()).items() if k in ("temperature", "top_p")}
    server = Server(engine, model_name, max_queue, max_prompt_tokens, max_tokens_limit, price_input, price_output,
                    defaults)

    @asynccontextmanager
    async def lifespan(app):
        server.loop.start(asyncio.get_running_loop())
        yield
        server.loop.stop()

    app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(Gate, api_key=api_key, max_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        else:
            param = loc[0] if loc else None  # the top-level field (deeper parts name pydantic's union members)
            msg = f"invalid value for '{param}': {err.get('msg', 'invalid request')}" if param else \
                f"invalid request: {err.get('msg', '')}"
        return JSONResponse(error_body(msg, "invalid_request_error", param), 400)

    @app.exception_handler(ValueError)
    async def bad_value(request, e: ValueError):
        return JSONResponse(error_body(str(e), "invalid_request_error"), 400)

    @app.exception_handler(Exception)
    async def crash(request, e: Exception):
        log.exception("unhandled error serving %s", request.url.path)
        return JSONResponse(error_body("internal server error; see the server log", "server_error"), 500)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse((STATIC / "chat.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        alive = server.loop.thread is not None and server.loop.thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "down", "model": model_name}, 200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return server.metrics()

    def card() -> dict:
        return {"id": model_name, "object": "model", "created": int(server.started), "owned_by": "nanoseek",
                "max_model_len": engine.max_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        server.check_model(name)
        return card()

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest, body: ChatBody):
        return await server.chat(request, body)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest, body: CompletionBody):
        return await server.complete(request, body)

    return app
