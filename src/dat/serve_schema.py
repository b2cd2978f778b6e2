"""The OpenAI-compatible wire format of ``dat serve``: request validation and response bodies.

:func:`parse_request` turns a request body into :class:`Params` or raises a
:class:`RequestError` (an OpenAI-style error body); the ``*_body`` functions build the
completion, stream-chunk and error bodies. The fields are described in docs/serve.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

MAX_TOP_LOGPROBS = 20
MAX_STOP = 4
MAX_SEED = 2**63 - 1  # torch takes at most 64 bits


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
def _refuse_bool(value):
    """JSON ``true``/``false`` is not a number (pydantic would read it as 1/0)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")  # noqa: TRY004 - pydantic wants ValueError
    return value


def request_schema():
    """Pydantic schema of a chat completion request (built lazily: pydantic is an extra)."""
    from typing import Annotated

    from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

    Int = Annotated[int, BeforeValidator(_refuse_bool)]
    Float = Annotated[float, BeforeValidator(_refuse_bool)]

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
        seed: Int | None = Field(None, ge=0, le=MAX_SEED)
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
    """Decode and validate a request body against ``schema`` (:func:`request_schema`); raise
    :class:`RequestError` on any problem."""
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


# ====================================================================== responses
# ``result`` below is the dict a finished reply posts: text, finish_reason, logprobs,
# prompt_tokens, completion_tokens, and the ``dat`` fields (steered, planner, position,
# action_tokens, batch_size).
def finish_reason(reason: str) -> str:
    """OpenAI's finish reason for ours (a cancelled row counts as stopped)."""
    return "stop" if reason in ("stop", "cancelled") else reason


def usage_body(result: dict) -> dict:
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}


def dat_body(result: dict) -> dict:
    """The extra ``dat`` object of every response: what steered it and its batch size."""
    return {"steered": result["steered"], "planner": result["planner"], "position": result["position"],
            "action_tokens": result["action_tokens"], "batch_size": result["batch_size"]}


def completion_body(completion_id: str, created: int, model: str, result: dict) -> dict:
    """A ``chat.completion`` response."""
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                     "logprobs": None if result["logprobs"] is None else {"content": result["logprobs"]},
                     "finish_reason": finish_reason(result["finish_reason"])}],
        "usage": usage_body(result),
        "dat": dat_body(result),
    }


def chunk_body(completion_id: str, created: int, model: str, delta: dict | None,
               finish: str | None = None, logprobs: list | None = None,
               extra: dict | None = None) -> dict:
    """A ``chat.completion.chunk`` of a stream; ``delta`` None gives the usage chunk, which
    has no choices (``extra`` then carries ``usage``)."""
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [] if delta is None else
            [{"index": 0, "delta": delta, "logprobs": None if logprobs is None else {"content": logprobs},
              "finish_reason": finish}]}
    if extra:
        body.update(extra)
    return body


def sse_event(body: dict | str) -> str:
    """One server-sent event carrying ``body`` (JSON, or a literal such as ``[DONE]``)."""
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"
