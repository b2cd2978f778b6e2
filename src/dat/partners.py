"""Partner models: the other agent in a rollout (never steered).

A partner answers a batch of dialogues, each seen from the partner's side (its own
``system`` message first, its own turns as ``assistant``, the steered agent's as ``user``)::

    partner = make_partner("hf:default")                       # local, unsteered
    partner = make_partner("api:http://127.0.0.1:8000/v1#dat-plain")
    texts = partner.reply(dialogues, max_new_tokens=64, temperature=0.7, seed=0)

Specs: ``hf:default`` / ``hf:PATH`` (a hub id, a local folder or a ``.gguf`` file; a bare
``default`` or path works too) and ``api:URL#model`` (any OpenAI-compatible endpoint, see
:mod:`dat.api`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from dat.errors import DatError


@runtime_checkable
class Partner(Protocol):
    name: str

    def reply(self, dialogues: list[list[dict]], max_new_tokens: int = 64, temperature: float = 0.7,
              seed: int | None = 0) -> list[str]:
        """One reply per dialogue, in order."""
        ...


class LocalPartner:
    """An unsteered local model (a :class:`~dat.steer.SteeredLM` used without actions)."""

    def __init__(self, lm):
        self.lm = lm
        self.name = f"hf:{lm.name}"

    @classmethod
    def from_pretrained(cls, name_or_path: str = "default", **kwargs) -> LocalPartner:
        from dat.steer import SteeredLM

        return cls(SteeredLM.from_pretrained(name_or_path, **kwargs))

    def reply(self, dialogues: list[list[dict]], max_new_tokens: int = 64, temperature: float = 0.7,
              seed: int | None = 0) -> list[str]:
        return self.lm.generate(dialogues, None, max_new_tokens=max_new_tokens,
                                temperature=temperature, seed=seed)

    def generate_detailed(self, dialogues: list[list[dict]], **kwargs):
        """Unsteered :meth:`SteeredLM.generate_detailed` (texts and token counts, for rollouts
        that account generated tokens). Passing ``actions`` is an error: partners are plain."""
        if kwargs.get("actions") is not None:
            raise DatError("A partner is never steered; do not pass actions.")
        kwargs.pop("actions", None)
        return self.lm.generate_detailed(dialogues, None, **kwargs)


class APIPartner:
    """A partner behind an OpenAI-compatible endpoint (e.g. a stronger model).

    All dialogues of a batch are sent concurrently with the same sampling settings and
    seed, so a batching server (``dat serve``, vLLM) can decode them together. Any request
    that still fails after the client's retries raises :class:`~dat.api.APIError`: a
    rollout cannot go on without the partner's turn.
    """

    def __init__(self, client):
        self.client = client
        self.name = client.name

    @classmethod
    def from_spec(cls, spec: str, **overrides) -> APIPartner:
        from dat.api import APIClient

        return cls(APIClient.from_spec(spec, **overrides))

    def reply(self, dialogues: list[list[dict]], max_new_tokens: int = 64, temperature: float = 0.7,
              seed: int | None = 0) -> list[str]:
        if not dialogues:
            return []
        results = self.client.chat_many([list(d) for d in dialogues], max_tokens=max_new_tokens,
                                        temperature=temperature, seed=seed)
        return [r.text.strip() for r in results]

    def close(self) -> None:
        self.client.close()


def make_partner(spec: str, lm=None, **overrides) -> Partner:
    """Build a partner from a spec. ``lm``: an already loaded SteeredLM that an ``hf:`` spec
    naming the same model reuses instead of loading a second copy."""
    if not isinstance(spec, str) or not spec.strip():
        raise DatError("A partner spec must be a non-empty string such as 'hf:default' or "
                       "'api:http://127.0.0.1:8000/v1#model'.")
    spec = spec.strip()
    if spec.startswith("api:"):
        return APIPartner.from_spec(spec, **overrides)
    if overrides:
        raise DatError(f"Options {sorted(overrides)} only apply to api: partners, not {spec!r}.")
    kind, sep, rest = spec.partition(":")
    if sep and kind == "hf":
        target = rest
    elif sep and kind in ("embed", "llm", "classifier"):
        raise DatError(f"{spec!r} is a judge spec, not a partner; partners are 'hf:...' or 'api:URL#model'.")
    else:
        target = spec  # a bare model name/path (Windows drive letters included)
    if not target:
        raise DatError(f"Partner spec {spec!r} names no model; e.g. 'hf:default'.")
    if lm is not None and _same_model(lm, target):
        return LocalPartner(lm)
    return LocalPartner.from_pretrained(target)


def _same_model(lm, target: str) -> bool:
    from pathlib import Path

    if target == lm.name:
        return True
    try:
        return Path(target).expanduser().resolve() == Path(lm.name).expanduser().resolve()
    except (OSError, ValueError):
        return False
