"""Batched decoding with a KV cache: the loop every ``hf`` generation runs.

:class:`Batch` is what :meth:`dat.steer.SteeredLM.make_batch` builds (left-padded embeddings
with the action tokens in place); :class:`KVDecoder` decodes it token by token for one
transformers causal LM. :func:`trim_replies` and :class:`StepLogprobs` are shared with the vLLM
backend, whose decoder keeps the same contract.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dat.kvcache import slab_cache


@dataclass
class ResidualVectors:
    """A residual action on a batch: vectors ``[B, hidden]`` added to the output of decoder
    layer ``layer`` and, for the next forward pass, which of its columns receive them
    (``None``: every column, as in decoding steps)."""

    layer: int
    vectors: torch.Tensor
    mask: torch.Tensor | None


@dataclass
class Batch:
    """Left-padded model inputs of one batched call, and what decoding it left behind."""

    inputs_embeds: torch.Tensor  # [B, T, H]
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    lengths: list[int]  # unpadded length of each row (cached prefix and action tokens included)
    cache: object | None = None  # a slab cache holding the rows' cached prefixes
    # filled by decoding: every token picked per row (stop tokens and pads included)
    tokens: list[list[int]] | None = None
    residual: ResidualVectors | None = None  # a residual-stream action, applied by every forward


@dataclass
class StepLogprobs:
    """Log-probabilities of one decoding step, for every row (plain lists, on the CPU)."""

    logprob: list[float]  # of the chosen token
    top_ids: list[list[int]]  # the k most likely tokens, most likely first
    top_logprobs: list[list[float]]


# on_step(step, tokens, logprobs) -> indices of rows to finish now (or None)
OnStep = Callable[[int, list[int], StepLogprobs | None], Iterable[int] | None]

HEAD_BLOCK, HEAD_BLOCK_ROWS = 1024, 8  # measured on the default model: no gain below 8 rows


def head_logits(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """``head(hidden)`` for ``[..., hidden]`` states. With many rows the vocabulary is done in
    blocks of columns: each logit is the same dot product, but a block's output stays in
    cache, which makes a large CPU batch's head faster."""
    if hidden.shape[:-1].numel() < HEAD_BLOCK_ROWS:
        return head(hidden)
    w, b = head.weight, head.bias
    return torch.cat([F.linear(hidden, w[i:i + HEAD_BLOCK], None if b is None else b[i:i + HEAD_BLOCK])
                      for i in range(0, w.shape[0], HEAD_BLOCK)], dim=-1)


def last_position(hidden: torch.Tensor) -> torch.Tensor:
    """The last position ``[B, 1, H]`` of decoder states ``[B, T, H]``, laid out for the head.

    float32 keeps the strided slice the model's own forward takes (MKL's result can depend on
    the layout, and the exact head must match the model's bit for bit). Other dtypes get a
    contiguous copy: a strided bf16 slice sends the head to a batched product that copies the
    whole weight once per row (measured: 1.4 s per 32-row prefill on the default model)."""
    last = hidden[:, -1:, :]
    return last if hidden.dtype == torch.float32 else last.contiguous()


def trim_replies(rows: list[list[int]], cut: list[int | None], stop_set: set[int]
                 ) -> tuple[list[list[int]], list[bool]]:
    """Each decoded row cut at ``cut[i]`` tokens (rows finished by ``on_step``) and before its
    first stop token; also whether a stop token ended it. Shared by every backend's decoder."""
    new, stopped = [], []
    for row, c in zip(rows, cut):
        row = row if c is None else row[:c]
        end = next((k for k, t in enumerate(row) if t in stop_set), None)
        new.append(row if end is None else row[:end])
        stopped.append(end is not None)
    return new, stopped


def base_model(model):
    """The decoder stack of a transformers causal LM (the part without the LM head)."""
    return getattr(model, model.base_model_prefix)


class KVDecoder:
    """Next-token logits and batched KV-cache decoding for one transformers causal LM.

    Whether the LM head may run blockwise (:func:`head_logits`) is decided once, on a real
    forward pass (:meth:`head_is_blockwise`), and kept in :attr:`blockwise_head`."""

    def __init__(self, model):
        self.model = model
        # transformers >= 5.2x renamed `past_key_values` to `cache`.
        params = inspect.signature(model.forward).parameters
        self.cache_keyword = "cache" if "cache" in params else "past_key_values"
        self.blockwise_head: bool | None = None  # None: not decided yet

    def cache_kwargs(self, cache) -> dict:
        """The keyword argument that hands ``cache`` to the model's forward ({} for None)."""
        return {} if cache is None else {self.cache_keyword: cache}

    def decide_head(self) -> None:
        """Run the one-off head check now (it runs a forward pass, so not under a hook)."""
        if self.blockwise_head is None:
            self.blockwise_head = self.head_is_blockwise()

    def head_is_blockwise(self) -> bool:
        """True when the blockwise head gives exactly the model's own logits: a plain linear
        head on the CPU, in a model that changes nothing after it (soft-capping, scaling)."""
        head = self.model.get_output_embeddings()
        device = self.model.get_input_embeddings().weight.device
        if device.type != "cpu" or type(head) is not torch.nn.Linear:
            return False
        vocab = head.weight.shape[0]
        ids = torch.arange(HEAD_BLOCK_ROWS * 2, device=device).reshape(HEAD_BLOCK_ROWS, 2) * 7919 % vocab
        with torch.no_grad():
            own = self.model(input_ids=ids, logits_to_keep=1).logits[:, -1, :]
            hidden = last_position(base_model(self.model)(input_ids=ids).last_hidden_state)
            mine = head_logits(head, hidden)[:, -1, :]
        if own.dtype == torch.float32:
            return torch.equal(own, mine)
        # bf16/fp16 round differently in another product layout; a soft-cap or scale would
        # still show as a large difference
        return torch.allclose(own.float(), mine.float(), rtol=2e-2, atol=2e-2 * float(own.abs().max()))

    def next_logits(self, **inputs) -> torch.Tensor:
        """Next-token logits ``[B, vocab]`` of the last position of ``inputs``."""
        self.decide_head()
        if not self.blockwise_head:
            return self.model(**inputs, logits_to_keep=1).logits[:, -1, :]
        hidden = last_position(base_model(self.model)(**inputs).last_hidden_state)
        return head_logits(self.model.get_output_embeddings(), hidden)[:, -1, :]

    def decode(self, batch: Batch, max_new_tokens: int, temperature: float, top_p: float,
               seed: int | None, *, stop_token_ids: list[int], pad_token_id: int,
               preallocate: bool, top_logprobs: int | None = None,
               on_step: OnStep | None = None) -> tuple[list[list[int]], list[bool]]:
        """Decode ``batch`` for at most ``max_new_tokens`` steps; return each row's new tokens
        (stop token excluded) and whether a stop token ended it.

        ``on_step(step, tokens, logprobs)`` (optional) is called after every step with the
        new token of each row (a list; rows already finished get ``pad_token_id``) and, when
        ``top_logprobs`` is not None, a :class:`StepLogprobs`. It may return indices of rows
        to finish now (their last token kept, ``stopped`` False). Decoding ends early once
        every row is finished. ``preallocate``: without a cache in ``batch``, decode into a
        preallocated slab (no copy of the whole cache per step) instead of a DynamicCache.
        """
        from transformers import DynamicCache

        embeddings = self.model.get_input_embeddings().weight
        dev, dtype = embeddings.device, embeddings.dtype
        gen = None
        if temperature > 0:
            gen = torch.Generator(device=dev)
            gen.manual_seed(0 if seed is None else int(seed))
        B, T = batch.inputs_embeds.shape[:2]
        stop = torch.tensor(stop_token_ids, dtype=torch.long, device=dev)
        if batch.cache is None:
            batch.cache = (slab_cache(self.model, None, None, B, T + max_new_tokens, dtype, dev)[0]
                           if preallocate else DynamicCache())
        cache = self.cache_kwargs(batch.cache)
        mask = batch.attention_mask
        pos = batch.position_ids[:, -1:]
        logits = self.next_logits(inputs_embeds=batch.inputs_embeds, attention_mask=mask,
                                  position_ids=batch.position_ids, use_cache=True, **cache)
        if batch.residual is not None:
            batch.residual.mask = None  # every decoding step is a reply position
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        cut: list[int | None] = [None] * B  # rows finished by on_step: number of tokens kept
        steps = []
        for step in range(max_new_tokens):
            nxt = _sample(logits, temperature, top_p, gen)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            steps.append(nxt)
            done = done | torch.isin(nxt, stop)
            if on_step is not None:
                lps = None if top_logprobs is None else _step_logprobs(logits, nxt, top_logprobs)
                finish = on_step(step, nxt.tolist(), lps)
                for i in finish or ():
                    if not bool(done[i]):
                        cut[i] = step + 1
                        done[i] = True
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            pos = pos + 1
            logits = self.next_logits(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                                      use_cache=True, **cache)
        batch.attention_mask = mask  # now covering the fed decoding steps too
        tokens = torch.stack(steps, dim=1).tolist()
        batch.tokens = tokens
        return trim_replies(tokens, cut, set(stop_token_ids))


def _step_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> StepLogprobs:
    lp = torch.log_softmax(logits.float(), dim=-1)
    picked = lp.gather(-1, chosen[:, None]).squeeze(-1).tolist()
    if k > 0:
        vals, idx = lp.topk(k, dim=-1)
        return StepLogprobs(picked, idx.tolist(), vals.tolist())
    return StepLogprobs(picked, [[] for _ in picked], [[] for _ in picked])


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen) -> torch.Tensor:
    """The next token of each row: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.float().argmax(-1)  # float32's argmax is 1.4x bf16's (bf16 logits: fast mode)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row of ``logits`` ``[B, vocab]`` as :meth:`KVDecoder.decode`
    picks it: argmax at ``temperature`` 0, else nucleus sampling drawn from ``generator``."""
    return _sample(logits, temperature, top_p, generator)


def step_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> StepLogprobs:
    """Log-probabilities of the ``chosen`` tokens under ``logits`` (raw, before temperature
    and top-p) and the ``k`` most likely tokens of each row."""
    return _step_logprobs(logits, chosen, k)
