"""API clients (dat.api, API judges, API partner) against small scripted servers on loopback.

The servers are stdlib ``http.server`` instances in a thread; each test stops its own.
Tests against a real ``dat serve`` process are in test_serve.py.
"""

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("httpx")

from dat.api import (
    APIClient,
    APIConnectionError,
    APIError,
    APITimeoutError,
    BudgetExceededError,
    parse_api_spec,
)
from dat.errors import DatError

VALID_SCORES = {
    "agent_1": {"goal": 7, "believability": 8, "knowledge": 4, "secret": 0, "relationship": 2,
                "social_rules": 0, "financial_and_material_benefits": 1},
    "agent_2": {"goal": 3, "believability": 6, "knowledge": 2, "secret": -2, "relationship": -1,
                "social_rules": -3, "financial_and_material_benefits": 0},
}


def chat_body(content: str, logprobs=None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop",
              "logprobs": None if logprobs is None else {"content": logprobs}}
    return {"id": "x", "object": "chat.completion", "choices": [choice],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


class FakeServer:
    """Answers each request with ``script(n, body) -> (status, headers, body_or_bytes, delay)``."""

    def __init__(self, script):
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else {}
                with lock:
                    n = len(fake.requests)
                    fake.requests.append(body)
                    fake.headers.append(dict(self.headers))
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    status, headers, payload, delay = script(n, body)
                    time.sleep(delay)
                    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                    self.send_response(status)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with lock:
                        fake.in_flight -= 1

            do_POST = do_GET = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def fake_server():
    started = []

    def start(script):
        srv = FakeServer(script)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


def client_for(srv, **kw) -> APIClient:
    kw.setdefault("backoff", 0.01)
    kw.setdefault("max_backoff", 0.05)
    return APIClient(parse_api_spec(f"api:{srv.url}#judge-model", **kw))


# ---------------------------------------------------------------------- specs and keys
def test_parse_api_spec():
    c = parse_api_spec("api:https://example.org/v1/?key_env=MY_KEY&budget=7&retries=1&api-version=2#gpt-x")
    assert (c.base_url, c.model, c.api_key_env, c.max_requests, c.max_retries) == \
        ("https://example.org/v1", "gpt-x", "MY_KEY", 7, 1)
    assert c.query == {"api-version": "2"}
    for bad in ("api:http://x/v1", "api:ftp://x/v1#m", "api:http://x/v1?timeout=soon#m", "api:#m"):
        with pytest.raises(DatError):
            parse_api_spec(bad)


def test_key_comes_from_the_named_variable_and_is_never_shown(fake_server, monkeypatch, caplog):
    secret = "sk-very-secret-123"
    srv = fake_server(lambda n, body: (500, None, {"error": {"message": "boom"}}, 0))
    with pytest.raises(DatError, match="MY_JUDGE_KEY"):
        client_for(srv, api_key_env="MY_JUDGE_KEY")  # named but not set
    monkeypatch.setenv("MY_JUDGE_KEY", secret)
    client = client_for(srv, api_key_env="MY_JUDGE_KEY", max_retries=1)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(APIError) as info:
        client.chat([{"role": "user", "content": "hi"}])
    assert srv.headers[0]["Authorization"] == f"Bearer {secret}"
    assert secret not in str(info.value) and secret not in repr(client) and secret not in caplog.text
    assert "boom" in str(info.value) and "gave up after 2 attempts" in str(info.value)
    client.close()


# ---------------------------------------------------------------------- retries and faults
def test_retries_on_429_and_5xx_then_succeeds(fake_server):
    answers = [(429, {"Retry-After": "0"}, {"error": {"message": "slow down"}}, 0),
               (503, None, b"<html>unavailable</html>", 0),
               (200, None, chat_body("hello"), 0)]
    srv = fake_server(lambda n, body: answers[n])
    client = client_for(srv)
    r = client.chat([{"role": "user", "content": "hi"}], max_tokens=5, seed=1)
    assert r.text == "hello" and client.stats["retries"] == 2 and client.stats["requests"] == 3
    assert srv.requests[-1]["max_tokens"] == 5 and srv.requests[-1]["model"] == "judge-model"
    client.close()


def test_client_errors_are_not_retried(fake_server):
    srv = fake_server(lambda n, body: (400, None, {"error": {"message": "bad field 'x'"}}, 0))
    client = client_for(srv)
    with pytest.raises(APIError, match="bad field") as info:
        client.chat([{"role": "user", "content": "hi"}])
    assert info.value.status == 400 and len(srv.requests) == 1
    client.close()


def test_slow_server_times_out(fake_server):
    srv = fake_server(lambda n, body: (200, None, chat_body("late"), 3.0))
    client = client_for(srv, timeout=0.4, max_retries=1)
    t0 = time.monotonic()
    with pytest.raises(APITimeoutError, match="gave up after 2 attempts"):
        client.chat([{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < 2.5
    client.close()


def test_unreachable_server_fails_after_bounded_retries():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = APIClient(parse_api_spec(f"api:http://127.0.0.1:{port}/v1#m", max_retries=2, backoff=0.01))
    t0 = time.monotonic()
    with pytest.raises(APIConnectionError, match="gave up after 3 attempts"):
        client.chat([{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < 5 and client.stats["requests"] == 3
    client.close()


def test_invalid_json_answer_is_retried_then_reported(fake_server):
    srv = fake_server(lambda n, body: (200, None, b"{truncated", 0))
    client = client_for(srv, max_retries=2)
    with pytest.raises(APIError, match="not a JSON object"):
        client.chat([{"role": "user", "content": "hi"}])
    assert len(srv.requests) == 3
    client.close()


def test_request_budget(fake_server):
    srv = fake_server(lambda n, body: (503, None, {"error": {"message": "down"}}, 0))
    client = client_for(srv, max_requests=2, max_retries=5)
    with pytest.raises(BudgetExceededError, match="budget of 2"):
        client.chat([{"role": "user", "content": "hi"}])
    assert len(srv.requests) == 2
    with pytest.raises(BudgetExceededError):
        client.chat([{"role": "user", "content": "again"}])
    assert len(srv.requests) == 2
    client.close()


def test_concurrency_is_bounded_and_order_kept(fake_server):
    srv = fake_server(lambda n, body: (200, None, chat_body(body["messages"][0]["content"].upper()), 0.15))
    client = client_for(srv, max_concurrency=3)
    batch = [[{"role": "user", "content": f"m{i}"}] for i in range(10)]
    out = client.chat_many(batch)
    assert [r.text for r in out] == [f"M{i}" for i in range(10)]
    assert 1 < srv.max_in_flight <= 3
    client.close()


# ---------------------------------------------------------------------- judges and partner
def sotopia_request():
    from dat.judges.llm import SotopiaAgent, SotopiaRequest

    a = SotopiaAgent("Ana", "A student.", "Borrow a book.")
    b = SotopiaAgent("Ben", "A librarian.", "Keep the rare books safe.", secret="He lost one.")
    return SotopiaRequest("A library at closing time.", (a, b), [(0, "Hi!"), (1, "We are closing.")], 0)


def test_api_sotopia_judge_parses_valid_json(fake_server):
    from dat import judges
    from dat.judges.api import APISotopiaJudge

    text = "Here you go:\n```json\n" + json.dumps(VALID_SCORES) + "\n```"
    srv = fake_server(lambda n, body: (200, None, chat_body(text), 0))
    judge = judges.make(f"api:{srv.url}#judge-model", kind="sotopia", backoff=0.01)
    assert isinstance(judge, APISotopiaJudge)
    [reward] = judge.score([sotopia_request()])
    assert not reward.failed
    assert reward.value == pytest.approx(sum(VALID_SCORES["agent_1"].values()) / 7)
    assert reward.details["agent_2"]["social_rules"] == -3
    assert srv.requests[0]["temperature"] == 0 and srv.requests[0]["messages"][0]["role"] == "system"
    judge.close()


def test_api_sotopia_judge_malformed_json_retries_then_fails(fake_server):
    from dat.judges.api import APISotopiaJudge

    bad = [json.dumps({"agent_1": {"goal": 11}}), "{not json", "I think agent 1 did well."]
    srv = fake_server(lambda n, body: (200, None, chat_body(bad[n % 3]), 0))
    judge = APISotopiaJudge(client_for(srv), retries=2)
    [reward] = judge.score([sotopia_request()])
    assert reward.failed and reward.value is None and reward.details["judge_failed"]
    assert reward.details["attempts"] == 3 and len(srv.requests) == 3
    assert [r["temperature"] for r in srv.requests] == [0, 0.7, 0.7]  # retries sample
    assert len(reward.details["errors"]) == 3 and reward.details["raws"] == bad
    judge.close()


def test_api_sotopia_judge_survives_a_dead_request(fake_server):
    from dat.judges.api import APISotopiaJudge

    def script(n, body):
        return (500, None, {"error": {"message": "overloaded"}}, 0) if n == 0 else \
            (200, None, chat_body(json.dumps(VALID_SCORES)), 0)

    srv = fake_server(script)
    judge = APISotopiaJudge(client_for(srv, max_retries=0), retries=1)
    [reward] = judge.score([sotopia_request()])
    assert not reward.failed and "overloaded" in reward.details["api_errors"][0]
    judge.close()


def test_api_yes_no_judge_from_first_token_logprobs(fake_server):
    from dat.judges import YesNoRequest, sigmoid
    from dat.judges.api import APIYesNoJudge

    def script(n, body):
        assert body["logprobs"] is True and body["max_tokens"] == 1
        if "cake" in body["messages"][0]["content"]:
            top = [{"token": "Yes", "logprob": -0.2}, {"token": " No", "logprob": -2.0},
                   {"token": "no", "logprob": -3.0}]
        elif "weather" in body["messages"][0]["content"]:
            top = [{"token": "The", "logprob": -0.1}, {"token": "No", "logprob": -4.0}]
        else:
            top = [{"token": "Sure", "logprob": -0.1}, {"token": "I", "logprob": -1.0}]
        return 200, None, chat_body(top[0]["token"], [{**top[0], "top_logprobs": top}]), 0

    srv = fake_server(script)
    judge = APIYesNoJudge(client_for(srv), top_logprobs=5)
    yes, bounded, neither = judge.score([YesNoRequest("bake a cake", "Here is the cake recipe."),
                                         YesNoRequest("talk about the weather", "It rains."),
                                         YesNoRequest("x", "y")])
    import math

    no = math.log(math.exp(-2.0) + math.exp(-3.0))
    assert yes.value == pytest.approx(sigmoid((-0.2 - no) / 10)) and yes.success
    assert bounded.details["bounded"] == "yes" and not bounded.success  # Yes <= -4.0 = the floor
    assert bounded.value == pytest.approx(0.5)
    assert neither.failed and neither.value is None and neither.details["judge_failed"]
    judge.close()


def test_api_partner_sends_one_batch_with_shared_settings(fake_server):
    from dat.partners import APIPartner, make_partner

    srv = fake_server(lambda n, body: (200, None, chat_body("  reply to " + body["messages"][-1]["content"]), 0))
    partner = make_partner(f"api:{srv.url}#partner-model")
    assert isinstance(partner, APIPartner)
    dialogues = [[{"role": "system", "content": "s"}, {"role": "user", "content": f"u{i}"}] for i in range(3)]
    assert partner.reply(dialogues, max_new_tokens=9, temperature=0.7, seed=4) == \
        ["reply to u0", "reply to u1", "reply to u2"]
    assert {(r["max_tokens"], r["temperature"], r["seed"]) for r in srv.requests} == {(9, 0.7, 4)}
    with pytest.raises(DatError, match="judge spec"):
        make_partner("embed:default")
    partner.close()


def test_local_partner_reuses_a_loaded_model(default_lm, dialogues):
    from dat.partners import LocalPartner, make_partner

    partner = make_partner("hf:default", lm=default_lm)
    assert isinstance(partner, LocalPartner) and partner.lm is default_lm
    out = partner.reply(dialogues[1:2], max_new_tokens=4, temperature=0.0)
    assert len(out) == 1 and isinstance(out[0], str) and out[0]
    g = partner.generate_detailed(dialogues[1:2], max_new_tokens=4, temperature=0.0)
    assert g.texts == out and g.num_generated >= 1  # what rollouts use to count tokens
    with pytest.raises(DatError, match="never steered"):
        partner.generate_detailed(dialogues[1:2], actions=object())
