"""``taboo``: lead the partner to talk about a hidden topic without saying its taboo words.

Embedded data (``dat/data/taboo.json``: 239 topics with descriptions and taboo words; 57
held out as the test split). The partner opens with :data:`GREETING`; after every round
the partner's reply is scored: 0 if the steered utterance said a taboo word, otherwise the
MiniLM similarity of the partner's own (non-echoed) words to the topic, as a gain over
small talk. docs/settings.md has the full rules and ``Reward.details``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from dat.envs.base import Episode, Reward, Scenario, Setting, hash_split
from dat.errors import DatError

REWARD_MODES = ("gain", "similarity")

GREETING = "Hi there! It's nice to chat with you. How has your day been?"

PARTNER_SYSTEM = ("You are a friendly person having a casual chat. Reply naturally in one to "
                  "three sentences, share your own thoughts and experiences, and sometimes ask a "
                  "question back.")

STEERED_SYSTEM = """You are playing a conversation game with a friend.
Your secret target topic: {topic} ({description})
Your aim: get your friend to start talking about this topic by themselves.
Rules: never say any of these words, or any form of them: {taboo}. Do not name the topic \
directly; give hints, share related experiences and ask questions instead.
Keep each message short: one or two sentences."""

NEUTRAL_REPLIES = (
    GREETING,
    "That sounds interesting! Tell me more.",
    "I'm not sure what you mean. Could you explain?",
    "Yes, I agree with you.",
    "Thanks for sharing, that's nice to hear.",
    "Haha, that's funny. What else is new?",
    "I don't really have an opinion on that.",
    "Sure, I'm happy to chat about anything you like.",
)

STOPWORDS = frozenset([
    "a", "about", "above", "after", "again", "against", "all", "also", "am", "an", "and",
    "any", "are", "as", "at", "be", "because", "been", "before", "being", "below", "between",
    "both", "but", "by", "can", "could", "did", "do", "does", "doing", "down", "during",
    "each", "even", "ever", "every", "few", "for", "from", "further", "get", "gets", "got",
    "had", "has", "have", "having", "he", "her", "here", "hers", "herself", "him", "himself",
    "his", "how", "i", "if", "in", "into", "is", "it", "its", "itself", "just", "know", "let",
    "like", "lot", "lots", "make", "me", "more", "most", "much", "my", "myself", "no", "nor",
    "not", "now", "of", "off", "oh", "ok", "okay", "on", "once", "one", "only", "or", "other",
    "our", "ours", "ourselves", "out", "over", "own", "really", "same", "say", "said", "she",
    "should", "so", "some", "such", "sure", "than", "that", "the", "their", "theirs", "them",
    "themselves", "then", "there", "these", "they", "thing", "things", "think", "this",
    "those", "through", "to", "too", "under", "until", "up", "us", "very", "was", "way", "we",
    "well", "were", "what", "when", "where", "which", "while", "who", "whom", "why", "will",
    "with", "would", "yeah", "yes", "you", "your", "yours", "yourself", "yourselves", "it's",
    "i'm", "don't", "that's", "what's", "you're", "can't",
])

_WORD = re.compile(r"[a-z0-9]+")
_SPELLED = re.compile(r"\b(?:[a-z][\s.\-_*·]+){2,}[a-z]\b")


# ---------------------------------------------------------------------- text utilities
def words(text: str) -> list[str]:
    """Lower-case word tokens (letters and digits; apostrophes and hyphens split words)."""
    return _WORD.findall(text.lower())


def _join_spelled(text: str) -> str:
    """``b-a-k-e`` / ``b a k e`` / ``b.a.k.e`` -> ``bake``."""
    return _SPELLED.sub(lambda m: re.sub(r"[\s.\-_*·]+", "", m.group(0)), text.lower())


def word_forms(word: str) -> set[str]:
    """The word with simple inflections: plural, -ed, -ing, -er(s), with the usual spelling
    changes (bake/baking, party/parties, run/running, leaf/leaves)."""
    w = word.lower()
    forms = {w, w + "s", w + "es", w + "ed", w + "ing", w + "er", w + "ers"}
    if w.endswith("e"):
        forms |= {w + "d", w + "r", w + "rs", w[:-1] + "ing"}
    if len(w) > 2 and w.endswith("y") and w[-2] not in "aeiou":
        forms |= {w[:-1] + "ies", w[:-1] + "ied", w[:-1] + "ier"}
    if w.endswith("f"):
        forms.add(w[:-1] + "ves")
    if w.endswith("fe"):
        forms.add(w[:-2] + "ves")
    if len(w) >= 3 and w[-1] not in "aeiouwxy" and w[-2] in "aeiou" and w[-3] not in "aeiou":
        forms |= {w + w[-1] + s for s in ("ing", "ed", "er", "ers")}  # run -> running
    return forms


def taboo_hits(text: str, taboo: list[str]) -> list[str]:
    """The taboo entries that ``text`` uses (whole words, case-insensitive, inflected and
    spelled-out forms included; an entry of several words matches as a phrase)."""
    toks = words(_join_spelled(text))
    hits = []
    for entry in taboo:
        parts = words(entry)
        if not parts:
            continue
        head, last = parts[:-1], word_forms(parts[-1])
        n = len(parts)
        for i in range(len(toks) - n + 1):
            if toks[i:i + n - 1] == head and toks[i + n - 1] in last:
                hits.append(entry)
                break
    return hits


def is_content(tok: str) -> bool:
    return len(tok) >= 3 and tok not in STOPWORDS and not tok.isdigit()


def strip_copied(reply: str, said: list[str]) -> tuple[str, list[str]]:
    """``reply`` without the content words that also occur (in any simple inflection) in
    the texts ``said``; and the removed words."""
    said_toks = {t for s in said for t in words(s) if is_content(t)}
    said_forms = set().union(*(word_forms(t) for t in said_toks)) if said_toks else set()
    removed: list[str] = []

    def drop(m: re.Match) -> str:
        tok = m.group(0).lower()
        if is_content(tok) and (tok in said_forms or word_forms(tok) & said_toks):
            removed.append(tok)
            return ""
        return m.group(0)

    kept = re.sub(r"[A-Za-z0-9]+", drop, reply)
    return re.sub(r"\s+", " ", kept).strip(), removed


def has_content(text: str) -> bool:
    return any(is_content(t) for t in words(text))


# ---------------------------------------------------------------------- data
def default_data_path() -> Path:
    return Path(str(resources.files("dat") / "data" / "taboo.json"))


def load_taboo(path: str | Path) -> list[dict]:
    """Read and validate a taboo scenario file (``{"scenarios": [{id, topic, description,
    taboo, [split], [category]}, ...]}``, UTF-8). Errors name the file, the record and the
    field."""
    from dat.envs.datafiles import duplicates, field_path, first_non_text, read_json, shown

    path = Path(path)
    if not path.is_file():
        raise DatError(f"{path}: taboo scenario file not found")
    doc, utf8_error = read_json(path, "a JSON object with a 'scenarios' list")
    rows = doc.get("scenarios") if isinstance(doc, dict) else doc

    def record(k: int, r) -> str:
        rid = r.get("id") if isinstance(r, dict) else None
        ok = isinstance(rid, str) and first_non_text(rid) is None
        return f"{path}: scenario #{k}" + (f" ({rid!r})" if ok else "")

    bad = first_non_text(doc)
    if bad is not None:
        why = utf8_error or "contains a lone surrogate, not text"
        inner = (bad[1:] if isinstance(doc, dict) and bad[:1] == ("scenarios",)
                 else bad if isinstance(doc, list) else ())
        if inner and isinstance(rows, list) and isinstance(inner[0], int):
            raise DatError(f"{record(inner[0], rows[inner[0]])}{field_path(inner[1:])}: {why}")
        raise DatError(f"{path}{field_path(bad)}: {why}")
    if isinstance(doc, dict) and "scenarios" in duplicates(doc):
        raise DatError(f"{path}: field 'scenarios': given more than once")
    if not isinstance(rows, list) or not rows:
        raise DatError(f"{path}: expected a non-empty list of scenarios under 'scenarios'")
    seen: set[str] = set()
    for k, r in enumerate(rows):
        rec = record(k, r)
        if not isinstance(r, dict):
            raise DatError(f"{rec}: expected an object, got {type(r).__name__}")
        if duplicates(r):
            raise DatError(f"{rec}: field {shown(duplicates(r)[0])!r}: given more than once")
        for f in ("id", "topic", "description"):
            if not isinstance(r.get(f), str) or not r[f].strip():
                raise DatError(f"{rec}: field {f!r}: expected a non-empty string, got {r.get(f)!r}")
        tab = r.get("taboo")
        ok = isinstance(tab, list) and tab and all(isinstance(t, str) and words(t) for t in tab)
        if not ok:
            raise DatError(f"{rec}: field 'taboo': expected a non-empty list of words, got {tab!r}")
        if r.get("split", "train") not in ("train", "test"):
            raise DatError(f"{rec}: field 'split': expected 'train' or 'test', got {r['split']!r}")
        if r["id"] in seen:
            raise DatError(f"{rec}: field 'id': duplicate id {r['id']!r}")
        seen.add(r["id"])
    return rows


# ---------------------------------------------------------------------- setting
@dataclass
class Taboo(Setting):
    """The taboo game. ``data``: a scenario file (default: the embedded one). ``judge``: an
    :class:`~dat.judges.EmbeddingJudge` or a spec (default ``embed:default``). Scenarios
    without a ``split`` field are assigned by hashing their topic (``test_fraction``)."""

    data: str | Path | None = None
    rounds: int = 3
    judge: Any = field(default=None, repr=False)
    greeting: str = GREETING
    partner_system: str = PARTNER_SYSTEM
    test_fraction: float = 0.2
    # "gain": the clipped gain over small talk (below); "similarity": the partner's own words'
    # plain cosine to the topic, max(s_description, s_topic) clipped at 0 -- a denser signal
    # of the same thing (small talk scores about 0.1-0.2 instead of 0)
    reward_mode: str = "gain"

    name: ClassVar[str] = "taboo"
    reward_timing: ClassVar[str] = "round"

    def __post_init__(self):
        if self.rounds < 1:
            raise DatError(f"rounds must be >= 1, got {self.rounds}")
        if self.reward_mode not in REWARD_MODES:
            raise DatError(f"taboo reward_mode must be one of {REWARD_MODES}, got {self.reward_mode!r}")
        path = Path(self.data) if self.data is not None else default_data_path()
        self._rows = load_taboo(path)
        self.all_scenarios = []
        for r in self._rows:
            split = r.get("split") or hash_split(r["topic"].lower(), self.test_fraction, "taboo")
            data = {"topic": r["topic"], "description": r["description"], "taboo": list(r["taboo"]),
                    "category": r.get("category", ""), "split": split}
            self.all_scenarios.append(Scenario(r["id"], data))

    # -- interface
    def system_prompts(self, scenario: Scenario) -> tuple[str, str]:
        d = scenario.data
        steered = STEERED_SYSTEM.format(topic=d["topic"], description=d["description"],
                                        taboo=", ".join(d["taboo"]))
        return steered, self.partner_system

    def reward(self, episodes: list[Episode], round_index: int) -> list[Reward]:
        if not episodes:
            return []
        items = []
        for ep in episodes:
            steered, reply = ep.judged_round(round_index, "taboo")
            said = ep.utterances("steered")[:round_index + 1]
            novel, copied = strip_copied(reply, said)
            items.append((ep.scenario.data, steered, reply, novel, copied))
        neutral = list(dict.fromkeys(list(NEUTRAL_REPLIES) + [self.greeting]))
        judge = self.built_judge("embed:default")  # built on first use
        # one encoder call for everything not cached yet
        texts = [t for _, s, r, n, _ in items for t in (s, r, n)]
        targets = [t for d, *_ in items for t in (d["description"], d["topic"])]
        judge.embed(texts + targets + neutral)
        e_neu = judge.embed(neutral)
        out = []
        for d, steered, reply, novel, copied in items:
            e_d, e_t, e_r, e_s, e_n = judge.embed([d["description"], d["topic"], reply, steered,
                                                   novel or "."])
            (s_d, base_d, g_d), (s_t, base_t, g_t) = (small_talk_gain(e_n, e, e_neu)
                                                      for e in (e_d, e_t))
            info = {"similarity_full": float(e_r @ e_d), "echo": float(e_r @ e_s),
                    "baseline_description": base_d, "baseline_topic": base_t}
            if not has_content(novel):
                s_d = s_t = None
                g_d = g_t = 0.0
            gain = max(g_d, g_t)
            similarity = max(0.0, s_d, s_t) if s_d is not None else 0.0
            value = gain if self.reward_mode == "gain" else similarity
            hits = taboo_hits(steered, d["taboo"])
            out.append(Reward(0.0 if hits else value, {"gain": gain, "similarity": similarity,
                "similarity_description": s_d, "similarity_topic": s_t, **info,
                "gain_description": g_d, "gain_topic": g_t, "taboo_hits": hits,
                "copied_words": copied, "partner_taboo": taboo_hits(reply, d["taboo"]),
                "value_if_no_taboo": value,
            }))
        return out


def small_talk_gain(e_text, e_target, e_neutral) -> tuple[float, float, float]:
    """``(s, b, gain)`` of a text against a target (unit-norm embeddings): its cosine, the
    best neutral reply's cosine, and :func:`gain_over` of the two."""
    s, b = float(e_text @ e_target), float((e_neutral @ e_target).max())
    return s, b, gain_over(s, b)


def gain_over(sim: float, baseline: float) -> float:
    """``clip((s - b) / (1 - b), 0, 1)``."""
    return min(1.0, max(0.0, (sim - baseline) / (1.0 - baseline)))
