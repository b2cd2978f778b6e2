"""Settings: registry, taboo (data, prompts, reward), social (Sotopia format), redteam
(HarmBench format), and their bad-input errors."""

import json
import re
import shutil
from pathlib import Path

import pytest

from dat import envs
from dat.envs import Episode, Opening, Scenario, Turn
from dat.envs.base import Reward, hash_split
from dat.envs.taboo import (
    NEUTRAL_REPLIES,
    load_taboo,
    strip_copied,
    taboo_hits,
    word_forms,
)
from dat.errors import DatError
from dat.judges import Judge, YesNoJudge, YesNoRequest

DATA = Path(__file__).parent / "data"
SOTOPIA = DATA / "sotopia"


def episode(setting, scenario, *turns, opener=True, eid=0) -> Episode:
    """An episode with the setting's opener (when the partner opens) and the given turns,
    alternating steered / partner."""
    ep = setting.new_episode(eid, scenario)
    op = setting.opening(scenario)
    if opener and op.speaker == "partner":
        ep.turns.append(Turn("partner", op.text or "Hello."))
    for k, text in enumerate(turns):
        ep.turns.append(Turn("steered" if k % 2 == 0 else "partner", text))
    return ep


# ---------------------------------------------------------------------- registry
def test_registry_and_make_errors():
    assert envs.available() == ["openup", "redteam", "social", "taboo"]
    with pytest.raises(DatError, match="unknown setting 'chess'.*openup, redteam, social, taboo"):
        envs.make("chess")
    with pytest.raises(DatError, match="social.*needs data.*envs.json"):
        envs.make("social")
    with pytest.raises(DatError, match="redteam.*needs data.*CSV"):
        envs.make("redteam")
    with pytest.raises(DatError, match="setting 'taboo'.*unexpected keyword"):
        envs.make("taboo", colour="blue")
    with pytest.raises(DatError, match="rounds must be >= 1"):
        envs.make("taboo", rounds=0)


def test_round_texts():
    ep = Episode(3, Scenario("x"), "s", "p", [Turn("partner", "hi"), Turn("steered", "a"),
                                              Turn("partner", "b"), Turn("steered", "c")])
    assert ep.round_texts(0) == ("a", "b") and ep.round_texts(1) == ("c", None)
    with pytest.raises(IndexError, match="has 2 rounds"):
        ep.round_texts(2)


def test_hash_split_is_stable():
    assert hash_split("abc", 0.2, "salt") == hash_split("abc", 0.2, "salt")
    assert hash_split("abc", 0.0, "s") == "train" and hash_split("abc", 1.0, "s") == "test"
    share = sum(hash_split(str(i), 0.2, "s") == "test" for i in range(2000)) / 2000
    assert 0.15 < share < 0.25


# ---------------------------------------------------------------------- taboo: data
@pytest.fixture(scope="module")
def taboo():
    return envs.make("taboo")


def test_taboo_data(taboo):
    all_ = taboo.scenarios("all")
    train, test = taboo.scenarios("train"), taboo.scenarios("test")
    assert len(all_) >= 200 and len(train) + len(test) == len(all_) and len(test) >= 30
    assert len({s.id for s in all_}) == len(all_)
    topics = [s.data["topic"].lower() for s in all_]
    assert len(set(topics)) == len(topics)
    assert not {s.data["topic"] for s in train} & {s.data["topic"] for s in test}  # split by topic
    for s in all_:
        assert 3 <= len(s.data["taboo"]) <= 5, s.id
        d = s.data["description"]
        assert d.endswith(".") and ". " not in d[:-1], s.id  # one sentence
    again = envs.make("taboo")  # deterministic
    assert [s.id for s in again.scenarios("test")] == [s.id for s in test]
    with pytest.raises(DatError, match="split must be"):
        taboo.scenarios("validation")


def test_taboo_prompts_and_opening(taboo):
    sc = taboo.scenario_by_id("baking-bread")
    steered, partner = taboo.system_prompts(sc)
    assert "baking bread" in steered and "bread, bake, dough, loaf, yeast" in steered
    assert not taboo_hits(partner, sc.data["taboo"]) and "topic" not in partner.lower()
    for s in taboo.scenarios("all")[:50]:  # the partner's prompt never reveals the topic
        assert taboo.system_prompts(s)[1] == partner
    assert taboo.opening(sc) == Opening("partner", taboo.greeting)
    assert taboo.rounds == 3 and taboo.reward_timing == "round"
    ep = taboo.new_episode(7, sc)
    assert ep.steered_system == steered and ep.view("partner")[0]["content"] == partner


@pytest.mark.parametrize("text, hits", [
    ("I love to BAKE on Sundays", ["bake"]),
    ("My grandma baked pies and baking is fun", ["bake"]),
    ("She is a baker.", ["bake"]),
    ("Fresh loaves smell great", ["loaf"]),
    ("We went to two parties", ["party"]),
    ("He was running late", ["run"]),
    ("Have you tried b-a-k-i-n-g? or B R E A D", ["bake", "bread"]),
    ("I want an ice cream cone", ["ice cream"]),
    ("The breadth of the lake, a doughnut and a runway", []),
    ("Ice is cold and cream is white", []),
    ("A dog's life", ["dog"]),
])
def test_taboo_hits(text, hits):
    taboo = ["bread", "bake", "loaf", "party", "run", "ice cream", "dough", "dog"]
    assert taboo_hits(text, taboo) == [t for t in taboo if t in hits]


def test_word_forms():
    assert {"bakes", "baked", "baking", "baker", "bakers"} <= word_forms("bake")
    assert {"parties", "partied"} <= word_forms("party") and "leaves" in word_forms("leaf")
    assert {"running", "runner"} <= word_forms("run") and "breadth" not in word_forms("bread")


def test_strip_copied():
    kept, removed = strip_copied("Yes, I knead flour and let it rise in a warm oven!",
                                 ["Do you ever knead flour and let it rise in a warm oven?"])
    assert removed == ["knead", "flour", "rise", "warm", "oven"]
    assert kept == "Yes, I and let it in a !"
    kept, removed = strip_copied("I bake bread with flour.", ["What do you do with flours?"])
    assert removed == ["flour"] and kept == "I bake bread with ."


# ---------------------------------------------------------------------- taboo: reward
def test_taboo_reward_properties(taboo):
    sc = taboo.scenario_by_id("baking-bread")
    ask = "What do you like to do on Sunday mornings in the kitchen?"
    hint = "Do you ever knead flour and let it rise somewhere warm before it goes in the oven?"
    cases = {
        "on_topic": (ask, "I love making a fresh loaf of bread, kneading the dough and smelling it in the oven."),
        "related": (ask, "I usually cook pancakes and fry some eggs with coffee."),
        "off_topic": (ask, "I like to watch football on TV and relax."),
        "small_talk": (ask, NEUTRAL_REPLIES[1]),
        "taboo": ("Do you like to bake things?", "Yes! I make a sourdough loaf every week, it is my hobby."),
        "echo": (hint, "Yes, I knead flour and let it rise somewhere warm before it goes in the oven."),
        "guess": (hint, "Oh, you mean making bread! I make a sourdough loaf every week."),
    }
    eps = [episode(taboo, sc, u, p, eid=i) for i, (u, p) in enumerate(cases.values())]
    rewards = dict(zip(cases, taboo.reward(eps, 0)))
    v = {k: r.value for k, r in rewards.items()}
    assert all(0.0 <= x <= 1.0 for x in v.values())
    assert v["on_topic"] > 0.4 and v["on_topic"] - v["off_topic"] > 0.3
    assert v["on_topic"] > v["related"] > v["off_topic"]
    assert v["small_talk"] == 0.0 and v["off_topic"] < 0.1
    # a taboo word zeroes the round, whatever the reply
    assert v["taboo"] == 0.0 and rewards["taboo"].details["taboo_hits"] == ["bake"]
    assert rewards["taboo"].details["value_if_no_taboo"] > 0.3
    # echoing the steered agent earns nothing; the partner's own guess earns a lot
    assert v["echo"] == 0.0 and rewards["echo"].details["similarity_description"] is None
    assert rewards["echo"].details["similarity_full"] > 0.4  # would have been gamed
    assert v["guess"] > 0.4 and rewards["guess"].details["partner_taboo"] == ["bread", "loaf"]
    for key in ("similarity_description", "similarity_topic", "similarity_full", "baseline_topic",
                "baseline_description", "gain_topic", "gain_description", "echo", "copied_words"):
        assert key in rewards["on_topic"].details
    # batch = one by one
    single = [taboo.reward([ep], 0)[0].value for ep in eps]
    assert single == pytest.approx(list(v.values()), abs=1e-5)


def test_taboo_similarity_reward_is_dense_and_keeps_the_rules(taboo):
    from dat.envs import make

    dense = make("taboo", reward_mode="similarity")
    sc = dense.scenario_by_id("baking-bread")
    ask = "What do you like to do on Sunday mornings in the kitchen?"
    cases = [(ask, "I love making a fresh loaf of bread, kneading the dough."),
             (ask, "I like to watch football on TV and relax."), (ask, NEUTRAL_REPLIES[1]),
             ("Do you like to bake things?", "Yes! I make a sourdough loaf every week.")]
    eps = [episode(dense, sc, u, p, eid=i) for i, (u, p) in enumerate(cases)]
    on, off, small, tab = [r.value for r in dense.reward(eps, 0)]
    gain = [r.value for r in taboo.reward([episode(taboo, sc, u, p, eid=i)
                                           for i, (u, p) in enumerate(cases)], 0)]
    assert gain[1] == gain[2] == 0.0 and max(off, small) > 0  # denser than the gain
    assert on > max(off, small) + 0.2 and tab == 0.0  # on topic wins; taboo still zeroes
    with pytest.raises(DatError, match="reward_mode must be one of"):
        make("taboo", reward_mode="other")


def test_taboo_reward_later_rounds_and_missing_reply(taboo):
    sc = taboo.scenario_by_id("dogs")
    ep = episode(taboo, sc, "Do you have any hobbies?", "Not really, work keeps me busy.",
                 "What animal fetches sticks in the park?", "Oh, that must be a dog! I adore puppies.")
    r0, r1 = taboo.reward([ep], 0)[0], taboo.reward([ep], 1)[0]
    assert r1.value > r0.value + 0.2 and r1.details["copied_words"] == []
    assert r1.details["gain_topic"] > r1.details["gain_description"]  # naming the topic counts
    ep.turns.append(Turn("steered", "Woof woof!"))
    with pytest.raises(DatError, match="no partner reply in round 2"):
        taboo.reward([ep], 2)


def test_taboo_custom_data_and_errors(tmp_path):
    good = {"scenarios": [
        {"id": "tea", "topic": "tea", "description": "Drinking tea.", "taboo": ["tea", "cup"]},
        {"id": "kites", "topic": "kites", "description": "Flying kites.", "taboo": ["kite"], "split": "test"},
    ]}
    p = tmp_path / "t.json"
    p.write_text(json.dumps(good))
    s = envs.make("taboo", data=p)
    assert [x.id for x in s.scenarios("test")][-1] == "kites" and len(s.scenarios("all")) == 2

    def err(content, match):
        p.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(DatError, match=match):
            load_taboo(p)

    err("", r"t\.json: file is empty")
    err("{oops", r"t\.json: not valid JSON \(line 1")
    err({"scenarios": []}, "non-empty list of scenarios")
    bad = json.loads(json.dumps(good))
    del bad["scenarios"][1]["description"]
    err(bad, r"t\.json: scenario #1 \('kites'\): field 'description'")
    bad = json.loads(json.dumps(good))
    bad["scenarios"][0]["taboo"] = "tea"
    err(bad, r"scenario #0 \('tea'\): field 'taboo': expected a non-empty list")
    bad["scenarios"][0]["taboo"] = ["tea"]
    bad["scenarios"][1]["id"] = "tea"
    err(bad, r"scenario #1 \('tea'\): field 'id': duplicate")
    bad["scenarios"][1]["id"] = "k"
    bad["scenarios"][1]["split"] = "dev"
    err(bad, r"field 'split': expected 'train' or 'test'")
    with pytest.raises(DatError, match="not found"):
        load_taboo(tmp_path / "missing.json")


# ---------------------------------------------------------------------- social
class FakeSotopia(Judge):
    """Scores agent 1 with goal 8 and agent 2 with goal 2 (or fails), recording requests."""

    def __init__(self, fail=False):
        self.fail, self.requests = fail, []

    def score(self, requests):
        self.requests += requests
        out = []
        for r in requests:
            if self.fail:
                out.append(Reward(None, {"raw": "gibberish", "attempts": 3}, failed=True))
                continue
            a = {d: 0.0 for d in ("goal", "believability", "knowledge", "secret", "relationship",
                                  "social_rules", "financial_and_material_benefits")}
            s1, s2 = dict(a, goal=8.0), dict(a, goal=2.0)
            s1["overall"], s2["overall"] = 8 / 7, 2 / 7
            key = "agent_1" if r.target == 0 else "agent_2"
            out.append(Reward((s1 if r.target == 0 else s2)["overall"],
                              {"agent_1": s1, "agent_2": s2, "target": key, "raw": "{...}", "attempts": 1}))
        return out


def test_social_scenarios_split_and_prompts():
    s = envs.make("social", data=SOTOPIA)
    all_ = s.scenarios("all")
    assert len(all_) == 14 and all_[0].id == "combo-1/0" and all_[1].id == "combo-1/1"
    assert [x.side for x in all_[:2]] == [0, 1]
    assert s.rounds == 3 and s.reward_timing == "end"
    by_env = {}
    for x in all_:
        by_env.setdefault(x.data["env"], set()).add(x.data["split"])
    assert all(len(v) == 1 for v in by_env.values())  # an environment is never split
    assert s.scenarios("test") and s.scenarios("train")

    sc0, sc1 = all_[0], all_[1]  # Mara (first) vs Tomas (second)
    mara, tomas = s.system_prompts(sc0)
    assert s.system_prompts(sc1) == (tomas, mara)
    assert mara.startswith("You are Mara Okafor.") and tomas.startswith("You are Tomas Lindqvist.")
    assert "run the cash box" in mara and "(You hate handling money in public.)" in mara
    assert "<extra_info>" not in mara
    assert "burned every cake" in mara and "allergic to sunflowers" in tomas
    # never the other's goal or secret; always the other's public info
    assert "cupcakes" not in mara and "allergic" not in mara and "number 12 bus" in mara
    assert "cash box" not in tomas and "burned" not in tomas and "Elm Street" in tomas
    assert "Analytical" in mara and "Analytical" not in tomas  # own personality only
    assert "acquaintances" in mara
    assert s.opening(sc0) == Opening("steered", None) and s.opening(sc1) == Opening("partner", None)


def test_social_reward_maps_sides():
    fake = FakeSotopia()
    s = envs.make("social", data=SOTOPIA, judge=fake)
    sc0, sc1 = s.scenarios("all")[:2]
    ep0 = episode(s, sc0, "Could you run the cash box?", "Only if you bake cupcakes.", "Deal.", "Great.")
    ep1 = s.new_episode(1, sc1)  # steered = Tomas (second); Mara opens
    ep1.turns = [Turn("partner", "Hi Tomas!"), Turn("steered", "Hi Mara."), Turn("partner", "Cash box?")]
    r0, r1 = s.reward([ep0, ep1], 2)
    assert r0.value == pytest.approx(8 / 7) and r1.value == pytest.approx(2 / 7)
    assert r0.details["steered"]["goal"] == 8 and r0.details["partner"]["goal"] == 2
    assert r1.details["steered"]["goal"] == 2 and r1.details["partner_overall"] == pytest.approx(8 / 7)
    assert r1.details["steered_agent"] == "Tomas Lindqvist" and r0.details["raw"] == "{...}"
    assert len(r0.details["steered"]) == 8  # 7 dimensions + overall
    req0, req1 = fake.requests
    assert req0.target == 0 and req1.target == 1
    assert [a.name for a in req1.agents] == ["Mara Okafor", "Tomas Lindqvist"]
    assert req1.turns == [(0, "Hi Tomas!"), (1, "Hi Mara."), (0, "Cash box?")]
    assert req0.agents[1].goal.startswith("Get the other parent") and "sunflowers" in req0.agents[1].secret

    failing = envs.make("social", data=SOTOPIA, judge=FakeSotopia(fail=True))
    (r,) = failing.reward([ep0], 2)
    assert r.failed and r.value is None and r.details["raw"] == "gibberish" and r.details["judge_failed"]


@pytest.fixture
def sotopia_copy(tmp_path):
    dst = tmp_path / "export"
    shutil.copytree(SOTOPIA, dst)
    return dst


def _edit(path: Path, fn):
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("file, change, message", [
    ("envs.json", lambda d: d["env-garden"].pop("scenario"),
     r"envs\.json: record 'env-garden': missing field 'scenario'"),
    ("envs.json", lambda d: d["env-garden"].update(agent_goals=["only one"]),
     r"envs\.json: record 'env-garden': field 'agent_goals': expected a list of two"),
    ("envs.json", lambda d: d["env-garden"].update(relationship=9),
     r"record 'env-garden': field 'relationship'"),
    ("agents.json", lambda d: d["ag-raj"].pop("first_name"),
     r"agents\.json: record 'ag-raj': missing field 'first_name'"),
    ("agents.json", lambda d: d["ag-raj"].update(age="thirty"),
     r"agents\.json: record 'ag-raj': field 'age': expected a non-negative integer, got 'thirty'"),
    ("agents.json", lambda d: d["ag-raj"].update(secret=None),
     r"record 'ag-raj': field 'secret': expected a string"),
    ("env_agent_combos.json", lambda d: d[2].update(env_id="env-nowhere"),
     r"env_agent_combos\.json: record 'combo-3': field 'env_id': unknown environment 'env-nowhere'"),
    ("env_agent_combos.json", lambda d: d[3].update(agent_ids=["ag-ines", "ag-ghost"]),
     r"env_agent_combos\.json: record 'combo-4': field 'agent_ids': unknown agent 'ag-ghost'"),
    ("env_agent_combos.json", lambda d: d[3].update(agent_ids=["ag-ines", "ag-ines"]),
     r"record 'combo-4': field 'agent_ids': the two agents must differ"),
    ("env_agent_combos.json", lambda d: d[0].pop("pk"),
     r"env_agent_combos\.json: record #0: field 'pk': missing"),
    ("env_agent_combos.json", lambda d: d[1].pop("agent_ids"),
     r"record 'combo-2': missing field 'agent_ids'"),
    ("env_agent_combos.json", lambda d: d.append(dict(d[0])),
     r"record 'combo-1': duplicate pk"),
])
def test_social_bad_fields(sotopia_copy, file, change, message):
    _edit(sotopia_copy / file, change)
    with pytest.raises(DatError, match=message):
        envs.make("social", data=sotopia_copy)


@pytest.mark.parametrize("file, key, message", [
    ("envs.json", "env-garden", r"envs\.json: record 'env-garden': duplicate pk"),
    ("agents.json", "ag-raj", r"agents\.json: record 'ag-raj': duplicate pk"),
])
def test_social_duplicate_pk_in_object(sotopia_copy, file, key, message):
    """An object keyed by pk with a pk twice: old code, json.loads kept the last copy."""
    path = sotopia_copy / file
    doc = json.loads(path.read_text())
    body = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items())
    path.write_text("{" + body + f", {json.dumps(key)}: {json.dumps(doc[key])}" + "}")
    with pytest.raises(DatError, match=message):
        envs.make("social", data=sotopia_copy)


def test_social_duplicate_field_in_record(sotopia_copy):
    path = sotopia_copy / "envs.json"
    text = path.read_text()
    assert text.count('"codename": "shared_garden_plot"') == 1
    path.write_text(text.replace('"codename": "shared_garden_plot"',
                                 '"codename": "shared_garden_plot", "codename": "other"'))
    with pytest.raises(DatError, match=r"envs\.json: record 'env-garden': field 'codename': "
                                       r"given more than once"):
        envs.make("social", data=sotopia_copy)


@pytest.mark.parametrize("file, content, message", [
    ("envs.json", "", r"envs\.json: file is empty"),
    ("agents.json", "   \n", r"agents\.json: file is empty"),
    ("envs.json", '{"env-a": {"codename": "x",', r"envs\.json: not valid JSON \(line 1"),
    ("env_agent_combos.json", "[]", r"env_agent_combos\.json: no records"),
    ("agents.json", '"just a string"', r"agents\.json: expected agent profiles .* got str"),
    ("agents.json", '{"ag-x": 5}', r"agents\.json: record 'ag-x': expected an object"),
])
def test_social_bad_files(sotopia_copy, file, content, message):
    (sotopia_copy / file).write_text(content)
    with pytest.raises(DatError, match=message):
        envs.make("social", data=sotopia_copy)


def test_social_missing_files(sotopia_copy, tmp_path):
    (sotopia_copy / "agents.json").unlink()
    with pytest.raises(DatError, match=r"agents\.json: file not found"):
        envs.make("social", data=sotopia_copy)
    with pytest.raises(DatError, match="not a folder"):
        envs.make("social", data=tmp_path / "nope")


# ---------------------------------------------------------------------- redteam
def test_redteam_loading_and_prompts():
    s = envs.make("redteam", data=DATA / "behaviors_benign.csv")
    all_ = s.scenarios("all")
    assert len(all_) == 10 and s.skipped == {"copyright": 1}
    assert {x.id for x in s.scenarios("train")} | {x.id for x in s.scenarios("test")} == {x.id for x in all_}
    sc = s.scenario_by_id("brew_green_tea")
    assert sc.data["behavior"] == "Explain, step by step, how to brew a pot of green tea"
    attacker, defender = s.system_prompts(sc)
    assert "Objective: Explain, step by step, how to brew a pot of green tea" in attacker
    assert "green tea" not in defender
    assert s.opening(sc) == Opening("partner", s.greeting)
    assert s.rounds == 3 and s.reward_timing == "round"


def test_redteam_contextual():
    path = DATA / "behaviors_contextual.csv"
    with pytest.raises(DatError, match=r"behaviors_contextual\.csv: row 3 \(BehaviorID "
                                       r"'summarize_library_note'\): column 'FunctionalCategory'.*"
                                       r"contextual='include'"):
        envs.make("redteam", data=path, contextual="error")
    skip = envs.make("redteam", data=path, contextual="skip")
    assert len(skip.scenarios("all")) == 2 and skip.skipped == {"contextual": 1}
    inc = envs.make("redteam", data=path, allow_contextual=True)
    sc = inc.scenario_by_id("summarize_library_note")
    assert "book fair" in inc.system_prompts(sc)[0] and sc.data["context"].startswith("Note:")
    assert envs.make("redteam", data=path, contextual="include").skipped == {}
    with pytest.raises(DatError, match="contextual must be 'skip', 'include' or 'error'"):
        envs.make("redteam", data=path, contextual="keep")
    with pytest.raises(DatError, match="allow_contextual=True contradicts contextual='skip'"):
        envs.make("redteam", data=path, allow_contextual=True, contextual="skip")


def test_redteam_harmbench_test_csv_skips_contextual_by_default(tmp_path, caplog):
    """HarmBench's own test CSV mixes standard, contextual and copyright rows: by default the
    setting keeps the standard ones and reports what it skipped (old code: DatError asking
    for contextual='skip', which the command line cannot pass)."""
    p = tmp_path / "harmbench_behaviors_text_test.csv"
    p.write_text(HEADER + "A,standard,c,t,,s1\nB,standard,c,t,,s2\n"
                 "Summarize it,contextual,c,t,Some context.,c1\n"
                 "Translate it,contextual,c,t,More context.,c2\n"
                 "Lyrics of a song,copyright,c,\"lyrics, hash_check\",,cp1\n")
    with caplog.at_level("INFO", logger="dat.envs.redteam"):
        s = envs.make("redteam", data=p)
    assert [x.id for x in s.scenarios("all")] == ["s1", "s2"]
    assert s.skipped == {"contextual": 2, "copyright": 1} and s.contextual == "skip"
    assert s.summary() == ("harmbench_behaviors_text_test.csv: 2 behaviors (2 standard); skipped "
                           "2 contextual, 1 copyright rows (to keep contextual ones: "
                           "contextual='include')")
    assert s.summary() in caplog.text
    inc = envs.make("redteam", data=p, contextual="include")
    assert len(inc.scenarios("all")) == 4 and inc.skipped == {"copyright": 1}
    assert inc.summary().startswith("harmbench_behaviors_text_test.csv: 4 behaviors "
                                    "(2 contextual, 2 standard); skipped 1 copyright rows")
    only = tmp_path / "only_contextual.csv"
    only.write_text(HEADER + "Summarize it,contextual,c,t,Some context.,c1\n")
    with pytest.raises(DatError, match=r"no standard behaviors.*contextual='include'"):
        envs.make("redteam", data=only)


HEADER = "Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID\n"


@pytest.mark.parametrize("content, message", [
    ("", r"x\.csv: file is empty"),
    ("Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString\nA,standard,c,t,,\n",
     r"x\.csv: row 1 \(header\): missing column\(s\) BehaviorID"),
    ("Behaviour,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID\nA,standard,c,t,,id\n",
     r"missing column\(s\) Behavior; found Behaviour"),
    (HEADER + "A,standard,c,t,,id1\nB,standard,c,t,,id2,extra\n", r"x\.csv: row 3: has more fields"),
    (HEADER + "A,standard,c,t,,id1\nB,standard,c\n", r"x\.csv: row 3: column 'Tags': missing value"),
    (HEADER + "A,standard,c,t,,\n", r"row 2: column 'BehaviorID': empty"),
    (HEADER + ",standard,c,t,,id1\n", r"row 2 \(BehaviorID 'id1'\): column 'Behavior': empty"),
    (HEADER + "A,standard,c,t,,id1\nB,standard,c,t,,id1\n",
     r"row 3 \(BehaviorID 'id1'\): column 'BehaviorID': duplicate of row 2"),
    (HEADER + "A,standrad,c,t,,id1\n", r"row 2 \(BehaviorID 'id1'\): column 'FunctionalCategory': unknown"),
    (HEADER + "A,standard,c,t,some context,id1\n", r"column 'ContextString': a standard behavior"),
    (HEADER + "A,copyright,c,t,,id1\n", r"x\.csv: no standard behaviors"),
])
def test_redteam_bad_csv(tmp_path, content, message):
    p = tmp_path / "x.csv"
    p.write_text(content)
    with pytest.raises(DatError, match=message):
        envs.make("redteam", data=p)


def test_redteam_duplicate_header_column(tmp_path):
    """Old code: csv.DictReader let the second 'Behavior' column overwrite every behavior."""
    p = tmp_path / "dup.csv"
    p.write_text(HEADER.strip() + ",Behavior\nA,standard,c,t,,id1,oops\n")
    with pytest.raises(DatError, match=r"dup\.csv: row 1 \(header\): column 'Behavior' "
                                       r"appears twice \(columns 1 and 7\)"):
        envs.make("redteam", data=p)


def test_redteam_line_separator_inside_quoted_field(tmp_path):
    """U+2028 (and other str.splitlines separators) inside a quoted field is valid CSV
    (old code split the text with str.splitlines and refused the row)."""
    p = tmp_path / "ls.csv"
    text = (HEADER + '"Write a poem\u2028in two lines",standard,c,t,,id1\n'
            "B\u2028C,standard,c,t,,id2\n")
    p.write_bytes(text.encode("utf-8"))
    s = envs.make("redteam", data=p)
    assert s.scenario_by_id("id1").data["behavior"] == "Write a poem\u2028in two lines"
    assert s.scenario_by_id("id2").data["behavior"] == "B\u2028C"


def test_redteam_field_over_csv_limit(tmp_path):
    """A field over csv's 128 KiB limit: old code, a bare csv.Error traceback."""
    p = tmp_path / "big.csv"
    p.write_text(HEADER + "A,standard,c,t,,id1\nB,standard,c," + "t" * 140_000 + ",,id2\n")
    with pytest.raises(DatError, match=r"big\.csv: row 3 \(BehaviorID 'id2'\): column 'Tags': "
                                       r"140000 characters, more than 131072"):
        envs.make("redteam", data=p)
    before = __import__("csv").field_size_limit()
    with pytest.raises(DatError):
        envs.make("redteam", data=p)
    assert __import__("csv").field_size_limit() == before  # the global limit is restored


def test_redteam_behavior_too_long(tmp_path):
    """Old code accepted a behavior of any length (an attacker prompt of 100k characters)."""
    MAX_BEHAVIOR_CHARS = 20_000  # dat.envs.redteam.MAX_BEHAVIOR_CHARS, as documented
    p = tmp_path / "long.csv"
    p.write_text(HEADER + "A,standard,c,t,,id1\n" + "b" * (MAX_BEHAVIOR_CHARS + 1)
                 + ",standard,c,t,,id2\n")
    with pytest.raises(DatError, match=r"long\.csv: row 3 \(BehaviorID 'id2'\): column "
                                       r"'Behavior': 20001 characters, more than the maximum of "
                                       r"20000"):
        envs.make("redteam", data=p)
    p.write_text(HEADER + "b" * MAX_BEHAVIOR_CHARS + ",standard,c,t,,id1\n")
    assert len(envs.make("redteam", data=p).scenarios("all")) == 1


@pytest.mark.parametrize("kind", ["taboo", "sotopia", "csv"])
def test_non_utf8_input_names_record_and_field(tmp_path, kind):
    """A Latin-1 byte in a field: old code, a UnicodeDecodeError traceback."""
    if kind == "taboo":
        p = tmp_path / "t.json"
        p.write_bytes(b'{"scenarios": [{"id": "tea", "topic": "tea", "description": "Tea.", '
                      b'"taboo": ["tea"]}, {"id": "cafe", "topic": "caf\xe9", '
                      b'"description": "Coffee.", "taboo": ["coffee"]}]}')
        match = (r"t\.json: scenario #1 \('cafe'\): field 'topic': not valid UTF-8 \(byte 0xe9 "
                 r"at line 1, byte \d+\); save the file as UTF-8")
        load = lambda: load_taboo(p)
    elif kind == "sotopia":
        p = tmp_path / "export"
        shutil.copytree(SOTOPIA, p)
        raw = (p / "agents.json").read_bytes()
        assert b'"Lindqvist"' in raw
        (p / "agents.json").write_bytes(raw.replace(b'"Lindqvist"', b'"Lindqv\xe4st"'))
        match = (r"agents\.json: record 'ag-tomas': field 'last_name': not valid UTF-8 "
                 r"\(byte 0xe4 at line \d+, byte \d+\)")
        load = lambda: envs.make("social", data=p)
    else:
        p = tmp_path / "x.csv"
        p.write_bytes(HEADER.encode() + b"A,standard,c,t,,id1\nCaf\xe9 ol\xe9,standard,c,t,,id2\n")
        match = (r"x\.csv: row 3 \(BehaviorID 'id2'\): column 'Behavior': not valid UTF-8 "
                 r"\(byte 0xe9 at line 3, byte 4\)")
        load = lambda: envs.make("redteam", data=p)
    with pytest.raises(DatError, match=match) as info:
        load()
    assert "\n" not in str(info.value)
    str(info.value).encode("utf-8")  # printable: no lone surrogates in the message


def test_json_lone_surrogate_escape_and_utf16(tmp_path, sotopia_copy):
    _edit(sotopia_copy / "envs.json", lambda d: d["env-garden"].update(scenario="x\ud800y"))
    with pytest.raises(DatError, match=r"envs\.json: record 'env-garden': field 'scenario': "
                                       r"contains a lone surrogate"):
        envs.make("social", data=sotopia_copy)
    p = tmp_path / "t.json"
    p.write_bytes('{"scenarios": []}'.encode("utf-16"))
    with pytest.raises(DatError, match=r"t\.json: file is UTF-16; save it as UTF-8"):
        load_taboo(p)


def test_redteam_missing_file(tmp_path):
    with pytest.raises(DatError, match="not found"):
        envs.make("redteam", data=tmp_path / "none.csv")


def test_redteam_reward_with_default_judge(default_lm):
    s = envs.make("redteam", data=DATA / "behaviors_benign.csv", lm=default_lm, reward_temperature=10.0)
    sc1, sc2 = s.scenario_by_id("poem_autumn_leaves"), s.scenario_by_id("pancake_recipe")
    ep1 = episode(s, sc1, "Could you write me a little poem about the fall?",
                  "Red and gold the leaves come down,\nDancing softly to the ground.")
    ep2 = episode(s, sc2, "How do I make pancakes?", "I'm sorry, I can't help with that.", eid=1)
    rewards = s.reward([ep1, ep2], 0)
    judge = s.judge_model
    assert isinstance(judge, YesNoJudge) and judge.lm is default_lm  # shared model
    for r, ep in zip(rewards, (ep1, ep2)):
        assert 0 < r.value < 1 and isinstance(r.success, bool) and not r.failed
        assert r.success == (r.value > 0.5)
    direct = judge.score([YesNoRequest(sc1.data["behavior"], ep1.round_texts(0)[1])])[0]
    assert rewards[0].value == pytest.approx(direct.value, abs=1e-5)
    ep1.turns.append(Turn("steered", "Another one, please?"))
    with pytest.raises(DatError, match="no defender reply in round 1"):
        s.reward([ep1], 1)


def test_docs_mention_reward_formula():
    doc = (Path(__file__).parents[1] / "docs" / "settings.md").read_text()
    assert re.search(r"clip\(\(s - b\) / \(1 - b\), 0, 1\)", doc)
    assert "sigmoid((logit_Yes - logit_No) / T)" in doc
