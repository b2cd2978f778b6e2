"""Continuous batching (`dat.continuous`, `dat serve`'s worker): rows join a running decode
batch and leave it between steps, and every row is computed as it would be alone.

Model-level tests drive :class:`dat.continuous.RunningBatch` directly; scheduler tests run
the real :class:`dat.serve_batcher.Batcher` and :class:`dat.serve_engine.Engine` in process
(no HTTP), with an asyncio loop standing in for the request handlers.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from dat.continuous import RunningBatch, Sampling
from dat.steer import ResidualAt

pytestmark = pytest.mark.slow

PROMPTS = [
    [{"role": "user", "content": "Write a long story about a dragon."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "List three fruits and say why each is healthy."}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "What is the capital of France? Explain its history in detail."}],
]


# ---------------------------------------------------------------------- model level
def solo(lm, dialogue, max_new, actions=None, position="prefix", temperature=0.0, top_p=1.0, seed=0):
    """The reference: one request alone through the ordinary (static) decoder."""
    g = lm.generate_detailed([dialogue], actions, position, max_new, temperature=temperature,
                             top_p=top_p, seed=seed)
    return g.token_ids[0] + ([lm.eos_token_ids[0]] if g.stopped[0] else [])


class Row:
    """One request driven by hand through a RunningBatch: stops at EOS or its limit."""

    def __init__(self, lm, dialogue, max_new, actions=None, position=None, sampling=None):
        self.lm, self.dialogue, self.max_new = lm, dialogue, max_new
        self.sampling = sampling or Sampling()
        self.ids = lm.encode(dialogue)
        self.insert_at = None if actions is None else [lm.insertion_point(dialogue, self.ids, position)]
        self.actions, self.position = actions, position
        self.tokens: list[int] = []

    def batch(self):
        return self.lm.make_batch([self.ids], self.insert_at, self.actions, self.position)

    def take(self, token) -> bool:
        self.tokens.append(token)
        return token in self.lm.eos_token_ids or len(self.tokens) >= self.max_new


def drive(rb: RunningBatch, schedule: dict[int, list[Row]], seen: list | None = None) -> None:
    """Decode until every scheduled row is finished; ``schedule[s]`` joins before step s."""
    step, pending = 0, dict(schedule)
    while pending or len(rb):
        for row in pending.pop(step, []):
            r = rb.add(row.batch(), [row.sampling], [row])
            if row.take(r.tokens[0]):
                rb.remove([row])
        if len(rb):
            r = rb.step()
            assert r.rows == rb.owners
            rb.remove([row for row, t in zip(r.rows, r.tokens) if row.take(t)])
        if seen is not None:
            seen.append((len(rb), rb.columns, [len(o.ids) + len(o.tokens) for o in rb.owners]))
        step += 1


def test_rows_joining_and_leaving_match_solo_decoding(default_lm):
    """Plain, token-steered, residual-steered and seeded sampled rows join at different steps
    and leave at different steps; each gets exactly its solo reply."""
    lm = default_lm
    torch.manual_seed(0)
    emb = lm.model.get_input_embeddings().weight
    words = lm.tokenizer("Answer only in French, like a pirate.", add_special_tokens=False)["input_ids"]
    tokens = emb[words][None].detach().clone()  # action tokens that certainly change the reply
    layer = lm.num_layers // 2
    vector = torch.randn(1, 1, lm.hidden_size) * 4.0
    hot = Sampling(temperature=0.9, top_p=0.95, seed=1234)
    rows = {
        "plain": Row(lm, PROMPTS[0], 24),
        "tokens": Row(lm, PROMPTS[1], 10, tokens, "infix"),
        "residual": Row(lm, PROMPTS[2], 14, vector, ResidualAt(layer)),
        "sampled": Row(lm, PROMPTS[3], 12, sampling=hot),
        "late": Row(lm, PROMPTS[4], 6),
    }
    expected = {
        "plain": solo(lm, PROMPTS[0], 24),
        "tokens": solo(lm, PROMPTS[1], 10, tokens, "infix"),
        "residual": solo(lm, PROMPTS[2], 14, vector, ResidualAt(layer)),
        "sampled": solo(lm, PROMPTS[3], 12, temperature=0.9, top_p=0.95, seed=1234),
        "late": solo(lm, PROMPTS[4], 6),
    }
    # the steering does something, so a row that lost its action would be caught
    assert expected["tokens"] != solo(lm, PROMPTS[1], 10)
    assert expected["residual"] != solo(lm, PROMPTS[2], 14)

    rb = RunningBatch(lm)
    seen = []
    drive(rb, {0: [rows["plain"], rows["tokens"]], 2: [rows["residual"]], 3: [rows["sampled"]],
               7: [rows["late"]]}, seen)
    assert {k: r.tokens for k, r in rows.items()} == expected
    assert max(n for n, _, _ in seen) >= 4  # they really decoded together
    assert len(rb) == 0 and rb.capacity == (0, 0)  # empty: the slab is freed


def test_cache_stays_bounded_while_rows_come_and_go(tiny_lm):
    """Many short rows joining a long one, then the long one leaving: the columns no live row
    uses are dropped, and every row still matches its solo reply."""
    lm = tiny_lm
    long = Row(lm, PROMPTS[0], 220)
    schedule = {0: [long]}
    short = []
    for k in range(12):
        row = Row(lm, PROMPTS[k % len(PROMPTS)], 5 + 7 * (k % 4))
        short.append(row)
        schedule.setdefault(10 + 17 * k, []).append(row)
    tail = [Row(lm, PROMPTS[k], 30) for k in (1, 3)]
    schedule[215] = tail  # join just before the long row leaves, outlive it
    rb = RunningBatch(lm)
    seen = []
    drive(rb, schedule, seen)
    for row in [long, *short, *tail]:
        assert row.tokens == solo(lm, row.dialogue, row.max_new), row.max_new
    assert max(n for n, _, _ in seen) >= 3
    # columns never exceed what the longest live row needs, plus the layout's headroom
    for n_rows, cols, lengths in seen:
        if n_rows:
            assert cols <= max(2 * max(lengths), max(lengths) + RunningBatch.HEADROOM), (cols, lengths)
    # after the long row left, the short rows' leading padding was dropped
    after = [cols for n_rows, cols, lengths in seen[225:] if n_rows]
    assert after and max(after) < 120


# ---------------------------------------------------------------------- scheduler level
class Client:
    """A request handler's side of one job: submit it and wait for its answer."""

    def __init__(self, batcher, engine, messages, max_tokens, steered=False, stream=False, **kw):
        from dat.serve_engine import Job
        from dat.serve_schema import Params

        params = Params(model="dat", messages=messages, max_tokens=max_tokens,
                        temperature=kw.get("temperature", 0.0), top_p=kw.get("top_p", 1.0),
                        seed=kw.get("seed"), stop=kw.get("stop", []),
                        top_logprobs=kw.get("top_logprobs"), stream=stream, include_usage=False)
        ids, insert_at, limit = engine.admit(params, steered, 64)
        self.job = Job(params, ids, insert_at, steered, limit, asyncio.get_running_loop(), asyncio.Queue())
        self.batcher = batcher
        self.deltas = 0
        self.done_at = None

    async def result(self, on_delta=None) -> dict:
        self.batcher.submit(self.job)
        while True:
            kind, *rest = await asyncio.wait_for(self.job.events.get(), timeout=300)
            if kind == "delta":
                self.deltas += 1
                if on_delta is not None:
                    on_delta(self)
                continue
            assert kind == "done", rest
            self.done_at = time.monotonic()
            return rest[0]


def run_server(engine, coro_fn, max_batch=8, max_wait_ms=30.0, batching="continuous",
               prefix_cache=True):
    from dat.serve_batcher import Batcher

    batcher = Batcher(engine, max_batch, max_wait_ms, batching, prefix_cache)
    batcher.start()
    try:
        return asyncio.run(coro_fn(batcher)), batcher
    finally:
        batcher.stop()


async def solo_reply(batcher, engine, messages, max_tokens, steered=False, **kw):
    return await Client(batcher, engine, messages, max_tokens, steered, **kw).result()


async def long_then_short(batcher, engine, long_tokens, short_tokens, after_deltas=1):
    """A long streamed request (PROMPTS[0]) that is decoding (``after_deltas`` deltas sent),
    and a short one (PROMPTS[1]) not sent yet: ``(long, short, long_task)``."""
    long = Client(batcher, engine, PROMPTS[0], long_tokens, stream=True)
    short = Client(batcher, engine, PROMPTS[1], short_tokens)
    started = asyncio.Event()
    long_task = asyncio.create_task(
        long.result(on_delta=lambda c: c.deltas >= after_deltas and started.set()))
    await asyncio.wait_for(started.wait(), 120)  # the long reply is decoding now
    return long, short, long_task


@pytest.fixture(scope="module")
def plain_engine(default_lm):
    from dat.serve_engine import Engine

    engine = Engine(default_lm)
    assert engine.continuous
    return engine


def test_short_request_joining_a_long_one_is_answered_first(plain_engine):
    engine = plain_engine

    async def scenario(batcher):
        long, short, long_task = await long_then_short(batcher, engine, 60, 4, after_deltas=3)
        assert len(batcher.active) == 1
        short_reply = await short.result()
        assert not long_task.done()
        long_reply = await long_task
        alone = [await solo_reply(batcher, engine, PROMPTS[0], 60),
                 await solo_reply(batcher, engine, PROMPTS[1], 4)]
        return long, short, long_reply, short_reply, alone

    (long, short, long_reply, short_reply, alone), batcher = run_server(plain_engine, scenario)
    assert long_reply["completion_tokens"] > 30, "the long reply ended too soon to mean much"
    assert short.done_at < long.done_at
    assert short_reply["batch_size"] == 2 and long_reply["batch_size"] == 2
    assert batcher.stats["joined_running"] == 1
    assert [r["batch_size"] for r in alone] == [1, 1]
    assert long_reply["text"] == alone[0]["text"] and short_reply["text"] == alone[1]["text"]


@pytest.fixture(scope="module")
def steered_engines(default_lm, tmp_path_factory):
    """Engines steered by a random planner: action tokens (prefix) and a residual action."""
    from dat.agent import ActionSpace, Agent
    from dat.planner import Planner, UpMapping
    from dat.serve_engine import Engine

    lm = default_lm
    out = {}
    up = UpMapping.from_embedding_pca(lm, 64, 2)
    folder = Agent(up, Planner.for_model(lm)).save(tmp_path_factory.mktemp("tokens"))
    out["tokens"] = Engine(lm, Agent.load(folder, lm), str(folder))
    torch.manual_seed(0)
    space = ActionSpace(kind="residual", action_dim=16, layer=12, scale=0.5)
    folder = Agent.new(lm, space.pca(lm, PROMPTS), seed=0).save(tmp_path_factory.mktemp("residual"))
    out["residual"] = Engine(lm, Agent.load(folder, lm), str(folder))
    return out


@pytest.mark.parametrize("kind", ["plain", "tokens", "residual"])
def test_concurrent_clients_joining_at_different_times_get_their_solo_replies(
        kind, plain_engine, steered_engines):
    """Five clients, different prompts and limits, arriving at different times (steered and
    plain rows mixed on a steered server): nobody gets anybody else's tokens."""
    engine = plain_engine if kind == "plain" else steered_engines[kind]
    steered = kind != "plain"
    plan = [(PROMPTS[0], 40, 0.0, steered), (PROMPTS[1], 9, 0.25, steered),
            (PROMPTS[2], 25, 0.5, False), (PROMPTS[3], 14, 0.5, steered), (PROMPTS[4], 18, 1.1, steered)]

    async def scenario(batcher):
        async def one(messages, max_tokens, delay, st):
            await asyncio.sleep(delay)
            return await Client(batcher, engine, messages, max_tokens, st).result()

        together = await asyncio.gather(*(one(*p) for p in plan))
        alone = [await solo_reply(batcher, engine, m, n, st) for m, n, _, st in plan]
        return together, alone

    (together, alone), batcher = run_server(engine, scenario, max_wait_ms=20)
    assert [r["text"] for r in together] == [r["text"] for r in alone]
    assert [r["steered"] for r in together] == [p[3] for p in plan]
    assert len({r["text"] for r in together}) == len(plan)  # distinct: a mix-up would show
    assert max(r["batch_size"] for r in together) >= 3 and batcher.stats["joined_running"] >= 2
    assert all(r["batch_size"] == 1 for r in alone)
    if steered:  # the actions matter: a row that lost its own would be caught
        async def unsteered(batcher):
            return [await solo_reply(batcher, engine, m, n) for m, n, _, st in plan if st]

        plain = [r["text"] for r in run_server(engine, unsteered)[0]]
        assert plain != [r["text"] for r, p in zip(together, plan) if p[3]]


def test_cancelled_row_leaves_and_the_others_continue(plain_engine):
    engine = plain_engine

    async def scenario(batcher):
        clients = [Client(batcher, engine, PROMPTS[k], 40, stream=True) for k in (0, 2, 4)]
        victim = clients[1]

        def maybe_cancel(c):
            if c is victim and c.deltas == 3:
                c.job.cancelled = True

        tasks = [asyncio.create_task(c.result(on_delta=maybe_cancel)) for c in clients]
        got = await tasks[1]
        deadline = time.monotonic() + 5
        while len(batcher.active) > 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the worker updates `active` right after the step
        sizes_after = (len(batcher.active), sum(t.done() for t in tasks))
        rest = [await tasks[0], await tasks[2]]
        alone = [await solo_reply(batcher, engine, PROMPTS[k], 40) for k in (0, 4)]
        return got, sizes_after, rest, alone

    (got, sizes_after, rest, alone), batcher = run_server(engine, scenario)
    assert got["finish_reason"] == "cancelled" and got["completion_tokens"] < 40
    assert sizes_after == (2, 1)  # it left the batch at once; the other two decode on
    assert batcher.stats["cancelled"] == 1
    assert [r["text"] for r in rest] == [r["text"] for r in alone]
    assert all(r["completion_tokens"] > got["completion_tokens"] for r in rest)


def test_static_batching_still_available(plain_engine):
    """`batching="static"` keeps the drain-the-batch scheduler (the vLLM backend's path)."""
    engine = plain_engine

    async def scenario(batcher):
        long, short, long_task = await long_then_short(batcher, engine, 30, 3)
        short_reply = await short.result()
        return await long_task, short_reply, long, short

    (long_reply, short_reply, long, short), batcher = run_server(engine, scenario, batching="static")
    assert batcher.batching == "static" and batcher.stats["joined_running"] == 0
    assert long.done_at < short.done_at  # the newcomer waited for the batch to drain
    assert short_reply["batch_size"] == 1 and long_reply["batch_size"] == 1


# ---------------------------------------------------------------------- shared-prefix caching
SYSTEM = {"role": "system", "content": "You are a careful assistant. Answer in plain English, "
                                       "in full sentences, and never use lists or headings."}
SHARED = [[SYSTEM, {"role": "user", "content": q}] for q in
          ("Name a colour.", "Describe the sea in detail.", "Why is the sky blue?",
           "Tell me about owls.", "What is a prime number?", "Say hello.")]


def test_rows_taking_a_shared_prefix_match_solo_decoding(default_lm):
    """Rows sharing a system prompt join at different steps and take its keys/values from a
    PrefixStore (never past a steered row's insertion point): plain, infix action tokens,
    residual and sampled rows each get exactly their solo reply."""
    from dat.kvcache import PrefixStore, common_prefix

    lm = default_lm
    torch.manual_seed(0)
    emb = lm.model.get_input_embeddings().weight
    words = lm.tokenizer("Answer only in French, like a pirate.", add_special_tokens=False)["input_ids"]
    tokens = emb[words][None].detach().clone()
    vector = torch.randn(1, 1, lm.hidden_size) * 4.0
    layer = lm.num_layers // 2
    hot = Sampling(temperature=0.9, top_p=0.95, seed=7)
    rows = [Row(lm, SHARED[0], 12), Row(lm, SHARED[1], 20, tokens, "infix"),
            Row(lm, SHARED[2], 16, vector, ResidualAt(layer)), Row(lm, SHARED[3], 10, sampling=hot),
            Row(lm, SHARED[4], 8)]
    expected = [solo(lm, SHARED[0], 12), solo(lm, SHARED[1], 20, tokens, "infix"),
                solo(lm, SHARED[2], 16, vector, ResidualAt(layer)),
                solo(lm, SHARED[3], 10, temperature=0.9, top_p=0.95, seed=7), solo(lm, SHARED[4], 8)]
    assert expected[1] != solo(lm, SHARED[1], 20)  # the infix actions matter

    shared = common_prefix(rows[0].ids, rows[4].ids)
    assert shared > 20  # the system prompt and the user header
    store = PrefixStore(entries=2)
    used = []

    def batch(row):
        limit = None if row.insert_at is None else row.insert_at[0]
        entry, n = store.match([row.ids], [limit])
        used.append(n)
        b = lm.make_batch([row.ids], row.insert_at, row.actions, row.position,
                          reuse=[n] if n else None)
        return b, (entry.kv[:, :, :, :n] if n else None)

    rb = RunningBatch(lm)
    schedule = {0: [rows[0]], 2: [rows[1], rows[2]], 5: [rows[3]], 9: [rows[4]]}
    step, pending = 0, dict(schedule)
    while pending or len(rb):
        for row in pending.pop(step, []):
            b, prefix = batch(row)
            r = rb.add(b, [row.sampling], [row], prefix=prefix)
            if not len(store):  # the first row teaches the store the shared prefix
                store.put(row.ids[:shared], rb.row_kv(row, shared))
            if row.take(r.tokens[0]):
                rb.remove([row])
        if len(rb):
            r = rb.step()
            rb.remove([row for row, t in zip(r.rows, r.tokens) if row.take(t)])
        step += 1
    assert [row.tokens for row in rows] == expected
    infix = rows[1].insert_at[0]
    assert used == [0, infix, shared, shared, shared]  # stopped at the infix actions
    assert 0 < infix < shared


def plan_with_shared_prompt(steered: bool):
    """Requests sharing a system prompt, some steered, arriving at different times."""
    return [(SHARED[0], 30, 0.0, steered), (SHARED[1], 12, 0.0, False), (SHARED[2], 20, 0.3, steered),
            (SHARED[3], 9, 0.6, False), (SHARED[4], 16, 0.6, steered), (SHARED[5], 6, 1.0, steered)]


@pytest.mark.parametrize("kind", ["plain", "infix", "residual"])
def test_requests_sharing_a_prompt_prefix_reuse_it_and_get_their_solo_replies(
        kind, plain_engine, steered_engines, default_lm):
    """With the prefix cache on, requests sharing a system prompt take it from the cache
    (``prefix_cached_tokens`` counts it) and still get, token for token, the replies they get
    alone from a server without the cache."""
    from dat.agent import Agent
    from dat.planner import Planner
    from dat.serve_engine import Engine

    if kind == "plain":
        engine = plain_engine
    elif kind == "infix":  # action tokens after the system message: reuse stops there
        tokens = steered_engines["tokens"].agent
        engine = Engine(default_lm, Agent(tokens.up, Planner.for_model(default_lm), position="infix"))
    else:
        engine = steered_engines["residual"]
    plan = plan_with_shared_prompt(kind != "plain")

    async def together(batcher):
        async def one(messages, max_tokens, delay, st):
            await asyncio.sleep(delay)
            return await Client(batcher, engine, messages, max_tokens, st).result()

        first = await asyncio.gather(*(one(*p) for p in plan))
        again = [await solo_reply(batcher, engine, m, n, st) for m, n, _, st in plan[:2]]
        return first + again

    async def alone(batcher):
        return [await solo_reply(batcher, engine, m, n, st) for m, n, _, st in plan + plan[:2]]

    got, cached = run_server(engine, together, max_wait_ms=20)
    want, batcher = run_server(engine, alone, prefix_cache=False)
    assert [r["text"] for r in got] == [r["text"] for r in want]
    assert [r["steered"] for r in got] == [p[3] for p in plan + plan[:2]]
    assert max(r["batch_size"] for r in got) >= 3
    assert batcher.stats["prefix_cached_tokens"] == 0 and batcher.stats["prompt_tokens"] > 0
    system = len(default_lm.encode([SYSTEM, {"role": "user", "content": "x"}])) - 8
    # all but the first request or two take (most of) the system prompt from the cache
    assert cached.stats["prefix_cached_tokens"] >= 3 * system, cached.stats
    assert cached.stats["prompt_tokens"] == batcher.stats["prompt_tokens"]
