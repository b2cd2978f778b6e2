"""Language quality of the steered agent's utterances: words, distinct-n, empty and
truncated replies, and perplexity under the model without action tokens.

Definitions: ``docs/evaluation.md``, "Language quality".
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import torch

from dat.episode import Episode
from dat.errors import DatError
from dat.rollout import RolloutEpisode

_WORD = re.compile(r"\w+(?:['’]\w+)*")


def words(text: str) -> list[str]:
    """Lower-cased word tokens: runs of letters/digits/underscore, inner apostrophes kept
    (``don't`` is one word); punctuation is dropped."""
    return _WORD.findall(text.lower())


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Corpus-level distinct-n (Li et al., 2016): unique word n-grams / all word n-grams, over
    all ``texts`` (n-grams never cross texts). None when there is no n-gram at all."""
    if n < 1:
        raise DatError(f"n must be >= 1, got {n}")
    total, seen = 0, set()
    for t in texts:
        w = words(t)
        grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else None


def is_empty(text: str) -> bool:
    """An empty reply: nothing but whitespace."""
    return not text.strip()


def _steered_turns(ep: Episode) -> list[tuple[list[dict], str]]:
    """``(prompt the steered agent saw, its utterance)`` for each of its turns."""
    return [(ep.view("steered", upto=k), t.text) for k, t in enumerate(ep.turns)
            if t.speaker == "steered"]


def _recorded_turn_lengths(r: RolloutEpisode | Episode) -> tuple[list[int] | None, list[bool] | None]:
    """The rollout's per steered turn ``(new tokens, ended at end-of-turn)``, or
    ``(None, None)`` when it recorded none (or not one per turn)."""
    if isinstance(r, RolloutEpisode):
        n = sum(t.speaker == "steered" for t in r.episode.turns)
        toks, stop = list(r.turn_tokens or []), list(r.turn_stopped or [])
        if len(toks) == n and len(stop) == n:
            return toks, stop
    return None, None


@torch.no_grad()
def perplexity(lm, prompts: Sequence[Sequence[dict]], texts: Sequence[str],
               batch_size: int = 8) -> dict:
    """Token-weighted perplexity of ``texts`` given their ``prompts`` under ``lm`` without
    action tokens: ``exp(sum of token NLLs / number of tokens)``, the end-of-turn token
    included (that is what :meth:`SteeredLM.loss` scores). Batched by prompt length.
    ``{"perplexity", "nll_per_token", "tokens", "utterances"}``."""
    if len(prompts) != len(texts):
        raise DatError(f"{len(prompts)} prompts for {len(texts)} texts")
    if not texts:
        return {"perplexity": None, "nll_per_token": None, "tokens": 0, "utterances": 0}
    counts = [len(lm.reply_ids(p, t)) for p, t in zip(prompts, texts)]
    order = sorted(range(len(texts)), key=lambda i: sum(len(m["content"]) for m in prompts[i]))
    total = 0.0
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        nll = lm.loss([list(prompts[i]) for i in idx], [texts[i] for i in idx])
        total += float((nll.double().cpu() * torch.tensor([counts[i] for i in idx],
                                                          dtype=torch.float64)).sum())
    tokens = sum(counts)
    return {"perplexity": math.exp(total / tokens), "nll_per_token": total / tokens,
            "tokens": tokens, "utterances": len(texts)}


def language_quality(runs: Sequence[RolloutEpisode | Episode], lm=None,
                     max_new_tokens: int | None = None, compute_perplexity: bool = True,
                     batch_size: int = 8) -> dict:
    """Language-quality figures of the steered agent's utterances in ``runs``.

    * ``perplexity`` (and ``nll_per_token``): under ``lm`` *without* steering, of every
      non-empty utterance given the prompt the agent saw before it (needs ``lm``);
    * ``distinct_1``, ``distinct_2``: over all utterances, word n-grams;
    * ``mean_words``: mean length in words (:func:`words`); ``mean_tokens``: mean number of
      generated model tokens (end-of-turn excluded), when the rollout recorded it;
    * ``empty_share``: share of utterances that are empty or whitespace;
    * ``truncated_share``: share that hit ``max_new_tokens`` without an end-of-turn token.
      From the rollout's per-turn record (``truncation_source: "generation"``); for
      episodes without it, from re-tokenising the text (``"retokenized"``: a reply with at
      least ``max_new_tokens`` tokens counts as truncated; needs ``lm`` and
      ``max_new_tokens``); else None.
    """
    prompts, texts, toks, trunc = [], [], [], []
    source = "generation"
    for r in runs:
        ep = r.episode if isinstance(r, RolloutEpisode) else r
        turns = _steered_turns(ep)
        n_tok, stopped = _recorded_turn_lengths(r)
        for k, (prompt, text) in enumerate(turns):
            prompts.append(prompt)
            texts.append(text)
            if n_tok is not None:
                toks.append(n_tok[k])
                trunc.append(not stopped[k])
            elif lm is not None and max_new_tokens:
                source = "retokenized" if source in ("generation", "retokenized") else source
                count = len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
                toks.append(count)
                trunc.append(count >= max_new_tokens)
            else:
                source = None
    n = len(texts)
    complete = source is not None and len(trunc) == n
    out = {
        "utterances": n,
        "perplexity": None, "nll_per_token": None, "perplexity_tokens": 0,
        "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
        "mean_words": float(np.mean([len(words(t)) for t in texts])) if n else None,
        "mean_tokens": float(np.mean(toks)) if complete and n else None,
        "empty_share": sum(is_empty(t) for t in texts) / n if n else None,
        "truncated_share": sum(trunc) / n if complete and n else None,
        "truncation_source": source if complete and n else None,
    }
    if compute_perplexity and lm is not None:
        keep = [i for i, t in enumerate(texts) if not is_empty(t)]
        p = perplexity(lm, [prompts[i] for i in keep], [texts[i] for i in keep], batch_size)
        out.update(perplexity=p["perplexity"], nll_per_token=p["nll_per_token"],
                   perplexity_tokens=p["tokens"])
    return out


__all__ = ["distinct_n", "is_empty", "language_quality", "perplexity", "words"]
