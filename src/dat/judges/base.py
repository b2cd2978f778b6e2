"""The judge interface: a batch of typed requests in, one :class:`~dat.episode.Reward` out
per request.

Every judge is a :class:`Judge` with one method, ``score(requests) -> list[Reward]``. The
request type depends on the judge (a dataclass defined next to it):

=====================  =======================  ============================================
judge                  request                  ``Reward.value``
=====================  =======================  ============================================
``EmbeddingJudge``     ``SimilarityRequest``    cosine similarity of text and reference
``YesNoJudge``         ``YesNoRequest``         ``sigmoid((logit_Yes - logit_No) / T)``
``SotopiaJudge``       ``SotopiaRequest``       the target agent's *overall* (mean of 7 dims)
=====================  =======================  ============================================

A judge that cannot produce a verdict returns ``Reward(value=None, failed=True, details=...)``
with its raw output in ``details["raw"]``; it never returns a silent 0.

This module also holds the pieces that local and remote (API) judges share:
:func:`generate_and_parse`, the bounded-retry loop for judges whose output must be parsed,
and :func:`resolve_lm`, which turns a model spec or an already loaded model into a
:class:`~dat.steer.SteeredLM` without loading a second copy.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from dat.episode import Reward
from dat.errors import DatError

KINDS = ("yesno", "sotopia")  # what a model-backed judge can be asked for

R = TypeVar("R")  # request type
T = TypeVar("T")  # parsed value type


class JudgeOutputError(DatError, ValueError):
    """A judge's text output does not have the expected form (bad JSON, missing key, ...)."""


class Judge(ABC, Generic[R]):
    """Scores a batch of requests at once."""

    name: str = "judge"

    @abstractmethod
    def score(self, requests: Sequence[R]) -> list[Reward]:
        """One :class:`Reward` per request, in order."""

    def __call__(self, requests: Sequence[R]) -> list[Reward]:
        return self.score(requests)


def split_kind(target: str, kind: str | None) -> tuple[str, str | None]:
    """``"model#yesno"`` -> ``("model", "yesno")``; a kind in both places must agree."""
    if "#" in target:
        target, _, k = target.rpartition("#")
        if kind is not None and kind != k:
            raise DatError(f"judge spec says kind {k!r} but kind={kind!r} was passed")
        kind = k
    return target, kind


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


@dataclass
class Attempted(Generic[T]):
    """Outcome of :func:`generate_and_parse` for one prompt."""

    value: T | None  # the parsed value, None when every attempt failed
    raw: str  # text of the last attempt
    attempts: int
    raws: list[str] = field(default_factory=list)  # text of every attempt, in order
    errors: list[str] = field(default_factory=list)  # parse error of every failed attempt

    @property
    def failed(self) -> bool:
        return self.value is None


def generate_and_parse(
    prompts: Sequence,
    generate: Callable[[list, int], list[str]],
    parse: Callable[[str], T],
    retries: int = 2,
) -> list[Attempted[T]]:
    """Ask for text, parse it, and ask again (up to ``retries`` more times) for the prompts
    whose text did not parse.

    ``generate(prompts, attempt)`` returns one text per prompt; ``attempt`` is 0 for the
    first try, so an implementation can decode greedily first and sample on retries. Only
    the prompts still failing are sent again, as one batch. ``parse`` raises
    :class:`JudgeOutputError` (or ``ValueError``) on bad text. Pure: no model inside, so
    local and API judges share it, and tests can drive it with a fake ``generate``.
    """
    if retries < 0:
        raise DatError(f"retries must be >= 0, got {retries}")
    out: list[Attempted] = [Attempted(None, "", 0) for _ in prompts]
    todo = list(range(len(prompts)))
    for attempt in range(retries + 1):
        if not todo:
            break
        texts = generate([prompts[i] for i in todo], attempt)
        if len(texts) != len(todo):
            raise DatError(f"judge generator returned {len(texts)} texts for {len(todo)} prompts")
        still = []
        for i, text in zip(todo, texts):
            rec = out[i]
            rec.raw, rec.attempts = text, attempt + 1
            rec.raws.append(text)
            try:
                rec.value = parse(text)
            except ValueError as exc:  # JudgeOutputError is a ValueError
                rec.errors.append(str(exc))
                still.append(i)
        todo = still
    return out


def resolve_lm(model=None, tokenizer=None, device: str = "auto", dtype: str = "auto"):
    """A :class:`~dat.steer.SteeredLM` from a spec (``"default"``, a folder, a hub id, a
    ``.gguf`` file), an existing SteeredLM (returned as is: no second copy), or a loaded
    transformers model together with its ``tokenizer``."""
    from dat.steer import SteeredLM

    if model is None:
        model = "default"
    if isinstance(model, SteeredLM):
        return model
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        return SteeredLM.from_pretrained(str(model), device=device, dtype=dtype)
    if tokenizer is None:
        raise DatError("Pass the tokenizer together with a loaded model (or pass a SteeredLM).")
    return SteeredLM(model, tokenizer)
