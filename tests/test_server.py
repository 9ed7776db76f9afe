"""The OpenAI-compatible server against a real uvicorn on 127.0.0.1, driven by the official `openai` client, raw
HTTP (httpx) and a headless Chromium for the chat page.

Bad inputs tried (each must get an OpenAI-style error body {"error": {message, type, param, code}} and a 4xx):
- malformed JSON (400)
- wrong types: `messages` a number, `max_tokens` a string, `temperature` a string, `prompt` a dict (400)
- negative max_tokens, zero max_tokens, max_tokens over the server's limit (400)
- parameters SamplingParams rejects: top_p 2, negative temperature, min_thinking_tokens > thinking_budget (400)
- an unknown chat role, empty messages, token ids outside the vocabulary, n = 0 (400)
- an unknown model (404)
- an over-long prompt (400, code context_length_exceeded)
- a missing or wrong API key (401)
- an oversized body (413)
- a client that disconnects mid-stream: its slot is freed (the engine holds nothing, /metrics shows 0 in flight)
- a full queue (429, then the queue drains)
"""

import base64
import fcntl
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from nanoseek.checkpoint import load_model  # noqa: E402
from nanoseek.infer.reasoning import split_reasoning  # noqa: E402
from nanoseek.infer.server import ReasoningSplitter, create_app  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402

KEY = "test-key"
MODEL = "smoke"
PRICE_IN, PRICE_OUT = 1.0, 2.0  # USD per million tokens
CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A smoke model pretrained for 3 steps, served on a free loopback port from a background thread."""
    from nanoseek.cli import main

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("serve") / "run"
    assert main(["pretrain", "--preset", "smoke", "--data", "builtin:300", "--batch-size", "4", "--seq-len", "64",
                 "--steps", "3", "--run", str(run)]) == 0
    app = create_app(run / "model", api_key=KEY, max_batch=2, max_queue=1, max_body_bytes=32_000,
                     max_prompt_tokens=120, max_tokens_limit=128, price_input=PRICE_IN, price_output=PRICE_OUT,
                     model_name=MODEL)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield {"base": f"http://127.0.0.1:{port}", "model_dir": run / "model", "app": app,
           "tok": Tokenizer.load(run / "model")}
    server.should_exit = True
    thread.join(timeout=10)
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served["base"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _post(served, path, body, key=KEY, **kw):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(served["base"] + path, content=content, headers=headers, timeout=60, **kw)


def _metrics(served) -> dict:
    return httpx.get(served["base"] + "/metrics", timeout=10).json()


def _wait_idle(served, timeout=20.0) -> dict:
    deadline = time.time() + timeout
    while True:
        m = _metrics(served)
        if m["requests_in_flight"] == 0 and m["running_batch_size"] == 0 and \
                not served["app"].state.server.engine.has_unfinished():
            return m
        assert time.time() < deadline, f"requests still in flight: {m}"
        time.sleep(0.05)


HI = [{"role": "user", "content": "What is 12+30?"}]


# ---------------------------------------------------------------------------------------------- happy paths
def test_models_health_metrics(served, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(served["base"] + "/health").json()["status"] == "ok"
    m = _metrics(served)
    for k in ("tokens_per_second", "tokens_generated_total", "queue_depth", "running_batch_size", "requests_served"):
        assert k in m


def test_chat_reasoning_usage_and_cost(served, client):
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    prompt = served["tok"].render_chat_ids(HI)
    assert r.usage.prompt_tokens == len(prompt)
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.cost_usd == pytest.approx((r.usage.prompt_tokens * PRICE_IN + r.usage.completion_tokens * PRICE_OUT)
                                             / 1e6)
    # reasoning_content is always there and is the split of the raw text (same prompt ids, greedy, via completions)
    raw = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert (choice.message.reasoning_content, choice.message.content) == split_reasoning(raw.choices[0].text)


def test_reasoning_content_with_forced_think(served, client):
    """Pre-fill "<think>" (continue_final_message) and cap thinking at 3 tokens: the engine forces </think>, so the
    reasoning is exactly those tokens, in the message and in the stream's deltas."""
    messages = HI + [{"role": "assistant", "content": "<think>"}]
    extra = {"continue_final_message": True, "thinking_budget": 3, "min_thinking_tokens": 3}
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, extra_body=extra)
    msg = r.choices[0].message
    assert msg.reasoning_content
    assert r.usage.completion_tokens_details.reasoning_tokens == 3
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                            extra_body=extra, stream=True)
    reasoning = content = ""
    for chunk in stream:
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
    assert reasoning.strip() == msg.reasoning_content
    assert content.strip() == msg.content


def test_chat_stream_and_include_usage(served, client):
    full = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=HI, max_tokens=16, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in body)
    assert body[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert text.strip() == full.choices[0].message.content
    raw = _post(served, "/v1/chat/completions", {"messages": HI, "max_tokens": 4, "stream": True})
    events = [line for line in raw.text.split("\n\n") if line]
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_completions_text_ids_and_n(served, client):
    tok = served["tok"]
    r = client.completions.create(model=MODEL, prompt="The answer is", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.usage.prompt_tokens == len(tok.encode("The answer is", add_bos=True))
    ids = [tok.encode("hello world", add_bos=True), tok.encode("2+2=", add_bos=True)]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.prompt_tokens == sum(map(len, ids)) and 2 <= r.usage.completion_tokens <= 10
    one = client.completions.create(model=MODEL, prompt=ids[1], max_tokens=5, temperature=0)
    assert one.choices[0].text == r.choices[1].text  # batched or alone, greedy gives the same tokens
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=ids[1], max_tokens=5, temperature=0, stream=True))
    assert streamed == one.choices[0].text
    a = client.completions.create(model=MODEL, prompt="x", max_tokens=6, temperature=1.0, n=2, seed=7)
    b = client.completions.create(model=MODEL, prompt="x", max_tokens=6, temperature=1.0, n=2, seed=7)
    assert len(a.choices) == 2 and [c.text for c in a.choices] == [c.text for c in b.choices]


def test_echo_logprobs_for_loglikelihood(served):
    """What lm-evaluation-harness's local-completions sends for a loglikelihood request, checked against the model."""
    tok = served["tok"]
    ids = tok.encode("What is 12+30? 42", add_bos=True)
    r = _post(served, "/v1/completions", {"model": MODEL, "prompt": [ids], "max_tokens": 1, "temperature": 0,
                                          "logprobs": 1, "echo": True, "seed": 1234})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"] == sorted(lp["text_offset"])
    model = load_model(served["model_dir"]).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].float().log_softmax(-1)
    want = [float(ref[t - 1, ids[t]]) for t in range(1, len(ids))]
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx(want, abs=1e-4)
    greedy = int(ref[-1].argmax())  # the one generated token is greedy, so it tops its own top_logprobs
    assert lp["token_logprobs"][-1] == pytest.approx(float(ref[-1, greedy]), abs=1e-4)
    for tok_lp, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert len(top) == 1 and max(top.values()) >= tok_lp - 1e-6
    ctxlen = 3  # lm-eval: sum of token_logprobs[ctxlen:-1] is the continuation's log-likelihood
    assert sum(lp["token_logprobs"][ctxlen:-1]) == pytest.approx(sum(want[ctxlen - 1:]), abs=1e-3)
    only = _post(served, "/v1/completions", {"prompt": ids, "max_tokens": 0, "logprobs": 0, "echo": True}).json()
    assert only["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)


def test_chat_logprobs(served, client):
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_reasoning_splitter_holds_split_tags():
    s = ReasoningSplitter()
    parts = [s.feed(p) for p in ["<th", "ink>Let me", " add.</thi", "nk><answer>42", "</answer>"]]
    parts.append(s.feed("", final=True))
    assert "".join(p[0] for p in parts) == "Let me add." and "".join(p[1] for p in parts) == "42"
    assert split_reasoning("<think>Let me add.</think><answer>42</answer>") == ("Let me add.", "42")


# ---------------------------------------------------------------------------------------------- bad inputs
CHAT = "/v1/chat/completions"
BAD = [
    ("malformed json", CHAT, '{"messages": [', 400, None),
    ("messages not a list", CHAT, {"messages": 5}, 400, "messages"),
    ("max_tokens a string", CHAT, {"messages": HI, "max_tokens": "many"}, 400, "max_tokens"),
    ("temperature a string", CHAT, {"messages": HI, "temperature": "hot"}, 400, "temperature"),
    ("prompt a dict", "/v1/completions", {"prompt": {"a": 1}}, 400, "prompt"),
    ("negative max_tokens", CHAT, {"messages": HI, "max_tokens": -5}, 400, "max_tokens"),
    ("zero max_tokens", CHAT, {"messages": HI, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens over the limit", CHAT, {"messages": HI, "max_tokens": 100000}, 400, "max_tokens"),
    ("top_p 2", CHAT, {"messages": HI, "top_p": 2}, 400, None),
    ("negative temperature", CHAT, {"messages": HI, "temperature": -1}, 400, None),
    ("min thinking over budget", CHAT, {"messages": HI, "thinking_budget": 2, "min_thinking_tokens": 5}, 400, None),
    ("unknown role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0]"),
    ("empty messages", CHAT, {"messages": []}, 400, "messages"),
    ("token id out of vocab", "/v1/completions", {"prompt": [0, 10 ** 9]}, 400, "prompt"),
    ("n zero", CHAT, {"messages": HI, "n": 0}, 400, "n"),
    ("unknown model", CHAT, {"model": "gpt-9", "messages": HI}, 404, "model"),
    ("over-long prompt", CHAT, {"messages": [{"role": "user", "content": "1 " * 200}]}, 400, "prompt"),
    ("oversized body", CHAT, {"messages": [{"role": "user", "content": "x" * 40_000}]}, 413, None),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_get_openai_errors(served, name, path, body, status, param):
    r = _post(served, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text
    if param is not None:
        assert err["param"] == param
    if name == "over-long prompt":
        assert err["code"] == "context_length_exceeded"


def test_api_key(served, client):
    for key in (None, "wrong"):
        r = _post(served, CHAT, {"messages": HI}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(served["base"] + "/v1/models").status_code == 401
    bad = openai.OpenAI(base_url=served["base"] + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=HI)


def _open_stream(http: httpx.Client, served, max_tokens=128):
    body = {"messages": HI, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    req = http.build_request("POST", served["base"] + CHAT, json=body, headers={"Authorization": f"Bearer {KEY}"})
    resp = http.send(req, stream=True)
    assert resp.status_code == 200
    return resp


def test_disconnect_mid_stream_frees_slot(served):
    served_before = _wait_idle(served)["requests_served"]
    with httpx.Client(timeout=30) as http:
        resp = _open_stream(http, served)
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(4)]  # a few chunks of a 128-token answer
        assert got[0].startswith("data: ")
        assert _metrics(served)["requests_in_flight"] == 1
        resp.close()  # the client goes away mid-stream
    m = _wait_idle(served)
    assert m["requests_served"] == served_before  # aborted, not run to the end
    assert len(served["app"].state.server.engine.free_slots) == 2


def test_full_queue_answers_429(served):
    _wait_idle(served)
    with httpx.Client(timeout=30) as http:
        streams = [_open_stream(http, served) for _ in range(3)]  # 2 running + 1 queued = the limit
        r = _post(served, CHAT, {"messages": HI, "max_tokens": 4})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        m = _metrics(served)
        assert m["requests_in_flight"] == 3 and m["queue_depth"] >= 1
        for s in streams:
            s.close()
    _wait_idle(served)
    assert _post(served, CHAT, {"messages": HI, "max_tokens": 2}).status_code == 200


def test_serve_command_bad_model(capsys, tmp_path):
    from nanoseek.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1


def test_serve_draft_tokens_reach_the_engine_and_a_bad_count_is_one_line(served, capsys):
    from nanoseek.cli import main

    modules = served["app"].state.server.engine.model.config.num_nextn_predict_layers
    app = create_app(served["model_dir"], max_batch=1, draft_tokens=modules)
    assert app.state.server.engine.draft_tokens == modules
    assert main(["serve", str(served["model_dir"]), "--draft-tokens", str(modules + 1)]) == 2
    err = capsys.readouterr().err.strip()
    assert "draft_tokens" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------------------------------------- the chat page
class Chromium:
    """Just enough of the Chrome DevTools protocol, spoken over --remote-debugging-pipe (fds 3 and 4): no driver,
    no websocket library, nothing downloaded."""

    def __init__(self, profile: Path):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        # move the child's ends above 9 so that bash's `3<&X 4>&Y` never overwrites one it still needs
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w)]
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        to_chrome_r, from_chrome_w = high
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1000,720", "--remote-debugging-pipe", "about:blank"]
        cmd = " ".join([CHROMIUM, *flags]) + f" 3<&{to_chrome_r} 4>&{from_chrome_w}"
        self.log = profile.parent / "chromium.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(["bash", "-c", "exec " + cmd], pass_fds=(to_chrome_r, from_chrome_w),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf, self._id, self.session = b"", 0, None

    def send(self, method: str, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:  # skip events until our answer arrives
            while b"\0" not in self._buf:
                data = os.read(self._r, 1 << 16)
                assert data, f"chromium closed the pipe; its log:\n{self.log.read_text()[-3000:]}"
                self._buf += data
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                assert "error" not in reply, reply
                return reply.get("result", {})

    def js(self, expression: str):
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.time() + timeout
        while not (value := self.js(expression)):
            assert time.time() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.05)
        return value

    def type_into(self, element_id: str, text: str) -> None:
        self.js(f"document.getElementById({element_id!r}).focus()")
        self.send("Input.insertText", text=text)

    def click(self, element_id: str) -> None:
        box = self.js(f"(() => {{ const r = document.getElementById({element_id!r}).getBoundingClientRect(); "
                      f"return [r.x + r.width / 2, r.y + r.height / 2]; }})()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._w)
        os.close(self._r)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing: apt-get install chromium")
def test_chat_page_in_headless_chromium(served, client, tmp_path):
    browser = Chromium(tmp_path / "profile")
    try:
        target = browser.send("Target.createTarget", url="about:blank")["targetId"]
        browser.session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        browser.send("Page.navigate", url=served["base"] + "/")
        browser.wait_for("document.readyState === 'complete' && document.getElementById('prompt') !== null")
        assert "nanoseek" in browser.js("document.title")
        browser.type_into("key", KEY)  # the page starts without the key, like a user's first visit
        browser.type_into("prompt", "")  # blurring the key field commits it
        browser.wait_for("document.getElementById('model').textContent.startsWith('model: ')")
        browser.js("document.getElementById('temp').value = '0'; document.getElementById('maxtok').value = '24'")
        browser.type_into("budget", "6")
        browser.type_into("prompt", "What is 12+30?")
        browser.click("send")
        browser.wait_for("document.querySelector('.msg.user') !== null")
        meta = browser.wait_for("(document.querySelector('.msg.assistant .meta') || {}).textContent")
        answer = browser.js("document.querySelector('.msg.assistant .answer').textContent")
        thinking = browser.js("document.querySelector('.msg.assistant .think').textContent")
        png = base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"])
    finally:
        browser.close()
    (tmp_path / "chat-page.png").write_bytes(png)
    if os.environ.get("NANOSEEK_UPDATE_DOCS"):  # refresh the README's screenshot on request, never by default
        shutil.copy(tmp_path / "chat-page.png", REPO / "docs" / "chat-page.png")
    assert png.startswith(b"\x89PNG")
    assert "completion tokens" in meta and "$" in meta
    # the page streamed what the API answers for the same conversation
    ref = client.chat.completions.create(model=MODEL, messages=HI + [{"role": "assistant", "content": "<think>"}],
                                         max_tokens=24, temperature=0,
                                         extra_body={"thinking_budget": 6, "continue_final_message": True})
    assert thinking and thinking.strip() == ref.choices[0].message.reasoning_content
    assert answer.strip() == ref.choices[0].message.content
    assert "(6 thinking)" in meta
