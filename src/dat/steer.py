"""SteeredLM: a frozen causal LM steered by *dialogue action tokens* or residual vectors.

Action tokens are embeddings inserted into the templated prompt at the ``prefix``, ``infix``
(after the system message) or ``suffix``; a :class:`ResidualAt` action adds one vector per row
to a decoder layer's output instead. Batches are left-padded with exact masks and position ids,
so every row is computed as it would be alone. Decoding itself is :mod:`dat.decoding`; the
positions and the batching are described in docs/actions.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from dat.decoding import Batch, KVDecoder, OnStep, ResidualVectors, base_model
from dat.errors import ContextLengthError, DatError
from dat.kvcache import PrefixCache, slab_cache, supports_slab, take
from dat.models import DEFAULT_MODEL, load_model, resolve_dtype

TokenPosition = Literal["prefix", "infix", "suffix"]
POSITIONS = ("prefix", "infix", "suffix")
RESIDUAL_POSITIONS = ("reply", "all")


@dataclass(frozen=True)
class ResidualAt:
    """A residual-stream action: ``actions[:, 0]`` is added to the output of decoder layer
    ``layer`` (0-based) at ``positions``: ``"reply"``, the positions that predict reply tokens
    (the prompt's KV cache stays valid), or ``"all"``, every position (the prompt is
    re-encoded)."""

    layer: int
    positions: str = "reply"

    def __post_init__(self):
        if not isinstance(self.layer, int) or isinstance(self.layer, bool):
            raise DatError(f"ResidualAt.layer must be an integer, got {self.layer!r}")
        if self.positions not in RESIDUAL_POSITIONS:
            raise DatError(f"ResidualAt.positions must be one of {RESIDUAL_POSITIONS}, "
                           f"got {self.positions!r}")


Position = TokenPosition | ResidualAt


def position_name(position: Position | None) -> str | None:
    """A JSON-friendly name: "prefix" / "infix" / "suffix", or "residual@<layer>/<positions>"."""
    if isinstance(position, ResidualAt):
        return f"residual@{position.layer}/{position.positions}"
    return position


Message = dict
Dialogue = Sequence[Message]

# End-of-turn markers of common chat templates; whichever exist in a vocabulary stop generation.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


@dataclass
class Generation:
    """What one batched generation call produced."""

    texts: list[str]
    token_ids: list[list[int]]  # new tokens of each row, stop token excluded
    prompt_tokens: list[int]  # prompt length of each row, action tokens included
    stopped: list[bool]  # True where generation ended at an end-of-turn token
    # With ``logprobs=k``: per row, per new token, ``(token_id, logprob, [(id, logprob)] * k)``
    # under the model's raw distribution (before temperature / top-p).
    logprobs: list[list[tuple[int, float, list[tuple[int, float]]]]] | None = None

    @property
    def num_generated(self) -> int:
        return sum(len(t) + int(s) for t, s in zip(self.token_ids, self.stopped))


class PreparedPrompts(NamedTuple):
    """Checked dialogues and actions, their prompt token ids and where the actions go."""

    dialogues: list
    ids: list[list[int]]
    insert_at: list[int] | None  # None without actions
    actions: torch.Tensor | None


class SteeredLM:
    """A frozen causal LM that can be steered by action embeddings.

    >>> lm = SteeredLM.from_pretrained("default")
    >>> s = lm.state(dialogues)                       # [B, hidden] float32
    >>> texts = lm.generate(dialogues, actions=a)     # a: [B, L, hidden]
    """

    def __init__(
        self,
        model,
        tokenizer,
        name: str | None = None,
        max_context: int | None = None,
        truncation: Literal["error", "left"] = "error",
    ):
        if truncation not in ("error", "left"):
            raise DatError(f"truncation must be 'error' or 'left', got {truncation!r}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise DatError(f"The tokenizer of {name or 'this model'} has no chat template.")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "model")
        limit = getattr(model.config, "max_position_embeddings", None) or 4096
        self.max_context = int(max_context or limit)
        self.truncation = truncation
        self.eos_token_ids = self._stop_tokens()
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eos_token_ids[0]
        self.supports_prefix_cache = supports_slab(model)
        self.decoder = KVDecoder(model)
        self.precision = None  # set by from_pretrained: a dat.precision.PrecisionChoice

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = DEFAULT_MODEL,
        device: str = "auto",
        dtype: str = "auto",
        max_context: int | None = None,
        truncation: Literal["error", "left"] = "error",
        precision: str = "exact",
    ) -> SteeredLM:
        """``precision="fast"`` (:mod:`dat.precision`): bf16 where the hardware has it natively,
        int8 linear layers otherwise; an explicit ``dtype`` other than ``"auto"`` wins."""
        from dat.cpu_kernels import use_cpu_kernels
        from dat.models import resolve_device
        from dat.precision import choose, quantize_linear

        choice = choose(precision, resolve_device(device))
        if precision != "exact" and dtype == "auto":
            dtype = choice.dtype
        elif choice.int8_linear and resolve_dtype(dtype) != torch.float32:
            raise DatError(f"--precision {precision} quantises float32 linear layers; "
                           f"it cannot be combined with dtype {dtype}.")
        model, tokenizer, name = load_model(name_or_path, device=device, dtype=dtype)
        if choice.int8_linear:
            model = quantize_linear(model)
        elif choice.packed_linear and resolve_dtype(dtype) == torch.bfloat16:
            use_cpu_kernels(model)
        elif choice.packed_linear:  # an explicit non-bf16 dtype: the kernels do not apply
            choice = replace(choice, packed_linear=False)
        lm = cls(model, tokenizer, name=name, max_context=max_context, truncation=truncation)
        lm.precision = choice
        return lm

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def _stop_tokens(self) -> list[int]:
        ids: list[int] = []
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        vocab = self.tokenizer.get_vocab()
        ids += [vocab[t] for t in _END_OF_TURN if t in vocab]
        ids = list(dict.fromkeys(int(i) for i in ids))
        if not ids:
            raise DatError(f"{self.name}: no end-of-sequence token known; cannot stop generation.")
        return ids

    # ------------------------------------------------------------------ prompts
    def _template(self, messages: Dialogue, generation_prompt: bool) -> list[int]:
        out = self.tokenizer.apply_chat_template(
            list(messages), tokenize=True, add_generation_prompt=generation_prompt,
            return_dict=False,
        )
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return [int(t) for t in out]

    def encode(self, dialogue: Dialogue, reserve: int = 0) -> list[int]:
        """Token ids of the templated prompt (generation prompt added), fitted to the context
        limit with ``reserve`` tokens left over (for action tokens and the reply)."""
        _check_dialogue(dialogue)
        ids = self._template(dialogue, True)
        if len(ids) + reserve <= self.max_context:
            return ids
        if self.truncation == "left":
            first = 1 if dialogue[0]["role"] == "system" else 0
            kept = list(dialogue)
            while len(kept) - first > 1:
                del kept[first]
                try:
                    ids = self._template(kept, True)
                except Exception:  # some templates insist on alternating roles
                    continue
                if len(ids) + reserve <= self.max_context:
                    return ids
        raise ContextLengthError(
            f"Prompt of {len(ids)} tokens plus {reserve} reserved (action tokens + new tokens) "
            f"exceeds the context limit of {self.max_context} tokens"
            + ("" if self.truncation == "left" else "; pass truncation='left' to drop the oldest turns")
            + "."
        )

    def insertion_point(self, dialogue: Dialogue, ids: list[int], position: Position) -> int:
        """Index in ``ids`` before which the action tokens go; for a :class:`ResidualAt`, the
        first position that receives the vector (nothing before it may come from a cache)."""
        if isinstance(position, ResidualAt):
            return len(ids) - 1 if position.positions == "reply" else 0
        if position == "prefix":
            bos = self.tokenizer.bos_token_id
            return 1 if bos is not None and ids and ids[0] == bos else 0
        if position == "suffix":
            return len(ids)
        if position == "infix":
            if not dialogue or dialogue[0].get("role") != "system":
                raise DatError(
                    "position='infix' inserts the action tokens after the system message, "
                    "but this dialogue has no system message (first role: "
                    f"{dialogue[0].get('role') if dialogue else None!r})."
                )
            try:
                system_only = self._template(dialogue[:1], False)
            except Exception as exc:
                raise DatError(f"The chat template of {self.name} cannot render a system message alone "
                               f"({exc}); use position='prefix' or 'suffix'.") from exc
            n = 0
            for a, b in zip(system_only, ids):
                if a != b:
                    break
                n += 1
            if n == 0:
                raise DatError(f"Could not locate the system message in the template of {self.name}.")
            return n
        raise DatError(f"position must be one of {POSITIONS}, got {position!r}")

    # ------------------------------------------------------------------ batching
    @property
    def num_layers(self) -> int:
        return len(base_model(self.model).layers)

    def check_position(self, position: Position) -> None:
        """A clear error for a position this model cannot take."""
        if isinstance(position, ResidualAt):
            if not 0 <= position.layer < self.num_layers:
                raise DatError(f"residual layer {position.layer} is outside {self.name}, which has "
                               f"{self.num_layers} decoder layers (valid: 0 .. {self.num_layers - 1}).")
        elif position not in POSITIONS:
            raise DatError(f"position must be one of {POSITIONS} or a ResidualAt, got {position!r}")

    def _check_actions(self, actions: torch.Tensor | None, batch: int,
                       position: Position = "prefix") -> torch.Tensor | None:
        if actions is None:
            return None
        if isinstance(position, ResidualAt) and isinstance(actions, torch.Tensor) and actions.dim() == 2:
            actions = actions[:, None, :]
        if isinstance(position, ResidualAt) and actions.dim() == 3 and actions.shape[1] != 1:
            raise DatError(f"a residual action is one vector per row ([batch, 1, hidden]), got "
                           f"{list(actions.shape)}.")
        if not isinstance(actions, torch.Tensor) or not actions.is_floating_point():
            raise DatError("actions must be a float tensor of shape [batch, n_tokens, hidden].")
        if actions.dim() != 3 or actions.shape[0] != batch or actions.shape[2] != self.hidden_size:
            raise DatError(
                f"actions must have shape [batch={batch}, n_tokens, hidden={self.hidden_size}], "
                f"got {list(actions.shape)}."
            )
        if actions.shape[1] == 0:
            raise DatError("actions has zero action tokens; pass actions=None for an unsteered model.")
        return actions

    def make_batch(
        self,
        ids: list[list[int]],
        insert_at: list[int] | None = None,
        actions: torch.Tensor | None = None,
        position: Position | None = None,
        *,
        caches: list[PrefixCache] | None = None,
        reuse: list[int] | None = None,
        capacity: int = 0,
    ) -> Batch:
        """Left-padded embeddings, mask and position ids of the token rows ``ids``, with the
        action vectors inserted at ``insert_at`` (see :meth:`insertion_point`). Decode it with
        ``with lm.steering(batch): lm.decode(batch, ...)`` so that a residual action is applied.

        With a :class:`ResidualAt` ``position``, nothing is inserted: ``actions[:, 0]`` is added
        to that layer's output from ``insert_at[i]`` on, by every forward pass of the batch.

        With ``caches``, the first ``reuse[i]`` tokens of row ``i`` come from ``caches[i]``
        (``insert_at[i] >= reuse[i]``) and only the rest is embedded; the batch then carries a
        slab cache with room for ``capacity`` more positions after the new tokens.
        """
        residual = None
        if isinstance(position, ResidualAt) and actions is not None:
            residual, actions = actions[:, 0], None
        n_act = 0 if actions is None else actions.shape[1]
        start = reuse or [0] * len(ids)
        tails = [x[s:] for x, s in zip(ids, start)]
        lengths = [len(x) + n_act for x in tails]
        B, T = len(ids), max(lengths)
        tokens = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        is_action = torch.zeros((B, T), dtype=torch.bool)
        mask = torch.zeros((B, T), dtype=torch.long)
        for i, row in enumerate(tails):
            begin = T - lengths[i]
            mask[i, begin:] = 1
            if n_act:
                p = insert_at[i] - start[i]
                tokens[i, begin:begin + p] = torch.tensor(row[:p], dtype=torch.long)
                is_action[i, begin + p:begin + p + n_act] = True
                tokens[i, begin + p + n_act:] = torch.tensor(row[p:], dtype=torch.long)
            else:
                tokens[i, begin:] = torch.tensor(row, dtype=torch.long)
        dev = self.device
        tokens, mask, is_action = tokens.to(dev), mask.to(dev), is_action.to(dev)
        embeds = self.model.get_input_embeddings()(tokens)
        if n_act:
            b_idx, t_idx = is_action.nonzero(as_tuple=True)  # row-major: matches actions' order
            embeds = embeds.index_put((b_idx, t_idx), actions.to(dev, embeds.dtype).reshape(-1, embeds.shape[-1]))
        offset = torch.tensor(start, dtype=torch.long, device=dev)[:, None]
        position_ids = offset + (mask.cumsum(-1) - 1).clamp(min=0)
        steer = None
        if residual is not None:
            cols = torch.arange(T, device=dev)[None, :]
            first = torch.tensor([T - lengths[i] + insert_at[i] - start[i] for i in range(B)],
                                 device=dev)[:, None]
            steer = ResidualVectors(position.layer, residual.to(dev, embeds.dtype), cols >= first)
        cache = None
        if caches is not None:
            cache, past_mask = slab_cache(self.model, caches, start, B, T + capacity, self.dtype, dev)
            mask = torch.cat([past_mask, mask], dim=1)
        return Batch(embeds, mask, position_ids, [len(x) + n_act for x in ids], cache,
                     residual=steer)

    @contextmanager
    def steering(self, batch: Batch):
        """Within this block, forward passes of ``batch`` get its residual action (if any).
        The hook is removed on exit, also when the block raises."""
        steer = batch.residual
        if steer is None:
            yield
            return
        self.decoder.decide_head()  # its one-off check runs a forward: not under the hook

        def add(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            vec = steer.vectors[:, None, :]
            if steer.mask is not None:
                vec = vec * steer.mask[:, -hidden.shape[1]:, None].to(hidden.dtype)
            hidden = hidden + vec
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = base_model(self.model).layers[steer.layer].register_forward_hook(add)
        try:
            yield
        finally:
            handle.remove()

    def _reuse(self, caches, ids, insert_at) -> list[int]:
        """Tokens of each row taken from its prefix cache (never past the action tokens)."""
        return [c.reusable(x, None if insert_at is None else p)
                for c, x, p in zip(caches, ids, insert_at or [None] * len(ids))]

    @staticmethod
    def _store(caches, batch: Batch, ids: list[list[int]]) -> None:
        """Keep in each row's prefix cache the keys/values of ``ids[i]``: the valid slab
        columns of row ``i`` in order (cached prefix, new tokens, fed decoding steps)."""
        for i, (c, row) in enumerate(zip(caches, ids)):
            cols = batch.attention_mask[i].nonzero().squeeze(-1)[:len(row)]
            c.ids, c.kv = list(row[:len(cols)]), take(batch.cache, i, cols)

    def prepare(self, dialogues: Sequence[Dialogue], actions: torch.Tensor | None,
                position: Position, reserve: int) -> PreparedPrompts:
        """Check a batch call's dialogues, actions and position; template each prompt with
        ``reserve`` tokens (plus the action tokens) left in the context, and find where the
        actions go."""
        dialogues = _check_batch(dialogues)
        self.check_position(position)
        actions = self._check_actions(actions, len(dialogues), position)
        n_act = 0 if actions is None or isinstance(position, ResidualAt) else actions.shape[1]
        ids = [self.encode(d, reserve=reserve + n_act) for d in dialogues]
        insert_at = None
        if actions is not None:
            insert_at = [self.insertion_point(d, x, position) for d, x in zip(dialogues, ids)]
        return PreparedPrompts(dialogues, ids, insert_at, actions)

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def state(self, dialogues: Sequence[Dialogue], batch_size: int = 32,
              caches: list[PrefixCache] | None = None) -> torch.Tensor:
        """Final-layer hidden state of the last prompt token, without action tokens.

        With ``caches`` (one :class:`PrefixCache` per dialogue, updated in place), only the
        tokens after each dialogue's cached prefix are encoded.
        Returns float32 ``[B, hidden]`` on the CPU.
        """
        dialogues = _check_batch(dialogues)
        caches = self._check_caches(caches, len(dialogues))
        ids = [self.encode(d) for d in dialogues]
        out = []
        for lo in range(0, len(ids), batch_size):
            part = None if caches is None else caches[lo:lo + batch_size]
            out.append(self._last_hidden(ids[lo:lo + batch_size], part)[:, -1].float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def prefill(self, ids: list[int]) -> PrefixCache:
        """A :class:`PrefixCache` holding the keys and values of the token ids ``ids``."""
        cache = PrefixCache()
        self._last_hidden([ids], [cache])
        return cache

    def _last_hidden(self, ids: list[list[int]], caches: list[PrefixCache] | None) -> torch.Tensor:
        """Final-layer hidden states of the (new) tokens of ``ids``; with ``caches``, only the
        tokens after each cached prefix are run and the caches then hold all of ``ids``."""
        reuse = None if caches is None else self._reuse(caches, ids, None)
        b = self.make_batch(ids, caches=caches, reuse=reuse)
        h = base_model(self.model)(inputs_embeds=b.inputs_embeds, attention_mask=b.attention_mask,
                                   position_ids=b.position_ids, use_cache=b.cache is not None,
                                   **self.decoder.cache_kwargs(b.cache)).last_hidden_state
        if caches is not None:
            self._store(caches, b, ids)
        return h

    def _check_caches(self, caches, n: int) -> list[PrefixCache] | None:
        if caches is None or not self.supports_prefix_cache:
            return None  # models with sliding-window or other special caches: encode in full
        if len(caches) != n or not all(isinstance(c, PrefixCache) for c in caches):
            raise DatError(f"caches must be a list of {n} PrefixCache objects, one per dialogue.")
        return list(caches)

    def generate(self, dialogues: Sequence[Dialogue], actions: torch.Tensor | None = None,
                 position: Position = "prefix", max_new_tokens: int = 48, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = 0,
                 caches: list[PrefixCache] | None = None) -> list[str]:
        """Reply of the model to each dialogue (new text only), steered by ``actions``; the
        arguments are those of :meth:`generate_detailed`."""
        return self.generate_detailed(dialogues, actions, position, max_new_tokens,
                                      temperature, top_p, seed, caches=caches).texts

    @torch.no_grad()
    def generate_detailed(
        self,
        dialogues: Sequence[Dialogue],
        actions: torch.Tensor | None = None,
        position: Position = "prefix",
        max_new_tokens: int = 48,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = 0,
        logprobs: int | None = None,
        ignore_eos: bool = False,
        caches: list[PrefixCache] | None = None,
    ) -> Generation:
        """The reply to each dialogue, with token ids and counts.

        ``actions`` ``[B, n_tokens, hidden]`` go in at ``position`` (a residual action takes
        ``[B, 1, hidden]`` or ``[B, hidden]``). Sampling: greedy at ``temperature`` 0, else
        nucleus sampling with ``top_p``, reproducible for a given ``seed``. ``logprobs=k`` also
        returns the log-probability of each new token and the ``k`` most likely alternatives.
        ``ignore_eos`` always generates ``max_new_tokens`` tokens (for benchmarks).
        With ``caches`` (one :class:`PrefixCache` per dialogue), each prompt's cached prefix
        is reused up to the action tokens; unsteered calls also store the prompt and the
        reply in the cache, so the next turn encodes only what is new."""
        self.check_position(position)
        if max_new_tokens < 1:
            raise DatError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise DatError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        _, ids, insert_at, actions = self.prepare(dialogues, actions, position, max_new_tokens)
        caches = self._check_caches(caches, len(ids))
        reuse = None if caches is None else self._reuse(caches, ids, insert_at)
        batch = self.make_batch(ids, insert_at, actions, position, caches=caches, reuse=reuse,
                                capacity=max_new_tokens)
        trace = None
        if logprobs is not None:
            trace = [[] for _ in ids]

            def record(step, tokens, lps):
                for i, row in enumerate(trace):
                    row.append((int(tokens[i]), lps.logprob[i], list(zip(lps.top_ids[i], lps.top_logprobs[i]))))

        with self.steering(batch):
            new, stopped = self.decode(batch, max_new_tokens, temperature, top_p, seed,
                                       top_logprobs=logprobs,
                                       on_step=record if trace is not None else None,
                                       ignore_eos=ignore_eos)
        texts = [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        if caches is not None and actions is None:
            # the reply tokens fed back during decoding are part of the next prompt
            self._store(caches, batch, [x + t[:len(n) + int(st)]
                                        for x, t, n, st in zip(ids, batch.tokens, new, stopped)])
        if trace is not None:  # the end-of-turn token is not part of the reply
            trace = [row[:len(t)] for row, t in zip(trace, new)]
        return Generation(texts, new, batch.lengths, stopped, trace)

    def loss(
        self,
        dialogues: Sequence[Dialogue],
        targets: Sequence[str],
        actions: torch.Tensor | None = None,
        position: Position = "prefix",
    ) -> torch.Tensor:
        """Mean token NLL ``[B]`` of each target reply (its end-of-turn token included) given
        the steered prompt. Differentiable with respect to ``actions``."""
        dialogues = _check_batch(dialogues)
        if len(targets) != len(dialogues):
            raise DatError(f"{len(targets)} targets for {len(dialogues)} dialogues.")
        if (actions is not None and actions.requires_grad and self.precision is not None
                and self.precision.int8_linear):
            raise DatError("int8 linear layers pass no gradient to the actions: train (dat clone) "
                           "with --precision exact or bf16.")
        target_ids = [self.reply_ids(d, t) for d, t in zip(dialogues, targets)]
        reserve = max(len(t) for t in target_ids)
        _, ids, insert_at, actions = self.prepare(dialogues, actions, position, reserve)
        full = [p + t for p, t in zip(ids, target_ids)]
        batch = self.make_batch(full, insert_at, actions, position)
        with self.steering(batch):
            hidden = base_model(self.model)(inputs_embeds=batch.inputs_embeds,
                                            attention_mask=batch.attention_mask,
                                            position_ids=batch.position_ids,
                                            use_cache=False).last_hidden_state
        # Only the positions that predict target tokens go through the LM head.
        T = hidden.shape[1]
        rows, cols, labels = [], [], []
        for i, t in enumerate(target_ids):
            n = len(t)
            rows += [i] * n
            cols += range(T - n - 1, T - 1)
            labels += t
        dev = hidden.device
        logits = self.model.get_output_embeddings()(hidden[torch.tensor(rows, device=dev),
                                                           torch.tensor(cols, device=dev)])
        nll = F.cross_entropy(logits.float(), torch.tensor(labels, device=dev), reduction="none")
        counts = torch.tensor([len(t) for t in target_ids], device=dev)
        row_idx = torch.tensor(rows, device=dev)
        return torch.zeros(len(target_ids), device=dev).index_add(0, row_idx, nll) / counts

    def reply_ids(self, dialogue: Dialogue, reply: str) -> list[int]:
        """Tokens the template puts after the generation prompt for ``reply``, up to and
        including the end-of-turn token."""
        prompt = self._template(dialogue, True)
        full = self._template(list(dialogue) + [{"role": "assistant", "content": reply}], False)
        if full[:len(prompt)] == prompt:
            tail = full[len(prompt):]
        else:  # templates that rewrite earlier turns: tokenise the reply itself
            tail = self.tokenizer(reply, add_special_tokens=False)["input_ids"] + [self.eos_token_ids[0]]
        for k, tok in enumerate(tail):
            if tok in self.eos_token_ids:
                return tail[:k + 1]
        return tail

    # ------------------------------------------------------------------ decoding
    def decode(self, batch: Batch, max_new_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = 0, *, top_logprobs: int | None = None,
               on_step: OnStep | None = None,
               ignore_eos: bool = False) -> tuple[list[list[int]], list[bool]]:
        """Decode a :meth:`make_batch` batch (inside ``with self.steering(batch)``); return
        each row's new tokens (stop token excluded) and whether an end-of-turn token ended it.

        ``on_step(step, tokens, logprobs)`` (optional) is called after every step with the
        new token of each row (a list; rows already finished get the pad id) and, when
        ``top_logprobs`` is not None, a :class:`~dat.decoding.StepLogprobs`. It may return
        indices of rows to finish now (their last token kept, ``stopped`` False): a server
        uses this for stop strings, per-row token limits and cancelled requests. Decoding
        ends early once every row is finished. ``batch.tokens`` then holds every token picked.
        """
        return self.decoder.decode(
            batch, max_new_tokens, temperature, top_p, seed,
            stop_token_ids=[] if ignore_eos else self.eos_token_ids,
            pad_token_id=self.pad_token_id, preallocate=self.supports_prefix_cache,
            top_logprobs=top_logprobs, on_step=on_step)


def _check_dialogue(dialogue: Dialogue) -> None:
    if not isinstance(dialogue, (list, tuple)) or not dialogue:
        raise DatError("A dialogue must be a non-empty list of {'role': ..., 'content': ...} messages.")
    for k, m in enumerate(dialogue):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DatError(f"Message {k} of a dialogue must be a dict with string 'role' and 'content', got {m!r}.")


def _check_batch(dialogues) -> list:
    if isinstance(dialogues, (list, tuple)) and dialogues and isinstance(dialogues[0], dict):
        raise DatError("Pass a list of dialogues (a list of lists of messages), not one dialogue.")
    if not isinstance(dialogues, (list, tuple)) or not dialogues:
        raise DatError("dialogues must be a non-empty list of dialogues.")
    return list(dialogues)
