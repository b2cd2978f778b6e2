"""``dat serve``: an OpenAI-compatible HTTP server for a steered (or plain) frozen LM.

Endpoints: ``POST /v1/chat/completions`` (plain JSON or SSE with ``stream: true``),
``GET /v1/models``, ``GET /health``. With a planner loaded, the model ``<name>`` is steered and
``<name>-plain`` is not. This module holds the settings, the routes and the command; requests
are parsed by :mod:`dat.serve_schema`, decoded by :mod:`dat.serve_engine` and scheduled by
:mod:`dat.serve_batcher` (see docs/serve.md).
"""

import asyncio
import hmac
import logging
import os
from dataclasses import dataclass

from dat.errors import DatError
from dat.serve_batcher import BATCHING, Batcher
from dat.serve_engine import Engine, Job
from dat.serve_schema import (
    Params,
    RequestError,
    chunk_body,
    completion_body,
    dat_body,
    finish_reason,
    parse_request,
    request_schema,
    sse_event,
    usage_body,
)

log = logging.getLogger("dat.serve")

LOOPBACK = ("127.0.0.1", "localhost", "::1")
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
    precision: str = "exact"  # "fast": bf16 / int8 where the hardware has it (dat.precision)
    batching: str = "continuous"  # or "static": each batch decodes to the end (dat.serve_batcher)
    prefix_cache: bool = True  # continuous: reuse prompt prefixes recent requests shared

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
        if self.batching not in BATCHING:
            raise DatError(f"batching must be one of {', '.join(BATCHING)}, got {self.batching!r}.")


def read_api_key(env_var: str | None) -> str | None:
    """The key from the environment variable ``env_var`` (None when no variable is named)."""
    if not env_var:
        return None
    key = os.environ.get(env_var, "")
    if not key.strip():
        raise DatError(f"--api-key-env names the environment variable {env_var!r}, but it is not set "
                       "or empty. Export it first, e.g. `export {0}=$(openssl rand -hex 16)`.".format(env_var))
    return key.strip()


# ====================================================================== app
def error_response(status: int, message: str, type: str = "invalid_request_error",
                   code: str | None = None, param: str | None = None):
    """An OpenAI-style error as a FastAPI response."""
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
    schema = request_schema()
    batcher = Batcher(engine, config.max_batch, config.max_wait_ms, config.batching,
                      config.prefix_cache)
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
        return error_response(exc.status_code, str(exc.detail),
                              code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return error_response(400, f"Invalid request: {exc.errors()[:1]}")

    @app.exception_handler(Exception)
    async def any_error(request, exc):
        log.exception("unhandled error")
        return error_response(500, f"Internal server error: {type(exc).__name__}", type="server_error")

    def check_key(request: Request):
        if api_key is None:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return error_response(401, "Missing API key: send 'Authorization: Bearer <key>'.",
                                  code="invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            return error_response(401, "Incorrect API key provided.", code="invalid_api_key")
        return None

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.lm.name, "planner": engine.planner_path,
                "served_models": list(models), "queued": batcher.queued,
                "active": len(batcher.active), "batching": batcher.batching,
                "prefix_cache": batcher.prefix_cache,
                "max_batch": config.max_batch,
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

    def parse_and_admit(body: bytes) -> tuple[Params, bool, list[int], int | None, int]:
        """Parse, validate and tokenise one request (CPU-bound: runs in a worker thread)."""
        params = parse_request(body, schema)
        if params.model not in models:
            raise RequestError(f"The model '{params.model}' does not exist; this server has "
                               f"{', '.join(repr(m) for m in models)}.", param="model",
                               code="model_not_found", status=404)
        steered = models[params.model]
        ids, insert_at, max_tokens = engine.admit(params, steered, config.default_max_tokens)
        return params, steered, ids, insert_at, max_tokens

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if (denied := check_key(request)) is not None:
            return denied
        try:
            body = await read_body(request)
            # Off the event loop: a long prompt is slow to template and tokenise, and
            # meanwhile every other client (and /health) must still be answered.
            params, steered, ids, insert_at, max_tokens = await asyncio.to_thread(parse_and_admit, body)
        except RequestError as exc:
            return JSONResponse(status_code=exc.status, content=exc.body())
        job = Job(params, ids, insert_at, steered, max_tokens, asyncio.get_running_loop(), asyncio.Queue())
        batcher.stats["requests"] += 1
        batcher.submit(job)
        if params.stream:
            return StreamingResponse(stream_events(job), media_type="text/event-stream",
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
                    return completion_body(job.id, job.created, job.params.model, payload)
                if kind == "error":
                    answered = True
                    return error_response(500, f"Generation failed: {payload}", type="server_error")
        finally:
            if not answered:
                job.cancelled = True

    return app


async def stream_events(job: Job):
    """The server-sent events of a streamed reply, as the job's events arrive."""
    def chunk(delta: dict | None, **kw) -> str:
        return sse_event(chunk_body(job.id, job.created, job.params.model, delta, **kw))

    finished = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, *rest = await job.events.get()
            if kind == "delta":
                text, lps = rest
                yield chunk({"content": text}, logprobs=lps)
                continue
            if kind == "done":
                r = rest[0]
                yield chunk({}, finish=finish_reason(r["finish_reason"]), extra={"dat": dat_body(r)})
                if job.params.include_usage:
                    yield chunk(None, extra={"usage": usage_body(r)})
            else:
                err = RequestError(f"Generation failed: {rest[0]}", type="server_error", status=500)
                yield sse_event(err.body())
            yield sse_event("[DONE]")
            finished = True
            return
    finally:
        if not finished:  # client went away (or the server is stopping): free its batch row
            job.cancelled = True


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
    precision: str = "exact",
    batching: str = "continuous",
    prefix_cache: bool = True,
) -> None:
    """Load the model (and planner) and serve it until interrupted.

    ``threads`` sets torch's intra-op threads; on a CPU shared with other jobs, fewer
    threads than cores avoids oversubscription, which hurts large batches the most.
    ``batching``: "continuous" (requests join and leave the running decode batch at every
    step; the vLLM backend falls back to static) or "static" (each batch decodes to the end).
    ``prefix_cache``: with continuous batching, take the keys/values of prompt prefixes that
    recent requests shared (e.g. the system prompt) from a small cache."""
    from dat.models import require

    require("fastapi", install="pip install 'dat[serve]'", purpose="dat serve")
    uvicorn = require("uvicorn", install="pip install 'dat[serve]'", purpose="dat serve")
    config = ServeConfig(model, planner, host, port, api_key_env, max_batch, max_wait_ms,
                         served_model_name, default_max_tokens, device, dtype, threads, log_level,
                         backend, max_body_bytes, precision, batching, prefix_cache)
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
    engine = Engine.load(model, planner, device=device, dtype=dtype, backend=backend,
                         precision=precision)
    log.info("model %s on %s, planner %s, serving %s, %s", engine.lm.name, engine.lm.device,
             engine.planner_path or "none (plain)", served_model_name,
             engine.lm.precision.describe())
    app = create_app(engine, config, api_key)
    # In-flight requests get a few seconds on shutdown; then their rows are cancelled.
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), timeout_graceful_shutdown=5)
