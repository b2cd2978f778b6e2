"""KV caches for batched decoding, and per-dialogue prefix caches kept across turns.

:func:`slab_cache` preallocates one tensor for a whole call (no ``torch.cat`` of the cache per
decoding step); a :class:`PrefixCache` keeps the keys and values a dialogue has encoded, so the
next turn encodes only the tokens after the longest common token prefix. Rows whose cached
prefixes differ in length share one forward pass (layout: docs/actions.md). A
:class:`PrefixStore` keeps a few prefixes that recent requests of ``dat serve`` shared (such
as the chat template's system prompt), so that later requests skip encoding them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from dat.errors import DatError


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class PrefixCache:
    """Keys and values of the tokens one dialogue (one agent's view) has encoded so far."""

    ids: list[int] = field(default_factory=list)
    kv: torch.Tensor | None = None  # [layers, 2, kv_heads, len(ids), head_dim]

    def __len__(self) -> int:
        return len(self.ids)

    def reusable(self, ids: list[int], limit: int | None = None) -> int:
        """How many leading tokens of ``ids`` can be taken from the cache: the common prefix,
        at most ``limit``, and never all of ``ids`` (the last token must be run for its
        output)."""
        n = min(common_prefix(self.ids, ids), len(ids) - 1)
        return max(0, n if limit is None else min(n, limit))


class PrefixStore:
    """A small LRU of :class:`PrefixCache` entries (token prefixes and their keys/values)
    that several requests shared, for automatic prefix caching across requests.

    Memory stays bounded: at most ``entries`` entries of at most ``max_tokens`` tokens each.
    Reuse is exact because an entry's keys/values depend on its tokens only (causal
    attention, explicit position ids from 0)."""

    def __init__(self, entries: int = 4, max_tokens: int = 1024):
        if entries < 1 or max_tokens < 1:
            raise DatError(f"PrefixStore needs entries >= 1 and max_tokens >= 1, got {entries}, {max_tokens}.")
        self.entries, self.max_tokens = entries, max_tokens
        self.items: list[PrefixCache] = []  # most recently used first

    def __len__(self) -> int:
        return len(self.items)

    def match(self, rows: list[list[int]], limits: list[int | None]) -> tuple[PrefixCache | None, int]:
        """The entry sharing the longest prefix with *every* row, and that length: at most
        ``limits[i]`` tokens of row ``i`` and never all of it (see :meth:`PrefixCache.reusable`).
        ``(None, 0)`` when no entry shares anything with all rows."""
        best, best_n = None, 0
        for entry in self.items:
            n = min(entry.reusable(x, lim) for x, lim in zip(rows, limits))
            if n > best_n:
                best, best_n = entry, n
        if best is not None:
            self.touch(best)
        return best, best_n

    def longest(self, ids: list[int]) -> int:
        """The longest prefix of ``ids`` some entry holds."""
        return max((min(common_prefix(e.ids, ids), len(e)) for e in self.items), default=0)

    def touch(self, entry: PrefixCache) -> None:
        self.items.remove(entry)
        self.items.insert(0, entry)

    def put(self, ids: list[int], kv: torch.Tensor) -> PrefixCache:
        """Keep ``ids`` (cut to ``max_tokens``) with their keys/values ``kv`` ``[layers, 2,
        kv_heads, len(ids), head_dim]``, evicting the least recently used entry if full."""
        n = min(len(ids), self.max_tokens)
        entry = PrefixCache(list(ids[:n]), kv[:, :, :, :n].contiguous())
        self.items.insert(0, entry)
        del self.items[self.entries:]
        return entry


def _cache_shape(model) -> tuple[int, int, int]:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv_heads, head_dim


def supports_slab(model) -> bool:
    """True when every layer of the model's default cache is a plain full-attention layer
    (no sliding windows, no linear attention): only then is the slab layout exact."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 - any model whose cache cannot be built: encode in full
        return False
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers) and \
        len(layers) == _cache_shape(model)[0]


@functools.cache  # one class, defined on first use: transformers is imported lazily
def _slab_layer_class():
    from transformers.cache_utils import DynamicLayer

    class SlabLayer(DynamicLayer):
        """A cache layer writing into a preallocated ``[B, kv_heads, capacity, head_dim]``
        slab; ``keys``/``values`` are views of its filled part."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, filled: int):
            super().__init__()
            self.slab_keys, self.slab_values, self.n = keys, values, filled
            self.device = keys.device
            self.is_initialized = True
            self.keys, self.values = keys[:, :, :filled], values[:, :, :filled]

        def lazy_initialization(self, key_states, value_states):  # the slab is the storage
            return None

        def update(self, key_states, value_states, *args, **kwargs):
            m = key_states.shape[-2]
            if self.n + m > self.slab_keys.shape[2]:
                raise DatError(f"KV slab of {self.slab_keys.shape[2]} positions is full.")
            self.slab_keys[:, :, self.n:self.n + m] = key_states
            self.slab_values[:, :, self.n:self.n + m] = value_states
            self.n += m
            self.keys = self.slab_keys[:, :, :self.n]
            self.values = self.slab_values[:, :, :self.n]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.n

    return SlabLayer


def slab_cache(model, rows: list[PrefixCache | None] | None, reuse: list[int] | None,
               batch: int, capacity: int, dtype: torch.dtype, device) -> tuple[object, torch.Tensor]:
    """A ``DynamicCache`` whose layers write into one preallocated tensor.

    ``rows[i].kv[..., :reuse[i], :]`` is placed right-aligned in the first ``C = max(reuse)``
    positions. Returns the cache and the ``[B, C]`` attention mask of those positions.
    ``capacity`` is the number of positions after them (new tokens + decoding steps).
    """
    from transformers import DynamicCache

    layer = _slab_layer_class()
    n_layers, kv_heads, head_dim = _cache_shape(model)
    C = max(reuse) if reuse else 0
    # zeros, not empty: masked positions still get multiplied by a softmax weight of 0
    slab = torch.zeros(n_layers, 2, batch, kv_heads, C + capacity, head_dim, dtype=dtype, device=device)
    past_mask = torch.zeros(batch, C, dtype=torch.long, device=device)
    for i, r in enumerate(reuse or []):
        if r:
            slab[:, :, i, :, C - r:C] = rows[i].kv[:, :, :, :r].to(device, dtype)
            past_mask[i, C - r:] = 1
    cache = DynamicCache(config=model.config)
    cache.layers = [layer(slab[k, 0], slab[k, 1], C) for k in range(n_layers)]
    cache.slab = slab  # kept for :func:`take`
    return cache, past_mask


def take(cache, row: int, columns: torch.Tensor) -> torch.Tensor:
    """The keys and values of ``columns`` of one row: ``[layers, 2, kv_heads, n, head_dim]``."""
    return cache.slab[:, :, row].index_select(3, columns.to(cache.slab.device))


def slab_view_cache(model, kv: torch.Tensor, filled: int) -> object:
    """A ``DynamicCache`` whose layers write into ``kv`` ``[layers, 2, B, kv_heads, capacity,
    head_dim]``, typically a view (some rows, columns from some offset on) of a larger slab
    that the caller owns; its first ``filled`` positions count as cached. Used by
    :mod:`dat.continuous` to prefill new rows in place and to decode the live rows."""
    from transformers import DynamicCache

    layer = _slab_layer_class()
    cache = DynamicCache(config=model.config)
    cache.layers = [layer(kv[k, 0], kv[k, 1], filled) for k in range(kv.shape[0])]
    cache.slab = kv
    return cache


def cache_shape(model) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of the model's KV cache."""
    return _cache_shape(model)
