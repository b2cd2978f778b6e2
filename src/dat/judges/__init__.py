"""Reward models ("judges"). Every judge scores a batch: ``judge.score(requests) -> list[Reward]``.

>>> from dat import judges
>>> emb = judges.make("embed:default")                         # all-MiniLM-L6-v2, offline
>>> cls = judges.make("hf:default", kind="yesno")              # Yes/No logits of a local LM
>>> llm = judges.make("hf:default", kind="sotopia", lm=lm)      # reuse a loaded SteeredLM

Specs: ``embed:default`` | ``embed:PATH_OR_HUB_ID`` (sentence-transformers),
``hf:default`` | ``hf:PATH_OR_HUB_ID`` with ``kind`` ``yesno`` or ``sotopia`` (also written
``hf:PATH#yesno``). ``api:URL#MODEL`` (OpenAI-compatible endpoints) comes from
:mod:`dat.judges.api`, imported on first use; more schemes plug in with :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable

from dat.errors import DatError
from dat.judges.base import (
    KINDS,
    Attempted,
    Judge,
    JudgeOutputError,
    generate_and_parse,
    resolve_lm,
    sigmoid,
    split_kind,
)
from dat.judges.classifier import YesNoJudge, YesNoRequest
from dat.judges.embedding import EmbeddingJudge, SimilarityRequest
from dat.judges.llm import (
    SOTOPIA_DIMENSIONS,
    SotopiaAgent,
    SotopiaJudge,
    SotopiaRequest,
    build_sotopia_prompt,
    parse_sotopia_scores,
    sotopia_reward,
)

# scheme -> factory(target, kind, lm, **kwargs) -> Judge
_SCHEMES: dict[str, Callable[..., Judge]] = {}


def register(scheme: str, factory: Callable[..., Judge]) -> None:
    """Make ``make("SCHEME:TARGET", kind=..., lm=..., **kw)`` call
    ``factory(TARGET, kind, lm, **kw)``."""
    _SCHEMES[scheme] = factory


def _embed(target: str, kind: str | None, lm=None, **kw) -> Judge:
    if kind not in (None, "embed", "embedding"):
        raise DatError(f"embed: judges are embedding-similarity judges, not {kind!r}")
    return EmbeddingJudge(target or "default", **kw)


def _hf(target: str, kind: str | None, lm=None, **kw) -> Judge:
    target, kind = split_kind(target, kind)
    if kind not in KINDS:
        raise DatError(f"judge 'hf:{target}' needs a kind: one of {', '.join(KINDS)} "
                       f"(pass kind=... or write 'hf:{target}#yesno'), got {kind!r}")
    model = target or "default"
    if lm is not None and model in ("default", getattr(lm, "name", None)):
        model = lm  # the caller's loaded model is this one: share it
    cls = YesNoJudge if kind == "yesno" else SotopiaJudge
    return cls(model, **kw)


def _api(target: str, kind: str | None, lm=None, **kw) -> Judge:
    from dat.judges.api import make_api_judge  # the HTTP client is imported only when used

    return make_api_judge(target, kind, lm, **kw)


register("embed", _embed)
register("hf", _hf)
register("api", _api)


def make(spec, kind: str | None = None, lm=None, **kwargs) -> Judge:
    """A judge from a spec string (see the module docstring); a :class:`Judge` is returned as
    is. ``lm``: an already loaded :class:`~dat.steer.SteeredLM` that an ``hf:`` judge naming
    the same model (or ``default`` when ``lm`` is the default) reuses instead of loading a
    second copy. Other keyword arguments go to the judge's constructor."""
    if isinstance(spec, Judge):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise DatError(f"judge spec must look like 'embed:default', 'hf:PATH' or another "
                       f"registered scheme ({', '.join(sorted(_SCHEMES))}), got {spec!r}")
    scheme, _, target = spec.partition(":")
    if scheme not in _SCHEMES:
        raise DatError(f"unknown judge scheme {scheme!r} in {spec!r}; known: "
                       f"{', '.join(sorted(_SCHEMES))}")
    return _SCHEMES[scheme](target, kind, lm, **kwargs)


__all__ = [
    "KINDS",
    "SOTOPIA_DIMENSIONS",
    "Attempted",
    "EmbeddingJudge",
    "Judge",
    "JudgeOutputError",
    "SimilarityRequest",
    "SotopiaAgent",
    "SotopiaJudge",
    "SotopiaRequest",
    "YesNoJudge",
    "YesNoRequest",
    "build_sotopia_prompt",
    "generate_and_parse",
    "make",
    "parse_sotopia_scores",
    "register",
    "resolve_lm",
    "sigmoid",
    "sotopia_reward",
]
