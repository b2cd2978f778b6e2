"""A small, careful client for OpenAI-compatible chat endpoints.

Works with OpenAI, vLLM, llama.cpp's server, ``dat serve`` and anything else that speaks
``POST {base_url}/chat/completions``. What it adds over a bare HTTP call:

* **timeouts**: a connect timeout and a *total* time limit per attempt (a server that
  trickles its answer byte by byte still times out);
* **retries** with exponential backoff and jitter on connection errors, timeouts, 408, 409,
  429 and 5xx (``Retry-After`` is honoured, capped by ``max_backoff``); other 4xx answers
  fail at once with the server's message;
* **bounded concurrency**: at most ``max_concurrency`` requests in flight per client,
  however many threads call it; ``chat_many`` fans a batch out over a thread pool;
* a **request budget**: at most ``max_requests`` HTTP attempts (retries included) over the
  client's lifetime, then :class:`BudgetExceededError`;
* the **API key** only from an environment variable the user names (``api_key_env``); it is
  sent as a bearer token and appears in no repr, log line or error message.

Endpoints are named by a spec ``api:URL#model``, e.g.
``api:http://127.0.0.1:8000/v1#dat`` or
``api:https://api.openai.com/v1?key_env=OPENAI_API_KEY&concurrency=4#gpt-4o-mini``.
Query keys ``key_env``, ``timeout``, ``retries``, ``concurrency`` and ``budget`` configure the
client; other query parameters are sent with every request (e.g. Azure's ``api-version``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from dat.errors import DatError

log = logging.getLogger("dat.api")

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
_SPEC_KEYS = {"key_env": "api_key_env", "timeout": "timeout", "retries": "max_retries",
              "concurrency": "max_concurrency", "budget": "max_requests"}


# ====================================================================== errors
class APIError(DatError):
    """A request to an OpenAI-compatible endpoint failed."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class APIConnectionError(APIError):
    """The server could not be reached, or dropped the connection."""


class APITimeoutError(APIError):
    """The server did not answer within the time limit."""


class BudgetExceededError(APIError):
    """The client's request budget (``max_requests``) is spent."""


# ====================================================================== settings
@dataclass
class APIConfig:
    """Where and how to call an OpenAI-compatible endpoint."""

    base_url: str
    model: str
    api_key_env: str | None = None  # name of the environment variable holding the key
    timeout: float = 120.0  # seconds per attempt, in total
    connect_timeout: float = 10.0
    max_retries: int = 4  # retries after the first attempt
    backoff: float = 0.5  # first retry delay; doubles each time (with jitter)
    max_backoff: float = 30.0
    max_concurrency: int = 8
    max_requests: int | None = None  # budget of HTTP attempts over the client's lifetime
    query: dict = field(default_factory=dict)  # extra URL query parameters

    def validate(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise DatError(f"API base URL must start with http:// or https://, got {self.base_url!r}.")
        if not self.model:
            raise DatError(f"No model name for {self.base_url}: use a spec like 'api:{self.base_url}#MODEL'.")
        if self.timeout <= 0 or self.connect_timeout <= 0:
            raise DatError("API timeouts must be > 0 seconds.")
        if self.max_retries < 0 or self.max_concurrency < 1:
            raise DatError("API max_retries must be >= 0 and max_concurrency >= 1.")
        if self.max_requests is not None and self.max_requests < 1:
            raise DatError("API max_requests (the request budget) must be >= 1 or None.")


def parse_api_spec(spec: str, **overrides) -> APIConfig:
    """``api:URL#model`` (the ``api:`` prefix is optional) -> :class:`APIConfig`."""
    text = spec.removeprefix("api:")
    url, sep, model = text.partition("#")
    if not sep or not model.strip():
        raise DatError(f"API spec {spec!r} names no model: expected 'api:URL#MODEL', "
                       "e.g. 'api:http://127.0.0.1:8000/v1#dat'.")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise DatError(f"API spec {spec!r}: {url!r} is not an http(s) URL.")
    kwargs, query = {}, {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in _SPEC_KEYS:
            name = _SPEC_KEYS[key]
            try:
                kwargs[name] = value if name == "api_key_env" else (
                    float(value) if name == "timeout" else int(value))
            except ValueError:
                raise DatError(f"API spec {spec!r}: {key}={value!r} is not a number.") from None
        else:
            query[key] = value
    base = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    config = APIConfig(base_url=base, model=model.strip(), query=query, **kwargs)
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    config.validate()
    return config


# ====================================================================== results
@dataclass
class ChatResult:
    """One chat completion."""

    text: str
    finish_reason: str | None
    logprobs: list[dict] | None  # OpenAI format: [{"token", "logprob", "top_logprobs": [...]}]
    usage: dict
    raw: dict  # the whole response body

    def first_token_logprobs(self) -> dict[str, float]:
        """``{token: logprob}`` of the first generated position (chosen + alternatives)."""
        if not self.logprobs:
            return {}
        first = self.logprobs[0]
        out = {t["token"]: float(t["logprob"]) for t in first.get("top_logprobs") or []}
        out.setdefault(first["token"], float(first["logprob"]))
        return out


# ====================================================================== client
class APIClient:
    """Thread-safe client for ``{base_url}/chat/completions``.

    >>> client = APIClient.from_spec("api:http://127.0.0.1:8000/v1#dat")
    >>> client.chat([{"role": "user", "content": "Hi"}], max_tokens=16).text
    """

    def __init__(self, config: APIConfig, transport=None):
        import httpx

        config.validate()
        self.config = config
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env, "").strip()
            if not key:
                raise DatError(f"The API key variable {config.api_key_env!r} is not set or empty "
                               f"(needed for {config.base_url}). Export it, or drop key_env.")
            headers["Authorization"] = f"Bearer {key}"
        timeout = httpx.Timeout(config.timeout, connect=config.connect_timeout)
        self._http = httpx.Client(headers=headers, timeout=timeout, transport=transport,
                                  limits=httpx.Limits(max_connections=config.max_concurrency))
        self._slots = threading.BoundedSemaphore(config.max_concurrency)
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.stats = {"requests": 0, "retries": 0, "succeeded": 0, "failed": 0,
                      "prompt_tokens": 0, "completion_tokens": 0}

    @classmethod
    def from_spec(cls, spec: str, **overrides) -> APIClient:
        return cls(parse_api_spec(spec, **overrides))

    def __repr__(self) -> str:
        c = self.config
        key = f", key from ${c.api_key_env}" if c.api_key_env else ""
        return f"APIClient({c.base_url}#{c.model}{key})"

    @property
    def name(self) -> str:
        return f"api:{self.config.base_url}#{self.config.model}"

    # -------------------------------------------------------------- lifecycle
    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- requests
    def chat(self, messages: list[dict], *, max_tokens: int | None = None, temperature: float = 0.0,
             top_p: float | None = None, seed: int | None = None, stop: str | list[str] | None = None,
             logprobs: bool = False, top_logprobs: int | None = None, **extra) -> ChatResult:
        """One chat completion (``n=1``); extra keyword arguments go into the request body."""
        body = {"model": self.config.model, "messages": list(messages), "temperature": temperature}
        for k, v in (("max_tokens", max_tokens), ("top_p", top_p), ("seed", seed), ("stop", stop)):
            if v is not None:
                body[k] = v
        if logprobs or top_logprobs is not None:
            body["logprobs"] = True
            if top_logprobs is not None:
                body["top_logprobs"] = top_logprobs
        body.update(extra)
        data = self.post("/chat/completions", body)
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise APIError(f"{self._url('/chat/completions')} answered without choices[0].message: "
                           f"{_clip(json.dumps(data))}") from None
        usage = data.get("usage") or {}
        with self._lock:
            self.stats["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
            self.stats["completion_tokens"] += int(usage.get("completion_tokens") or 0)
        lps = (choice.get("logprobs") or {}).get("content")
        return ChatResult(text, choice.get("finish_reason"), lps, usage, data)

    def complete(self, prompt: str, *, max_tokens: int | None = None, temperature: float = 0.0,
                 seed: int | None = None, logprobs: int | None = None, **extra) -> ChatResult:
        """One plain-text completion (``POST /completions``), for prompts that must not go
        through a chat template. ``logprobs`` come back in the chat format."""
        body = {"model": self.config.model, "prompt": prompt, "temperature": temperature}
        for k, v in (("max_tokens", max_tokens), ("seed", seed), ("logprobs", logprobs)):
            if v is not None:
                body[k] = v
        body.update(extra)
        data = self.post("/completions", body)
        try:
            choice = data["choices"][0]
            text = choice.get("text") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise APIError(f"{self._url('/completions')} answered without choices[0].text: "
                           f"{_clip(json.dumps(data))}") from None
        lp = choice.get("logprobs") or {}
        content = None
        if lp.get("tokens"):
            tops = lp.get("top_logprobs") or [None] * len(lp["tokens"])
            content = [{"token": t, "logprob": v,
                        "top_logprobs": [{"token": k, "logprob": x} for k, x in (top or {}).items()]}
                       for t, v, top in zip(lp["tokens"], lp.get("token_logprobs") or [], tops)]
        return ChatResult(text, choice.get("finish_reason"), content, data.get("usage") or {}, data)

    def chat_many(self, batch: list[list[dict]], return_exceptions: bool = False, **params) -> list:
        """``chat`` over many dialogues concurrently (at most ``max_concurrency`` in flight).

        Results keep the input order. With ``return_exceptions`` a failed item holds its
        :class:`APIError` instead of raising the first failure.
        """
        return self._many(self.chat, batch, return_exceptions, params)

    def complete_many(self, prompts: list[str], return_exceptions: bool = False, **params) -> list:
        """``complete`` over many prompts concurrently (see :meth:`chat_many`)."""
        return self._many(self.complete, prompts, return_exceptions, params)

    def _many(self, fn, items: list, return_exceptions: bool, params: dict) -> list:
        if not items:
            return []
        if len(items) == 1:
            try:
                return [fn(items[0], **params)]
            except APIError as exc:
                if return_exceptions:
                    return [exc]
                raise
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.config.max_concurrency, thread_name_prefix="dat-api")
        futures = [self._pool.submit(fn, m, **params) for m in items]
        out = []
        for f in futures:
            try:
                out.append(f.result())
            except APIError as exc:
                if not return_exceptions:
                    for g in futures:
                        g.cancel()
                    raise
                out.append(exc)
        return out

    def models(self) -> list[str]:
        """Model ids the endpoint lists (``GET /models``)."""
        data = self.request("GET", "/models")
        return [m.get("id") for m in data.get("data", []) if isinstance(m, dict)]

    def post(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """Send with retries; return the decoded JSON body of a 2xx answer."""
        c = self.config
        url = self._url(path)
        last: APIError | None = None
        for attempt in range(c.max_retries + 1):
            self._spend()
            delay = None
            try:
                with self._slots:
                    status, headers, content = self._send(method, url, body)
            except APIError as exc:
                last = exc
            else:
                if 200 <= status < 300:
                    data = _json_object(content)
                    if data is None:
                        last = APIError(f"{method} {url}: a {status} answer that is not a JSON object: "
                                        f"{_clip(content)}", status, retryable=True)
                    else:
                        with self._lock:
                            self.stats["succeeded"] += 1
                        return data
                else:
                    retryable = status in RETRY_STATUS or status >= 500
                    last = APIError(f"{method} {url} answered {status}: {_server_message(content)}",
                                    status, retryable)
                    delay = _retry_after(headers)
            if not last.retryable or attempt == c.max_retries:
                break
            wait = min(c.max_backoff, c.backoff * 2 ** attempt) * (0.5 + random.random() / 2)
            if delay is not None:
                wait = min(c.max_backoff, max(wait, delay))
            with self._lock:
                self.stats["retries"] += 1
            log.warning("%s (attempt %d/%d); retrying in %.1fs", last, attempt + 1, c.max_retries + 1, wait)
            time.sleep(wait)
        with self._lock:
            self.stats["failed"] += 1
        tries = attempt + 1
        if last.retryable:
            msg = f"{last} — gave up after {tries} attempt{'s' * (tries > 1)}"
            raise type(last)(msg, last.status, retryable=False) from last
        raise last

    # -------------------------------------------------------------- internals
    def _url(self, path: str) -> str:
        url = self.config.base_url + path
        return url + ("?" + urlencode(self.config.query) if self.config.query else "")

    def _spend(self) -> None:
        with self._lock:
            budget = self.config.max_requests
            if budget is not None and self.stats["requests"] >= budget:
                raise BudgetExceededError(
                    f"The request budget of {budget} requests to {self.config.base_url} is spent "
                    "(raise max_requests / budget= to allow more).")
            self.stats["requests"] += 1

    def _send(self, method: str, url: str, body: dict | None) -> tuple[int, dict, bytes]:
        """One HTTP attempt with a total deadline; transport problems become APIErrors."""
        import httpx

        deadline = time.monotonic() + self.config.timeout
        try:
            with self._http.stream(method, url, json=body) as r:
                chunks = []
                for chunk in r.iter_bytes():
                    chunks.append(chunk)
                    if time.monotonic() > deadline:
                        raise httpx.ReadTimeout("total time limit exceeded")
                return r.status_code, dict(r.headers), b"".join(chunks)
        except httpx.TimeoutException as exc:
            raise APITimeoutError(f"{method} {url}: no complete answer within {self.config.timeout:g}s "
                                  f"({type(exc).__name__})", retryable=True) from None
        except httpx.TransportError as exc:
            raise APIConnectionError(f"{method} {url}: connection failed ({type(exc).__name__}: {exc})",
                                     retryable=True) from None


def _json_object(content: bytes) -> dict | None:
    try:
        data = json.loads(content)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _retry_after(headers: dict) -> float | None:
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _server_message(content: bytes) -> str:
    try:
        data = json.loads(content)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    except ValueError:
        pass
    return _clip(content)


def _clip(content, n: int = 300) -> str:
    text = content.decode("utf-8", "replace") if isinstance(content, bytes) else str(content)
    return text if len(text) <= n else text[:n] + "..."
