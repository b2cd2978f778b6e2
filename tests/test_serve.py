"""`dat serve` end to end: a real server process with the default model on 127.0.0.1.

One steered server (planner + API key) serves most tests, as ``dat`` (steered) and
``dat-plain`` (unsteered); a second, plain one is killed mid-request. Every test stops what
it started (fixtures terminate their processes).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.slow

KEY_ENV = "DAT_TEST_SERVE_KEY"
KEY = "test-key-" + os.urandom(6).hex()
HI = [{"role": "user", "content": "Say hi to me."}]
COLOR = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


# ---------------------------------------------------------------------- launching
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_cmd(options: dict) -> list[str]:
    """The `dat serve` command line."""
    flags = []
    for k, v in options.items():
        if v is not None:
            flags += [f"--{k.replace('_', '-')}", str(v)]
    return [sys.executable, "-m", "dat.cli", "serve", *flags]


class ServerProcess:
    """`dat serve` in a child process, its output in a temporary log file."""

    def __init__(self, options: dict, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        fd, name = tempfile.mkstemp(prefix="dat-serve-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        with self.log_path.open("w") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(serve_cmd({**options, "port": self.port, "log_level": "info"}),
                                         stdout=log, stderr=subprocess.STDOUT, env=full_env)

    def wait_ready(self, timeout: float = 240) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dat serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"dat serve did not become ready in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text()[-4000:] if self.log_path.exists() else ""

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log_path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def agent_dir(default_lm, tmp_path_factory):
    from dat.agent import Agent
    from dat.planner import Planner, UpMapping

    up = UpMapping.from_embedding_pca(default_lm, 64, 2)
    planner = Planner.for_model(default_lm)
    return str(Agent(up, planner).save(tmp_path_factory.mktemp("agent")).resolve())


@pytest.fixture(scope="module")
def server(agent_dir):
    srv = ServerProcess({"model": "default", "planner": agent_dir, "api_key_env": KEY_ENV,
                         "max_batch": 8, "max_wait_ms": 400}, env={KEY_ENV: KEY})
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def post(server, body, key=KEY, timeout=120):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=timeout)


def complete(server, messages, model="dat", **kw) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": 8, "temperature": 0, **kw}
    r = post(server, body)
    assert r.status_code == 200, r.text
    return r.json()


def text_of(resp: dict) -> str:
    return resp["choices"][0]["message"]["content"]


# ---------------------------------------------------------------------- basics
def test_health_models_and_openai_client(server, agent_dir):
    openai = pytest.importorskip("openai")
    health = server.health()  # open without a key
    assert health["status"] == "ok" and health["planner"] == agent_dir

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    ids = [m.id for m in client.models.list().data]
    assert ids == ["dat", "dat-plain"]

    resp = client.chat.completions.create(model="dat", messages=HI, max_tokens=8, temperature=0)
    text = resp.choices[0].message.content
    assert text and resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 8 and resp.usage.prompt_tokens > 5
    extra = resp.model_extra["dat"]
    assert extra["steered"] is True and extra["planner"] == agent_dir and extra["action_tokens"] == 2

    stream = client.chat.completions.create(model="dat", messages=HI, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == text  # greedy: the stream says what the plain answer said
    assert finish == resp.choices[0].finish_reason
    assert usage.completion_tokens == resp.usage.completion_tokens


def test_concurrent_requests_share_one_batch_and_match_solo(server):
    prompts = [HI, COLOR]
    together: list = [None, None]
    clients = [httpx.Client(timeout=180, headers={"Authorization": f"Bearer {KEY}"}) for _ in prompts]
    go = threading.Barrier(len(prompts))

    def send(i):  # both requests leave together, well inside the server's 400 ms window
        body = {"model": "dat-plain", "messages": prompts[i], "max_tokens": 8, "temperature": 0}
        go.wait()
        together[i] = clients[i].post(server.url + "/v1/chat/completions", json=body).json()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for c in clients:
        c.close()
    assert [r["dat"]["batch_size"] for r in together] == [2, 2]
    alone = [complete(server, p, model="dat-plain") for p in prompts]
    assert [r["dat"]["batch_size"] for r in alone] == [1, 1]
    assert [text_of(r) for r in alone] == [text_of(r) for r in together]


def test_steered_reply_differs_from_plain(server, agent_dir):
    steered = complete(server, HI, model="dat", max_tokens=12)
    plain = complete(server, HI, model="dat-plain", max_tokens=12)
    assert steered["dat"]["steered"] and steered["dat"]["planner"] == agent_dir
    assert not plain["dat"]["steered"] and plain["dat"]["planner"] is None
    assert text_of(steered) != text_of(plain)


def test_logprobs_and_stop_strings(server):
    r = complete(server, HI, model="dat-plain", max_tokens=10, logprobs=True, top_logprobs=3)
    content = r["choices"][0]["logprobs"]["content"]
    text = text_of(r)
    raw = b"".join(bytes(t["bytes"]) for t in content)  # real bytes, even inside an emoji
    assert raw.decode("utf-8", "replace") == text
    for t in content:  # greedy: the chosen token is the most likely one
        assert t["logprob"] <= 0 and len(t["top_logprobs"]) == 3
        assert t["top_logprobs"][0]["token"] == t["token"]
        assert t["top_logprobs"][0]["logprob"] == pytest.approx(t["logprob"])

    text = text_of(complete(server, COLOR, model="dat-plain", max_tokens=10))
    stop = text[len(text) // 2:len(text) // 2 + 3]
    expected = text[:text.find(stop)]
    cut = complete(server, COLOR, model="dat-plain", max_tokens=10, stop=[stop])
    assert text_of(cut) == expected and cut["choices"][0]["finish_reason"] == "stop"

    body = {"model": "dat-plain", "messages": COLOR, "max_tokens": 10, "temperature": 0, "stop": stop,
            "stream": True}
    streamed = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    streamed.append(choice["delta"].get("content") or "")
    assert "".join(streamed) == expected  # text of a stop string is never streamed


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"model": "dat"}, "messages"),
    ({"model": "dat", "messages": []}, "messages"),
    ({"model": "dat", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": "dat", "messages": HI, "n": 2}, "n"),
    ({"model": "dat", "messages": HI, "temperature": -1}, "temperature"),
    ({"model": "dat", "messages": HI, "max_tokens": 0}, "max_tokens"),
    ({"model": "dat", "messages": HI, "top_logprobs": 2}, "top_logprobs"),
    ({"model": "dat", "messages": HI, "tools": [{"type": "function"}]}, "tools"),
])
def test_invalid_requests_get_400(server, body, param):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/chat/completions", content=content, headers=headers, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param


def test_seed_out_of_range_gets_400(server):
    # torch seeds take 64 bits: 2**100 used to pass validation and fail in the worker (500)
    for seed in (2**100, -1, True):
        r = post(server, {"model": "dat-plain", "messages": HI, "max_tokens": 2, "temperature": 1,
                          "seed": seed})
        assert r.status_code == 400, (seed, r.text)
        assert r.json()["error"]["param"] == "seed"
    r = post(server, {"model": "dat-plain", "messages": HI, "max_tokens": 2, "temperature": 1,
                      "seed": 2**63 - 1})
    assert r.status_code == 200, r.text


def test_boolean_max_tokens_gets_400(server):
    # pydantic reads JSON true as 1; a boolean is not a token count
    for field in ("max_tokens", "max_completion_tokens"):
        r = post(server, {"model": "dat-plain", "messages": HI, field: True})
        assert r.status_code == 400, (field, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == field


class InProcessServer:
    """`create_app` under uvicorn in a thread, on loopback: for settings the CLI does not take."""

    def __init__(self, engine, config):
        import uvicorn

        from dat.serve import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(engine, config), host="127.0.0.1",
                                                    port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)


def test_body_over_limit_gets_413(default_lm):
    from dat.serve import ServeConfig
    from dat.serve_engine import Engine

    with InProcessServer(Engine(default_lm), ServeConfig(max_body_bytes=4096)) as srv:
        url = srv.url + "/v1/chat/completions"
        big = json.dumps({"model": "dat", "messages": [{"role": "user", "content": "word " * 2000}],
                          "max_tokens": 2}).encode()
        assert len(big) > 4096
        headers = {"Content-Type": "application/json"}
        chunks = [big[:3000], big[3000:]]
        for content in (big, iter(chunks)):  # with Content-Length, then chunked (no length)
            r = httpx.post(url, content=content, headers=headers, timeout=30)
            assert r.status_code == 413, r.text
            err = r.json()["error"]
            assert err["code"] == "request_too_large" and "4096" in err["message"]
            assert err["type"] == "invalid_request_error"
        small = {"model": "dat", "messages": HI, "max_tokens": 2, "temperature": 0}
        r = httpx.post(url, json=small, timeout=60)  # under the limit: served as usual
        assert r.status_code == 200, r.text
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 200


def test_health_answers_while_a_big_prompt_is_tokenised(server):
    # ~3 MB of prompt (under the default 4 MiB limit) takes seconds to template and tokenise;
    # that used to run on the event loop and stall every client, /health included.
    body = {"model": "dat", "messages": [{"role": "user", "content": "word " * 600_000}], "max_tokens": 4}
    outcome = {}

    def send():
        t0 = time.monotonic()
        outcome["status"] = post(server, body).status_code
        outcome["seconds"] = time.monotonic() - t0

    big = threading.Thread(target=send)
    latencies = []
    with httpx.Client(timeout=30) as client:
        assert client.get(server.url + "/health").status_code == 200
        big.start()
        while big.is_alive():
            t0 = time.monotonic()
            assert client.get(server.url + "/health").status_code == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.05)
    big.join()
    assert outcome["status"] == 400  # over the model's context: refused after tokenising
    assert outcome["seconds"] > 1.0, "the prompt was tokenised too fast for this test to mean much"
    assert len(latencies) >= 5 and max(latencies) < 0.5 * outcome["seconds"], (latencies, outcome)


def test_context_limit_and_unknown_model(server):
    long = [{"role": "user", "content": "word " * 9000}]
    r = post(server, {"model": "dat", "messages": long, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "8192" in r.json()["error"]["message"]
    r = post(server, {"model": "dat", "messages": HI, "max_tokens": 9000})
    assert r.status_code == 400 and "8192" in r.json()["error"]["message"]
    r = post(server, {"model": "gpt-4", "messages": HI})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_api_key_is_required(server):
    openai = pytest.importorskip("openai")
    body = {"model": "dat", "messages": HI, "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="dat", messages=HI, max_tokens=2)
    assert KEY not in server.output()  # never logged


def test_disconnected_stream_frees_its_row(server):
    before = server.health()["cancelled"]
    body = {"model": "dat-plain", "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as resp:
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(4)]  # role chunk, blank, first token, blank
        assert got[0].startswith("data: ")
    deadline = time.monotonic() + 30
    while server.health()["cancelled"] <= before:
        assert time.monotonic() < deadline, "the abandoned stream kept decoding"
        time.sleep(0.2)
    t0 = time.monotonic()
    assert text_of(complete(server, HI, model="dat-plain", max_tokens=2))
    assert time.monotonic() - t0 < 30


def test_short_request_joins_a_running_stream_and_finishes_first(server):
    # continuous batching over HTTP: the short request joins the long stream's running batch
    assert server.health()["batching"] == "continuous"
    before = server.health()["joined_running"]
    body = {"model": "dat-plain", "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": 80, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    done = {}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ") and next(lines) == ""  # role chunk
        next(lines)  # first token: the long reply is decoding

        def short():
            done["short"] = complete(server, COLOR, model="dat-plain", max_tokens=3)
            done["short_at"] = time.monotonic()

        thread = threading.Thread(target=short)
        thread.start()
        chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]
        done["long_at"] = time.monotonic()
        thread.join(60)
    assert done["short_at"] < done["long_at"]
    assert done["short"]["dat"]["batch_size"] == 2
    final = next(c for c in chunks if "dat" in c)
    usage = next(c for c in chunks if c.get("usage"))["usage"]
    assert final["dat"]["batch_size"] == 2 and usage["completion_tokens"] > 40
    assert server.health()["joined_running"] == before + 1


# ---------------------------------------------------------------------- clients
def test_partner_and_yes_no_judge_against_server(server, monkeypatch):
    from dat.envs.base import Reward
    from dat.partners import APIPartner, make_partner

    monkeypatch.setenv(KEY_ENV, KEY)
    spec = f"api:{server.url}/v1?key_env={KEY_ENV}#dat-plain"
    partner = make_partner(spec)
    assert isinstance(partner, APIPartner)
    replies = partner.reply([HI, COLOR], max_new_tokens=8, temperature=0, seed=0)
    assert replies == [text_of(complete(server, m, model="dat-plain")).strip() for m in (HI, COLOR)]
    partner.close()

    from dat.judges.api import APIYesNoJudge

    judge = APIYesNoJudge.from_spec(spec)
    rewards = judge.score_prompts(["Is the sky blue? Answer Yes or No.", "Is fire cold? Answer Yes or No."])
    assert len(rewards) == 2 and all(isinstance(r, Reward) for r in rewards)
    for r in rewards:
        assert not r.failed and 0 < r.value < 1 and r.success == (r.value > 0.5)
    judge.close()


def test_server_killed_mid_request_fails_fast_and_clearly():
    from dat.api import APIClient, APIConnectionError

    srv = ServerProcess({"model": "default", "max_batch": 4, "max_wait_ms": 5})
    try:
        srv.wait_ready()
        client = APIClient.from_spec(f"api:{srv.url}/v1#dat", timeout=60, max_retries=2, backoff=0.2)
        outcome = {}

        def call():
            t0 = time.monotonic()
            try:
                client.chat([{"role": "user", "content": "Write a long story."}], max_tokens=400)
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                outcome["error"] = exc
            outcome["seconds"] = time.monotonic() - t0

        thread = threading.Thread(target=call)
        thread.start()
        deadline = time.monotonic() + 60
        while srv.health()["active"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        srv.proc.kill()
        thread.join(30)
        assert not thread.is_alive(), "the client hung after the server died"
        err = outcome["error"]
        assert isinstance(err, APIConnectionError)
        assert "gave up after 3 attempts" in str(err) and srv.url in str(err)
        assert client.stats["requests"] == 3 and client.stats["retries"] == 2
        client.close()
    finally:
        srv.stop()
