"""Continuous batching: one decode batch that rows join and leave between steps.

:class:`RunningBatch` keeps the keys and values of every live row in one preallocated slab
``[layers, 2, rows, kv_heads, columns, head_dim]``. All rows share the column of the next
token (right-aligned; each row's left padding is masked) and keep their own position ids,
residual vector and sampling generator, so a row is computed as it would be alone.

* :meth:`RunningBatch.add` prefills new rows, given as their own left-padded
  :class:`~dat.decoding.Batch` (``make_batch``), straight into free rows of the slab, with
  the batch's own action tokens or residual vectors; its first tokens come back at once.
  Given a shared ``prefix`` (keys/values of the first tokens of every new row, e.g. from a
  :class:`~dat.kvcache.PrefixStore`), it copies them into the columns just before the rows'
  tails and runs only the tails.
* :meth:`RunningBatch.step` feeds every live row its pending token and picks the next one.
* :meth:`RunningBatch.remove` takes rows out at once: the last row moves into the freed
  place, so leaving copies one row, not the cache.

The slab is laid out again (one copy of the live rows) only when it runs out of rows or
columns, or when leading columns that are padding for every live row make up half of it;
those columns are dropped then, so the cache never grows past the longest live row plus
headroom. Layout: docs/serve.md ("How requests are batched").
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from dat.decoding import Batch, ResidualVectors, StepLogprobs, sample_next, step_logprobs
from dat.errors import DatError
from dat.kvcache import cache_shape, slab_view_cache


@dataclass(frozen=True)
class Sampling:
    """How one row picks its tokens: argmax at ``temperature`` 0, else nucleus sampling from
    its own generator seeded with ``seed`` (None: a fresh random seed), so a seeded reply does
    not depend on the rows it shares the batch with."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class StepResult:
    """The tokens just picked for ``rows`` (the owners, in the batch's order at that step)."""

    rows: list
    tokens: list[int]
    logprobs: StepLogprobs | None


class RunningBatch:
    """Rows decoding together; rows join (:meth:`add`) and leave (:meth:`remove`) between
    steps (:meth:`step`).

    ``lm`` is a :class:`dat.steer.SteeredLM` with the ``hf`` decoder (``lm.model``,
    ``lm.decoder``, ``lm.steering``) whose model supports the slab cache
    (``lm.supports_prefix_cache``). Every row has an *owner* (any object, compared by
    identity) that names it in :meth:`remove` and in each :class:`StepResult`. Use it under
    ``torch.no_grad()``."""

    HEADROOM = 64  # spare columns at least, when the slab is laid out

    def __init__(self, lm):
        if not getattr(lm, "supports_prefix_cache", False):
            raise DatError(f"{getattr(lm, 'name', 'this model')}: continuous batching needs a model "
                           "whose cache is plain full attention (no sliding windows).")
        self.lm = lm
        self.model = lm.model
        self.decoder = lm.decoder
        self.layouts = 0  # how many times the slab was laid out (allocations)
        self.clear()

    # ------------------------------------------------------------------ state
    def clear(self) -> None:
        """Forget every row and free the slab."""
        self.owners: list = []
        self.residual: ResidualVectors | None = None  # read by ``lm.steering(self)``
        self._sampling: list[tuple[float, float, torch.Generator | None]] = []
        self._slab = self._mask = self._pos = self._next = self._vec = None
        self._n = 0  # filled columns (shared by all rows)
        self._cache = None  # the DynamicCache over the live rows; None: build before the next step

    def __len__(self) -> int:
        return len(self.owners)

    @property
    def columns(self) -> int:
        """Cached columns of the running batch (padding included)."""
        return self._n

    @property
    def capacity(self) -> tuple[int, int]:
        """``(rows, columns)`` of the slab (0, 0 when empty)."""
        return (0, 0) if self._slab is None else (self._slab.shape[2], self._slab.shape[4])

    def _lead(self) -> int:
        """Leading columns that are padding for every live row."""
        B = len(self.owners)
        if not B:
            return self._n
        used = self._mask[:B, :self._n].any(0)
        return int(used.nonzero()[0]) if bool(used.any()) else self._n

    def _relayout(self, rows: int, min_filled: int) -> None:
        """Copy the live rows into a fresh slab with room for ``rows`` rows, without the
        all-padding leading columns, and at least ``min_filled`` filled columns."""
        B, n = len(self.owners), self._n
        lead = self._lead()
        keep = n - lead
        filled = max(keep, min_filled)
        cols = filled + max(self.HEADROOM, filled // 2)
        R = 1 << max(0, rows - 1).bit_length()  # next power of two: few layouts as rows join
        layers, kv_heads, head_dim = cache_shape(self.model)
        weight = self.model.get_input_embeddings().weight
        dev, dtype = weight.device, weight.dtype
        # empty, not zeros: every column a live row can read is written below or by a forward
        slab = torch.empty(layers, 2, R, kv_heads, cols, head_dim, dtype=dtype, device=dev)
        mask = torch.zeros(R, cols, dtype=torch.long, device=dev)
        pos = torch.zeros(R, dtype=torch.long, device=dev)
        nxt = torch.zeros(R, dtype=torch.long, device=dev)
        vec = None if self._vec is None else torch.zeros(R, self._vec.shape[1], dtype=dtype, device=dev)
        off = filled - keep
        if B:
            slab[:, :, :B, :, :off] = 0  # masked, but multiplied by a softmax weight of 0
            slab[:, :, :B, :, off:filled] = self._slab[:, :, :B, :, lead:n]
            mask[:B, off:filled] = self._mask[:B, lead:n]
            pos[:B], nxt[:B] = self._pos[:B], self._next[:B]
            if vec is not None:
                vec[:B] = self._vec[:B]
        self._slab, self._mask, self._pos, self._next, self._vec = slab, mask, pos, nxt, vec
        self._n = filled
        self._cache = None
        self.layouts += 1

    # ------------------------------------------------------------------ sampling
    @staticmethod
    def _generator(s: Sampling, device) -> torch.Generator | None:
        if s.temperature <= 0:
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(int(s.seed) if s.seed is not None else secrets.randbits(63))
        return gen

    @staticmethod
    def _pick(logits: torch.Tensor, sampling: Sequence[tuple]) -> torch.Tensor:
        nxt = logits.argmax(-1)
        for i, (temperature, top_p, gen) in enumerate(sampling):
            if temperature > 0:
                nxt[i] = sample_next(logits[i:i + 1], temperature, top_p, gen)[0]
        return nxt

    # ------------------------------------------------------------------ rows in, rows out
    def add(self, batch: Batch, sampling: Sequence[Sampling], owners: Sequence,
            top_logprobs: int | None = None, prefix: torch.Tensor | None = None) -> StepResult:
        """Prefill ``batch`` (a ``make_batch`` result without a cache; its residual action,
        if any, applied) into new rows owned by ``owners``; return their first tokens.

        ``prefix`` (``[layers, 2, kv_heads, P, head_dim]``): the keys/values of the first
        ``P`` tokens, the same for every new row; ``batch`` then holds only the tails
        (``make_batch(..., reuse=[P] * rows)``: position ids from ``P`` on, and no action
        token or residual position before ``P``)."""
        b, T = batch.inputs_embeds.shape[:2]
        P = 0 if prefix is None else prefix.shape[3]
        if batch.cache is not None:
            raise DatError("RunningBatch.add takes a batch without a cache (no prefix caches).")
        if len(sampling) != b or len(owners) != b:
            raise DatError(f"{b} rows, but {len(sampling)} sampling settings and {len(owners)} owners.")
        res = batch.residual
        if res is not None and self.residual is not None and res.layer != self.residual.layer:
            raise DatError(f"residual actions at layer {res.layer} cannot join rows steered at "
                           f"layer {self.residual.layer}.")
        B = len(self.owners)
        R, cols = self.capacity
        if self._slab is None or B + b > R or T + P > self._n or self._n >= cols:
            self._relayout(B + b, T + P)
        n = self._n
        new = slice(B, B + b)
        start = n - T - P  # the prefix columns, then each row's left-padded tail up to column n
        self._slab[:, :, new, :, :start] = 0
        mask = batch.attention_mask
        if P:
            self._slab[:, :, new, :, start:n - T] = prefix[:, :, None].to(self._slab.dtype)
            mask = torch.cat([mask.new_ones(b, P), mask], dim=1)
        # the new rows' keys and values are written in place, right-aligned at column n
        cache = slab_view_cache(self.model, self._slab[:, :, new, :, start:], P)
        with self.lm.steering(batch):
            logits = self.decoder.next_logits(
                inputs_embeds=batch.inputs_embeds, attention_mask=mask,
                position_ids=batch.position_ids, use_cache=True, **self.decoder.cache_kwargs(cache))
        dev = logits.device
        rows = [(s.temperature, s.top_p, self._generator(s, dev)) for s in sampling]
        nxt = self._pick(logits, rows)
        lps = None if top_logprobs is None else step_logprobs(logits, nxt, top_logprobs)
        # nothing is registered before the forward succeeded: a failure leaves the batch intact
        self._mask[new] = 0
        self._mask[new, start:n] = mask
        self._pos[new] = batch.position_ids[:, -1] + 1
        self._next[new] = nxt
        if res is not None and self._vec is None:
            self._vec = torch.zeros(self._slab.shape[2], res.vectors.shape[1], dtype=self._slab.dtype,
                                    device=self._slab.device)
            self.residual = ResidualVectors(res.layer, self._vec[:0], None)
        if self._vec is not None:  # unsteered rows carry zero vectors (adding 0 changes nothing)
            self._vec[new] = 0 if res is None else res.vectors.to(self._vec.dtype)
        self.owners += list(owners)
        self._sampling += rows
        self._cache = None
        return StepResult(list(owners), nxt.tolist(), lps)

    def step(self, top_logprobs: int | None = None) -> StepResult:
        """Feed every live row its pending token; return the next token of each."""
        B = len(self.owners)
        if not B:
            raise DatError("RunningBatch.step: no rows.")
        if self._n >= self.capacity[1]:
            self._relayout(B, 0)
        n = self._n
        if self._cache is None:
            self._cache = slab_view_cache(self.model, self._slab[:, :, :B], n)
        self._mask[:B, n] = 1
        if self.residual is not None:
            self.residual.vectors = self._vec[:B]
        with self.lm.steering(self):
            logits = self.decoder.next_logits(
                input_ids=self._next[:B, None], attention_mask=self._mask[:B, :n + 1],
                position_ids=self._pos[:B, None], use_cache=True,
                **self.decoder.cache_kwargs(self._cache))
        self._n = n + 1
        self._pos[:B] += 1
        nxt = self._pick(logits, self._sampling)
        self._next[:B] = nxt
        lps = None if top_logprobs is None else step_logprobs(logits, nxt, top_logprobs)
        return StepResult(list(self.owners), nxt.tolist(), lps)

    def row_kv(self, owner, length: int) -> torch.Tensor:
        """The keys/values of the first ``length`` tokens of ``owner``'s row (its unmasked
        columns in order): ``[layers, 2, kv_heads, length, head_dim]``, a copy."""
        i = next(k for k, o in enumerate(self.owners) if o is owner)
        cols = self._mask[i, :self._n].nonzero().squeeze(-1)[:length]
        if len(cols) < length:
            raise DatError(f"row holds {len(cols)} tokens, fewer than the {length} asked for.")
        return self._slab[:, :, i].index_select(3, cols)

    def remove(self, owners: Iterable) -> None:
        """Take the rows of ``owners`` out of the batch now."""
        gone = {id(o) for o in owners}
        dead = [i for i, o in enumerate(self.owners) if id(o) in gone]
        if not dead:
            return
        n = self._n
        for i in reversed(dead):  # highest first: the last row is always a live one
            last = len(self.owners) - 1
            if i != last:
                self._slab[:, :, i, :, :n] = self._slab[:, :, last, :, :n]
                self._mask[i] = self._mask[last]
                self._pos[i], self._next[i] = self._pos[last], self._next[last]
                if self._vec is not None:
                    self._vec[i] = self._vec[last]
                self.owners[i], self._sampling[i] = self.owners[last], self._sampling[last]
            self.owners.pop()
            self._sampling.pop()
        self._cache = None
        if not self.owners:
            self.clear()
        elif self._lead() >= max(self.HEADROOM, n // 2):  # mostly padding now: drop it
            self._relayout(len(self.owners), 0)
