"""``dat serve``: an OpenAI-compatible HTTP server for a steered (or plain) frozen LM.

Endpoints: ``POST /v1/chat/completions`` (plain JSON or SSE with ``stream: true``),
``GET /v1/models``, ``GET /health``.

With a planner loaded, every reply of the model ``<name>`` is steered: the dialogue state
(final hidden state of the last prompt token) goes through the planner to an action, the
up-mapping turns it into action-token embeddings, and those are inserted at the planner's
position before generation. The same server also answers as ``<name>-plain`` (unsteered),
which makes A/B comparisons against one process easy. Each response carries an extra
``dat`` object saying which planner steered it and how many requests shared its batch.

Concurrency: request handlers only validate and tokenise (in a thread, off the event loop,
after refusing bodies over ``max_body_bytes``) and wait. One worker thread owns the
model. When free, it takes the queued requests and waits at most ``max_wait_ms`` for more,
up to ``max_batch``, groups them by what a single decoding
call must share (steered or not; greedy, or the same temperature/top-p/seed) and decodes
each group in one batched call. Rows leave the batch independently: a row that reaches its
end-of-turn token, a stop string or its own ``max_tokens`` is answered at once, and a
request whose client has gone away is dropped at the next decoding step. Streaming clients
read from their own unbounded queue, so a slow reader never blocks the worker.
"""

import asyncio
import hmac
import json
import logging
import os
import queue
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dat.errors import ContextLengthError, DatError
from dat.steer import position_name

log = logging.getLogger("dat.serve")

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_TOP_LOGPROBS = 20
MAX_STOP = 4
MAX_SEED = 2**63 - 1
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # 4 MiB: far more than any context window needs


# ====================================================================== settings
@dataclass
class ServeConfig:
    """Settings of ``dat serve`` (the CLI maps onto these one to one)."""

    model: str = "default"
    planner: str | None = None  # folder written by save_agent; None serves the plain model
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str | None = None  # name of the environment variable holding the key
    max_batch: int = 32
    max_wait_ms: float = 10.0
    served_model_name: str = "dat"
    default_max_tokens: int = 256  # when a request gives no max_tokens (capped by the context)
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    log_level: str = "info"
    backend: str = "hf"  # generation backend: hf | vllm (see dat.backends)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies are refused with a 413

    def validate(self) -> None:
        from dat.backends import check_backend

        check_backend(self.backend)
        if self.max_batch < 1:
            raise DatError(f"max_batch must be >= 1, got {self.max_batch}.")
        if self.max_wait_ms < 0:
            raise DatError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}.")
        if not 0 <= self.port <= 65535:
            raise DatError(f"port must be in 0..65535, got {self.port}.")
        if self.default_max_tokens < 1:
            raise DatError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}.")
        if self.threads is not None and self.threads < 1:
            raise DatError(f"threads must be >= 1, got {self.threads}.")
        if not self.served_model_name.strip():
            raise DatError("served_model_name must not be empty.")
        if self.max_body_bytes < 1:
            raise DatError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}.")


def read_api_key(env_var: str | None) -> str | None:
    """The key from the environment variable ``env_var`` (None when no variable is named)."""
    if not env_var:
        return None
    key = os.environ.get(env_var, "")
    if not key.strip():
        raise DatError(f"--api-key-env names the environment variable {env_var!r}, but it is not set "
                       "or empty. Export it first, e.g. `export {0}=$(openssl rand -hex 16)`.".format(env_var))
    return key.strip()


# ====================================================================== errors
class RequestError(Exception):
    """An invalid request; becomes an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int = 400, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# ====================================================================== requests
def _not_bool(value):
    """JSON ``true``/``false`` is not a number (pydantic would read it as 1/0)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")  # noqa: TRY004 - pydantic wants ValueError
    return value


def _request_model():
    """Pydantic schema of a chat completion request (built lazily: pydantic is an extra)."""
    from typing import Annotated

    from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

    Int = Annotated[int, BeforeValidator(_not_bool)]
    Float = Annotated[float, BeforeValidator(_not_bool)]

    class TextPart(BaseModel):
        model_config = ConfigDict(extra="allow")
        type: Literal["text"]
        text: str

    class Message(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: Literal["system", "developer", "user", "assistant"]
        content: str | list[TextPart] | None = None

    class ChatCompletionRequest(BaseModel):
        model_config = ConfigDict(extra="allow")
        model: str
        messages: list[Message] = Field(min_length=1)
        max_tokens: Int | None = Field(None, ge=1)
        max_completion_tokens: Int | None = Field(None, ge=1)
        temperature: Float | None = Field(None, ge=0, le=2)
        top_p: Float | None = Field(None, gt=0, le=1)
        seed: Int | None = Field(None, ge=0, le=MAX_SEED)  # torch takes at most 64 bits
        n: Int | None = None
        stop: str | list[str] | None = None
        logprobs: bool | None = None
        top_logprobs: Int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
        stream: bool | None = None
        stream_options: dict | None = None
        presence_penalty: float | None = None
        frequency_penalty: float | None = None
        logit_bias: dict | None = None
        response_format: dict | None = None
        tools: list | None = None
        functions: list | None = None

    return ChatCompletionRequest


@dataclass
class Params:
    """What one request asks the model to do, validated."""

    model: str
    messages: list[dict]
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    top_logprobs: int | None  # None: no logprobs; k >= 0: chosen token + k alternatives
    stream: bool
    include_usage: bool


def parse_request(body: bytes, schema) -> Params:
    """Decode and validate a request body; raise :class:`RequestError` on any problem."""
    from pydantic import ValidationError

    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"The request body is not valid JSON: {exc}.", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise RequestError("The request body must be a JSON object.", code="invalid_json")
    try:
        req = schema.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ()))
        raise RequestError(f"Invalid value for '{loc}': {err.get('msg')}.", param=loc or None,
                           code="invalid_value") from None
    if req.n not in (None, 1):
        raise RequestError(f"Only n=1 is supported, got n={req.n}.", param="n", code="unsupported_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise RequestError(f"'{name}' is not supported (only 0).", param=name, code="unsupported_value")
    for name in ("logit_bias", "tools", "functions"):
        if getattr(req, name):
            raise RequestError(f"'{name}' is not supported by dat serve.", param=name,
                               code="unsupported_parameter")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise RequestError("Only response_format {'type': 'text'} is supported (no constrained decoding).",
                           param="response_format", code="unsupported_value")
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise RequestError("Give max_tokens or max_completion_tokens, not two different values.",
                           param="max_tokens")
    stop = [] if req.stop is None else [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise RequestError(f"'stop' takes at most {MAX_STOP} non-empty strings.", param="stop")
    if req.top_logprobs is not None and not req.logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
    messages = []
    for k, m in enumerate(req.messages):
        content = m.content
        if content is None:
            raise RequestError(f"messages[{k}].content must be a string.", param=f"messages.{k}.content")
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    opts = req.stream_options or {}
    return Params(
        model=req.model, messages=messages,
        max_tokens=req.max_tokens if req.max_tokens is not None else req.max_completion_tokens,
        temperature=1.0 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p),
        seed=req.seed, stop=stop,
        top_logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        stream=bool(req.stream), include_usage=bool(opts.get("include_usage")),
    )


# ====================================================================== jobs
@dataclass
class Job:
    """One request on its way through the batcher."""

    params: Params
    ids: list[int]  # templated prompt tokens
    insert_at: int | None  # where the action tokens go (steered jobs only)
    steered: bool
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    cancelled: bool = False  # set by the handler when the client is gone

    def group_key(self) -> tuple:
        p = self.params
        if p.temperature == 0:
            return (self.steered, "greedy")
        return (self.steered, p.temperature, p.top_p, p.seed)

    def post(self, *event) -> None:
        """Hand an event to the request handler (thread-safe; never blocks)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # event loop closed: the server is shutting down
            pass


def _holdback(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that could be the start of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class _Row:
    """Decoding state of one request inside a batch."""

    def __init__(self, job: Job, engine: "Engine", batch_size: int):
        self.job, self.engine, self.batch_size = job, engine, batch_size
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0  # characters already streamed
        self.logprobs: list[dict] = []
        self.unsent_logprobs = 0
        self.finish: str | None = None
        self.eos = False
        self.track_text = job.params.stream or bool(job.params.stop)

    def push(self, token: int, lp: tuple | None) -> bool:
        """Take one new token; return True when this row is finished now."""
        p = self.job.params
        if token in self.engine.eos_set:
            self.eos, self.finish = True, "stop"
            return True
        self.tokens.append(token)
        if lp is not None:
            self.logprobs.append(self.engine.logprob_entry(token, *lp))
            self.unsent_logprobs += 1
        if self.track_text:
            self.text = self.engine.detokenize(self.tokens)
            if p.stop:
                hits = [i for i in (self.text.find(s) for s in p.stop) if i >= 0]
                if hits:
                    self.text, self.finish = self.text[:min(hits)], "stop"
                    return True
        if len(self.tokens) >= self.job.max_tokens:
            self.finish = "length"
            return True
        if self.job.cancelled:
            self.finish = "cancelled"
            return True
        return False

    def stream_delta(self, final: bool = False) -> None:
        if not self.job.params.stream:
            return
        end = len(self.text)
        if not final:
            end -= _holdback(self.text, self.job.params.stop)
            while end > self.sent and self.text[end - 1] == "\ufffd":  # incomplete UTF-8
                end -= 1
        if end > self.sent or (final and self.unsent_logprobs):
            lps = self.logprobs[len(self.logprobs) - self.unsent_logprobs:] if self.logprobs else None
            self.job.post("delta", self.text[self.sent:end], lps)
            self.sent, self.unsent_logprobs = end, 0

    def complete(self, info: dict) -> None:
        if not self.track_text:
            self.text = self.engine.detokenize(self.tokens)
        self.stream_delta(final=True)
        result = {
            "text": self.text, "finish_reason": self.finish or "length",
            "logprobs": self.logprobs if self.job.params.top_logprobs is not None else None,
            "prompt_tokens": len(self.job.ids),
            "completion_tokens": len(self.tokens) + int(self.eos),
            "batch_size": self.batch_size, **info,
        }
        self.job.post("done", result)


# ====================================================================== engine
class Engine:
    """The model side: validates prompts against the context and decodes groups of jobs."""

    def __init__(self, lm, agent=None, planner_path: str | None = None):
        self.lm = lm
        self.agent = agent
        self.planner = agent.planner if agent is not None else None
        self.planner_path = planner_path
        self.position = agent.position if agent is not None else None
        # residual actions add no tokens to the prompt
        self.n_action_tokens = (agent.up.config.n_tokens if agent is not None and agent.kind == "tokens"
                                else 0)
        self.eos_set = set(lm.eos_token_ids)
        self._piece: dict[int, tuple[str, list[int]]] = {}

    @classmethod
    def load(cls, model: str = "default", planner: str | None = None, device: str = "auto",
             dtype: str = "auto", backend: str = "hf") -> "Engine":
        from dat.agent import Agent
        from dat.backends import make_lm

        lm = make_lm(model, backend=backend, device=device, dtype=dtype)
        if planner is None:
            return cls(lm)
        return cls(lm, Agent.load(planner, lm), str(Path(planner).resolve()))

    # -------------------------------------------------------------- text helpers
    def detokenize(self, tokens: list[int]) -> str:
        return self.lm.tokenizer.decode(tokens, skip_special_tokens=True)

    def piece(self, token: int) -> tuple[str, list[int]]:
        """Text and UTF-8 bytes of one token. A token holding part of a character (byte-level
        BPE, SentencePiece byte fallback) shows as U+FFFD, but its bytes are the real ones."""
        hit = self._piece.get(token)
        if hit is None:
            text = self.lm.tokenizer.decode([token])
            raw = text.encode("utf-8")
            if "\ufffd" in text:
                raw = _token_bytes(self.lm.tokenizer.convert_ids_to_tokens(token)) or raw
            hit = self._piece[token] = (text, list(raw))
        return hit

    def logprob_entry(self, token: int, logprob: float, top: list) -> dict:
        def one(t, lp):
            s, raw = self.piece(t)
            return {"token": s, "logprob": float(lp), "bytes": raw}

        return {**one(token, logprob), "top_logprobs": [one(t, lp) for t, lp in top]}

    # -------------------------------------------------------------- admission
    def prepare(self, params: Params, steered: bool, default_max_tokens: int) -> tuple[list[int], int | None, int]:
        """Template and check one request: ``(ids, insert_at, max_tokens)``."""
        from jinja2 import TemplateError

        lm = self.lm
        n_act = self.n_action_tokens if steered else 0
        try:
            ids = lm.encode(params.messages, reserve=n_act + (params.max_tokens or 1))
        except ContextLengthError as exc:
            raise RequestError(
                f"This model's maximum context length is {lm.max_context} tokens. {exc}",
                param="messages", code="context_length_exceeded") from None
        except DatError as exc:
            raise RequestError(str(exc), param="messages") from None
        except (TemplateError, ValueError, TypeError) as exc:  # the template refused (role order...)
            raise RequestError(f"The chat template of {lm.name} rejected the messages: {exc}",
                               param="messages") from None
        room = lm.max_context - len(ids) - n_act
        max_tokens = params.max_tokens or min(default_max_tokens, room)
        if max_tokens < 1:
            raise RequestError(
                f"This model's maximum context length is {lm.max_context} tokens; the prompt uses "
                f"{len(ids)} (+{n_act} action tokens), leaving no room for a reply.",
                param="messages", code="context_length_exceeded")
        insert_at = None
        if steered:
            try:
                insert_at = lm.insertion_point(params.messages, ids, self.position)
            except DatError as exc:
                raise RequestError(str(exc), param="messages") from None
        return ids, insert_at, max_tokens

    # -------------------------------------------------------------- decoding
    def run(self, jobs: list[Job]) -> list[str]:
        """Decode one group of compatible jobs in a single batched call; return each row's
        finish reason ("stop", "length" or "cancelled")."""
        import torch

        lm = self.lm
        steered = jobs[0].steered
        p = jobs[0].params
        seed = p.seed if p.seed is not None else secrets.randbits(31)
        actions = None
        with torch.no_grad():
            if steered:
                state = lm.state([j.params.messages for j in jobs])
                actions = self.agent.embed(self.agent.act(state))
            batch = lm.make_batch([j.ids for j in jobs],
                                  [j.insert_at for j in jobs] if steered else None,
                                  actions, position=self.position if steered else None)
        rows = [_Row(j, self, len(jobs)) for j in jobs]
        info = {"steered": steered, "planner": self.planner_path if steered else None,
                "action_tokens": self.n_action_tokens if steered else 0,
                "position": position_name(self.position) if steered else None}
        want = [j.params.top_logprobs for j in jobs if j.params.top_logprobs is not None]
        top_k = max(want) if want else None

        def on_step(step, tokens, lps):
            finished = []
            for i, row in enumerate(rows):
                if row.finish is not None:
                    continue
                lp = None
                if lps is not None and row.job.params.top_logprobs is not None:
                    k = row.job.params.top_logprobs
                    lp = (lps.logprob[i], list(zip(lps.top_ids[i][:k], lps.top_logprobs[i][:k])))
                if row.push(tokens[i], lp):
                    finished.append(i)
                    row.complete(info)
                else:
                    row.stream_delta()
            return finished

        with lm.steering(batch):
            lm._decode(batch, max(j.max_tokens for j in jobs), p.temperature, p.top_p, seed,
                       top_logprobs=top_k, on_step=on_step)
        for row in rows:  # safety net: every request gets an answer
            if row.finish is None:
                row.finish = "length"
                row.complete(info)
        return [row.finish for row in rows]


def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-unicode table used by byte-level BPE vocabularies."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
          *range(ord("\xae"), ord("\xff") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DECODER = _gpt2_byte_decoder()


def _token_bytes(token: str | None) -> bytes | None:
    """Raw bytes of a vocabulary entry, for byte-level BPE (``Ġ``-style) and byte-fallback
    (``<0xF0>``) tokens; None when it is neither."""
    if not token:
        return None
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            return None
    if all(c in _BYTE_DECODER for c in token):
        return bytes(_BYTE_DECODER[c] for c in token)
    return None


# ====================================================================== batcher
class Batcher:
    """A worker thread that runs queued jobs in dynamic batches."""

    def __init__(self, engine: Engine, max_batch: int = 32, max_wait_ms: float = 10.0):
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.active: list[Job] = []
        self.stats = {"requests": 0, "batches": 0, "generate_calls": 0, "largest_batch": 0,
                      "cancelled": 0, "errors": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dat-serve-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for job in list(self.active):
            job.cancelled = True
        self.queue.put(None)
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def _collect(self, first: Job) -> list[Job]:
        # The window opens when the worker is free, not when the first job arrived: clients
        # answered at the end of the previous batch come back within milliseconds, and
        # waiting for them keeps batches full instead of alternating full and tiny ones.
        jobs = [first]
        deadline = time.monotonic() + self.max_wait
        while len(jobs) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # stop sentinel
                self.queue.put(None)
                break
            jobs.append(job)
        return jobs

    def _loop(self) -> None:
        while not self._stop.is_set():
            first = self.queue.get()
            if first is None:
                break
            jobs = self._collect(first)
            live = [j for j in jobs if not j.cancelled]
            self.stats["cancelled"] += len(jobs) - len(live)
            if not live:
                continue
            self.stats["batches"] += 1
            groups: dict[tuple, list[Job]] = {}
            for j in live:
                groups.setdefault(j.group_key(), []).append(j)
            for group in groups.values():
                group = [j for j in group if not j.cancelled]
                if not group:
                    continue
                self.active = group
                self.stats["generate_calls"] += 1
                self.stats["largest_batch"] = max(self.stats["largest_batch"], len(group))
                t0 = time.perf_counter()
                try:
                    reasons = self.engine.run(group)
                    self.stats["cancelled"] += reasons.count("cancelled")
                except Exception as exc:  # the worker must survive: fail this group only
                    self.stats["errors"] += 1
                    log.exception("generation failed for a batch of %d", len(group))
                    for j in group:
                        j.post("error", f"{type(exc).__name__}: {exc}")
                finally:
                    self.active = []
                log.info("batch of %d (%s) in %.2fs", len(group),
                         "steered" if group[0].steered else "plain", time.perf_counter() - t0)


# ====================================================================== app
def _error(status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
           param: str | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content=RequestError(message, param, code, status, type).body())


def create_app(engine: Engine, config: ServeConfig | None = None, api_key: str | None = None):
    """The FastAPI application. ``api_key`` (if any) is compared in constant time."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    config = config or ServeConfig()
    config.validate()
    schema = _request_model()
    batcher = Batcher(engine, config.max_batch, config.max_wait_ms)
    name = config.served_model_name
    models = {name: engine.planner is not None}
    if engine.planner is not None:
        models[f"{name}-plain"] = False

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="dat serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.engine = engine

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return _error(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return _error(400, f"Invalid request: {exc.errors()[:1]}")

    @app.exception_handler(Exception)
    async def any_error(request, exc):
        log.exception("unhandled error")
        return _error(500, f"Internal server error: {type(exc).__name__}", type="server_error")

    def check_key(request: Request):
        if api_key is None:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return _error(401, "Missing API key: send 'Authorization: Bearer <key>'.",
                          code="invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            return _error(401, "Incorrect API key provided.", code="invalid_api_key")
        return None

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.lm.name, "planner": engine.planner_path,
                "served_models": list(models), "queued": batcher.queue.qsize(),
                "active": len(batcher.active), "max_batch": config.max_batch,
                "max_wait_ms": config.max_wait_ms, **batcher.stats}

    @app.get("/v1/models")
    async def list_models(request: Request):
        if (denied := check_key(request)) is not None:
            return denied
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "dat",
                 "max_model_len": engine.lm.max_context,
                 "dat": {"steered": s, "planner": engine.planner_path if s else None,
                         "base_model": engine.lm.name}} for m, s in models.items()]
        return {"object": "list", "data": data}

    limit = config.max_body_bytes

    def too_large() -> RequestError:
        return RequestError(f"The request body is larger than this server's limit of {limit} bytes.",
                            code="request_too_large", status=413)

    async def read_body(request: Request) -> bytes:
        """The body, refused with a 413 as soon as it is known to exceed ``max_body_bytes``
        (from Content-Length when sent, else while reading): a large body is never buffered."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large()
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large()
            chunks.append(chunk)
        return b"".join(chunks)

    def admit(body: bytes) -> tuple[Params, bool, list[int], int | None, int]:
        """Parse, validate and tokenise one request (CPU-bound: runs in a worker thread)."""
        params = parse_request(body, schema)
        if params.model not in models:
            raise RequestError(f"The model '{params.model}' does not exist; this server has "
                               f"{', '.join(repr(m) for m in models)}.", param="model",
                               code="model_not_found", status=404)
        steered = models[params.model]
        ids, insert_at, max_tokens = engine.prepare(params, steered, config.default_max_tokens)
        return params, steered, ids, insert_at, max_tokens

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if (denied := check_key(request)) is not None:
            return denied
        try:
            body = await read_body(request)
            # Off the event loop: a long prompt takes seconds to template and tokenise, and
            # meanwhile every other client (and /health) must still be answered.
            params, steered, ids, insert_at, max_tokens = await asyncio.to_thread(admit, body)
        except RequestError as exc:
            return JSONResponse(status_code=exc.status, content=exc.body())
        job = Job(params, ids, insert_at, steered, max_tokens, asyncio.get_running_loop(), asyncio.Queue())
        batcher.stats["requests"] += 1
        batcher.submit(job)
        if params.stream:
            return StreamingResponse(_sse(job, request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        answered = False
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():  # nobody to answer: free the batch row
                        return JSONResponse(status_code=499, content={})
                    continue
                if kind == "done":
                    answered = True
                    return _completion(job, payload)
                if kind == "error":
                    answered = True
                    return _error(500, f"Generation failed: {payload}", type="server_error")
        finally:
            if not answered:
                job.cancelled = True

    def _completion(job: Job, r: dict) -> dict:
        return {
            "id": job.id, "object": "chat.completion", "created": job.created, "model": job.params.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": r["text"]},
                         "logprobs": None if r["logprobs"] is None else {"content": r["logprobs"]},
                         "finish_reason": _finish(r["finish_reason"])}],
            "usage": _usage(r),
            "dat": _dat_field(r),
        }

    async def _sse(job: Job, request: Request):
        def chunk(delta: dict, finish=None, logprobs=None, extra=None) -> str:
            body = {"id": job.id, "object": "chat.completion.chunk", "created": job.created,
                    "model": job.params.model,
                    "choices": [{"index": 0, "delta": delta,
                                 "logprobs": None if logprobs is None else {"content": logprobs},
                                 "finish_reason": finish}]}
            if extra:
                body.update(extra)
            return f"data: {json.dumps(body)}\n\n"

        finished = False
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, *rest = await job.events.get()
                if kind == "delta":
                    text, lps = rest
                    yield chunk({"content": text}, logprobs=lps)
                elif kind == "done":
                    r = rest[0]
                    yield chunk({}, finish=_finish(r["finish_reason"]), extra={"dat": _dat_field(r)})
                    if job.params.include_usage:
                        yield f"data: {json.dumps({'id': job.id, 'object': 'chat.completion.chunk', 'created': job.created, 'model': job.params.model, 'choices': [], 'usage': _usage(r)})}\n\n"
                    yield "data: [DONE]\n\n"
                    finished = True
                    return
                else:
                    err = RequestError(f"Generation failed: {rest[0]}", type="server_error", status=500)
                    yield f"data: {json.dumps(err.body())}\n\n"
                    yield "data: [DONE]\n\n"
                    finished = True
                    return
        finally:
            if not finished:  # client went away (or the server is stopping): free its batch row
                job.cancelled = True

    return app


def _finish(reason: str) -> str:
    return "stop" if reason in ("stop", "cancelled") else reason


def _usage(r: dict) -> dict:
    return {"prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
            "total_tokens": r["prompt_tokens"] + r["completion_tokens"]}


def _dat_field(r: dict) -> dict:
    return {"steered": r["steered"], "planner": r["planner"], "position": r["position"],
            "action_tokens": r["action_tokens"], "batch_size": r["batch_size"]}


# ====================================================================== command
def serve_command(
    model: str = "default",
    planner: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key_env: str | None = None,
    max_batch: int = 32,
    max_wait_ms: float = 10.0,
    served_model_name: str = "dat",
    default_max_tokens: int = 256,
    device: str = "auto",
    dtype: str = "auto",
    threads: int | None = None,
    log_level: str = "info",
    backend: str = "hf",
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> None:
    """Load the model (and planner) and serve it until interrupted.

    ``threads`` sets torch's intra-op threads; on a CPU shared with other jobs, fewer
    threads than cores avoids oversubscription, which hurts large batches the most."""
    from dat.models import require

    require("fastapi", install="pip install 'dat[serve]'", purpose="dat serve")
    uvicorn = require("uvicorn", install="pip install 'dat[serve]'", purpose="dat serve")
    config = ServeConfig(model, planner, host, port, api_key_env, max_batch, max_wait_ms,
                         served_model_name, default_max_tokens, device, dtype, threads, log_level,
                         backend, max_body_bytes)
    config.validate()
    api_key = read_api_key(api_key_env)  # fail before loading the model
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if host not in LOOPBACK and api_key is None:
        log.warning("Serving on %s without an API key: anyone who can reach this address can use "
                    "the model. Consider --api-key-env.", host)
    if threads:
        import torch

        torch.set_num_threads(threads)
    engine = Engine.load(model, planner, device=device, dtype=dtype, backend=backend)
    log.info("model %s on %s, planner %s, serving %s", engine.lm.name, engine.lm.device,
             engine.planner_path or "none (plain)", served_model_name)
    app = create_app(engine, config, api_key)
    # In-flight requests get a few seconds on shutdown; then their rows are cancelled.
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), timeout_graceful_shutdown=5)
