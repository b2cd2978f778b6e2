"""The model side of ``dat serve``: admitting requests and decoding them together.

:class:`Engine` templates and checks each request against the context (:meth:`Engine.admit`).
With continuous batching (the ``hf`` backend), :class:`RunningReplies` keeps one decode batch
that requests join and leave at every step (:mod:`dat.continuous`); otherwise
:meth:`Engine.run` decodes a group of compatible :class:`Job` objects in one batched call.
:class:`ReplyState` follows one request's reply token by token (stop strings, its own token
limit, cancellation, streamed text and logprobs).
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from dat.errors import ContextLengthError, DatError
from dat.kvcache import common_prefix
from dat.serve_schema import Params, RequestError
from dat.steer import position_name


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
    queued_at: float = field(default_factory=time.monotonic)

    def group_key(self) -> tuple:
        """Jobs with the same key can share one (static) decoding call: steered or not, and
        greedy or the same temperature, top-p and seed."""
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


def _stop_string_start(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that could be the start of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class ReplyState:
    """Decoding state of one request inside a batch. ``batch_size``: the most rows decoded
    together while this one was live."""

    def __init__(self, job: Job, engine: Engine, batch_size: int):
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
        """Post the text (and logprobs) not streamed yet, holding back what may still turn
        out to be a stop string or an incomplete character."""
        if not self.job.params.stream:
            return
        end = len(self.text)
        if not final:
            end -= _stop_string_start(self.text, self.job.params.stop)
            while end > self.sent and self.text[end - 1] == "\ufffd":  # incomplete UTF-8
                end -= 1
        if end > self.sent or (final and self.unsent_logprobs):
            lps = self.logprobs[len(self.logprobs) - self.unsent_logprobs:] if self.logprobs else None
            self.job.post("delta", self.text[self.sent:end], lps)
            self.sent, self.unsent_logprobs = end, 0

    def complete(self, info: dict) -> None:
        """Post the finished reply (with the call's ``info``: what steered it)."""
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


class Engine:
    """The model side: validates prompts against the context and decodes groups of jobs.

    ``lm`` is any :class:`dat.backends.SteeringBackend`; ``agent`` (optional) steers the
    requests made to the steered model."""

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
        self._pieces: dict[int, tuple[str, list[int]]] = {}

    @classmethod
    def load(cls, model: str = "default", planner: str | None = None, device: str = "auto",
             dtype: str = "auto", backend: str = "hf", precision: str = "exact") -> Engine:
        from dat.agent import Agent
        from dat.backends import make_lm

        lm = make_lm(model, backend=backend, device=device, dtype=dtype, precision=precision)
        if planner is None:
            return cls(lm)
        return cls(lm, Agent.load(planner, lm), str(Path(planner).resolve()))

    # -------------------------------------------------------------- text helpers
    def detokenize(self, tokens: list[int]) -> str:
        return self.lm.tokenizer.decode(tokens, skip_special_tokens=True)

    def piece(self, token: int) -> tuple[str, list[int]]:
        """Text and UTF-8 bytes of one token. A token holding part of a character (byte-level
        BPE, SentencePiece byte fallback) shows as U+FFFD, but its bytes are the real ones."""
        hit = self._pieces.get(token)
        if hit is None:
            text = self.lm.tokenizer.decode([token])
            raw = text.encode("utf-8")
            if "\ufffd" in text:
                raw = _token_bytes(self.lm.tokenizer.convert_ids_to_tokens(token)) or raw
            hit = self._pieces[token] = (text, list(raw))
        return hit

    def logprob_entry(self, token: int, logprob: float, top: list) -> dict:
        """One token's entry of an OpenAI ``logprobs.content`` list."""
        def one(t, lp):
            s, raw = self.piece(t)
            return {"token": s, "logprob": float(lp), "bytes": raw}

        return {**one(token, logprob), "top_logprobs": [one(t, lp) for t, lp in top]}

    # -------------------------------------------------------------- admission
    def admit(self, params: Params, steered: bool, default_max_tokens: int) -> tuple[list[int], int | None, int]:
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
    @property
    def continuous(self) -> bool:
        """Whether requests can join a running decode batch: the ``hf`` decoder (a backend
        that replaces ``decode``, such as vLLM, cannot) on a model whose cache fits the slab
        layout (plain full attention)."""
        from dat.steer import SteeredLM

        lm = self.lm
        return (isinstance(lm, SteeredLM) and type(lm).decode is SteeredLM.decode
                and bool(lm.supports_prefix_cache))

    def info(self, steered: bool) -> dict:
        """What steered a reply (the ``dat`` fields of the response)."""
        return {"steered": steered, "planner": self.planner_path if steered else None,
                "action_tokens": self.n_action_tokens if steered else 0,
                "position": position_name(self.position) if steered else None}

    def make_batch(self, jobs: list[Job], reuse: int = 0):
        """The left-padded batch of ``jobs`` (all steered or all plain), with the planner's
        actions in place for steered ones; with ``reuse``, only the tokens after the first
        ``reuse`` of each job (which come from a shared prefix cache)."""
        import torch

        lm = self.lm
        steered = jobs[0].steered
        actions = None
        with torch.no_grad():
            if steered:
                state = lm.state([j.params.messages for j in jobs])
                actions = self.agent.embed(self.agent.act(state))
            return lm.make_batch([j.ids for j in jobs],
                                 [j.insert_at for j in jobs] if steered else None,
                                 actions, position=self.position if steered else None,
                                 reuse=[reuse] * len(jobs) if reuse else None)

    def running(self, prefix_cache: bool = True) -> RunningReplies:
        """An empty continuous decode batch (see :attr:`continuous`); ``prefix_cache``:
        reuse the keys/values of token prefixes that recent requests shared."""
        return RunningReplies(self, prefix_cache)

    def run(self, jobs: list[Job]) -> list[str]:
        """Decode one group of compatible jobs in a single batched call (static batching);
        return each row's finish reason ("stop", "length" or "cancelled")."""
        lm = self.lm
        steered = jobs[0].steered
        p = jobs[0].params
        seed = p.seed if p.seed is not None else secrets.randbits(31)
        batch = self.make_batch(jobs)
        rows = [ReplyState(j, self, len(jobs)) for j in jobs]
        info = self.info(steered)
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
            lm.decode(batch, max(j.max_tokens for j in jobs), p.temperature, p.top_p, seed,
                      top_logprobs=top_k, on_step=on_step)
        for row in rows:  # safety net: every request gets an answer
            if row.finish is None:
                row.finish = "length"
                row.complete(info)
        return [row.finish for row in rows]


class RunningReplies:
    """The requests being decoded by continuous batching: one
    :class:`~dat.continuous.RunningBatch` whose rows are :class:`ReplyState` objects. Rows
    join at any step (:meth:`join`) and leave as soon as they are finished.

    With ``prefix_cache``, a :class:`~dat.kvcache.PrefixStore` keeps the keys/values of token
    prefixes that recent requests shared (the longest common prefix of a newcomer group, or
    of a lone newcomer and one of the last :attr:`HISTORY` prompts: typically the templated
    system prompt); a newcomer group whose rows all start with an entry takes those columns
    from it and prefills only the rest. Never past a steered row's insertion point.
    :attr:`cached_tokens` counts the prompt tokens so taken, :attr:`prompt_tokens` all."""

    HISTORY = 8  # recent prompts a lone newcomer is compared with
    MIN_TOKENS = 8  # shorter shared prefixes are neither kept nor reused

    def __init__(self, engine: Engine, prefix_cache: bool = True):
        from collections import deque

        from dat.continuous import RunningBatch
        from dat.kvcache import PrefixStore

        self.engine = engine
        self.batch = RunningBatch(engine.lm)
        self.store = PrefixStore() if prefix_cache else None
        self.recent: deque[list[int]] = deque(maxlen=self.HISTORY)
        self.cached_tokens = 0
        self.prompt_tokens = 0

    def __len__(self) -> int:
        return len(self.batch)

    @property
    def jobs(self) -> list[Job]:
        return [row.job for row in self.batch.owners]

    def join(self, jobs: list[Job]) -> list[str]:
        """Prefill ``jobs`` (all steered or all plain) into the running batch; return the
        finish reasons of those already finished by their first token. On an exception the
        running rows are untouched and none of ``jobs`` has joined."""
        import torch

        from dat.continuous import Sampling

        entry, reuse = self._match(jobs)
        batch = self.engine.make_batch(jobs, reuse)
        rows = [ReplyState(j, self.engine, 0) for j in jobs]
        sampling = [Sampling(j.params.temperature, j.params.top_p, j.params.seed) for j in jobs]
        with torch.no_grad():
            result = self.batch.add(batch, sampling, rows, self._top_k(rows),
                                    prefix=entry.kv[:, :, :, :reuse] if reuse else None)
            self._learn(jobs, rows, reuse)  # before _take: a row finished at once leaves
        self.cached_tokens += reuse * len(jobs)
        self.prompt_tokens += sum(len(j.ids) for j in jobs)
        return self._take(result)

    @staticmethod
    def _limit(job: Job) -> int | None:
        # action tokens change the embeddings from insert_at on, a residual action the
        # hidden states: only the tokens before it may come from a cache
        return job.insert_at if job.steered else None

    def _match(self, jobs: list[Job]):
        """The store's entry every job starts with, and how many tokens to take from it."""
        if self.store is None:
            return None, 0
        entry, n = self.store.match([j.ids for j in jobs], [self._limit(j) for j in jobs])
        return (entry, n) if n >= self.MIN_TOKENS else (None, 0)

    def _learn(self, jobs: list[Job], rows: list[ReplyState], reuse: int) -> None:
        """Keep the prefix these jobs share (with each other, or a lone job with a recent
        prompt) when the store does not hold most of it yet; its keys/values are read from
        the first row, which now holds them (the same as a prefill of the prefix alone)."""
        if self.store is None:
            return
        ids = jobs[0].ids
        if len(jobs) > 1:
            shared = min(common_prefix(ids, j.ids) for j in jobs[1:])
        else:
            shared = max((common_prefix(ids, r) for r in self.recent), default=0)
        self.recent.extend(j.ids for j in jobs)
        limit = self._limit(jobs[0])
        shared = min(shared, len(ids) if limit is None else limit, self.store.max_tokens)
        if shared < self.MIN_TOKENS or self.store.longest(ids[:shared]) > shared - self.MIN_TOKENS:
            return
        self.store.put(ids[:shared], self.batch.row_kv(rows[0], shared))

    def step(self) -> list[str]:
        """One decoding step of every running row; return the finish reasons of the rows that
        finished (they have left the batch)."""
        import torch

        with torch.no_grad():
            result = self.batch.step(self._top_k(self.batch.owners))
        return self._take(result)

    def fail(self, message: str) -> None:
        """Answer every running row with an error and empty the batch."""
        for row in self.batch.owners:
            row.job.post("error", message)
        self.batch.clear()

    def abort(self) -> None:
        """Finish every running row as cancelled (the server is stopping)."""
        for row in self.batch.owners:
            row.finish = "cancelled"
            row.complete(self.engine.info(row.job.steered))
        self.batch.clear()

    @staticmethod
    def _top_k(rows) -> int | None:
        want = [r.job.params.top_logprobs for r in rows if r.job.params.top_logprobs is not None]
        return max(want) if want else None

    def _take(self, result) -> list[str]:
        size = len(self.batch)
        lps = result.logprobs
        done = []
        for i, row in enumerate(result.rows):
            row.batch_size = max(row.batch_size, size)
            lp = None
            k = row.job.params.top_logprobs
            if lps is not None and k is not None:
                lp = (lps.logprob[i], list(zip(lps.top_ids[i][:k], lps.top_logprobs[i][:k])))
            if row.push(result.tokens[i], lp):
                done.append(row)
                row.complete(self.engine.info(row.job.steered))
            else:
                row.stream_delta()
        self.batch.remove(done)
        return [row.finish for row in done]


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
