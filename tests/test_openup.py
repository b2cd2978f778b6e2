"""``openup``: partners with their own interests; the rewards judge the new content words of
the partner's reply (nothing anyone said before, echoes of the steered agent included):
how close they are to the partner's interest (default), or how many there are."""

import pytest

from dat import envs
from dat.envs import Turn
from dat.envs.openup import content_words, new_words
from dat.errors import DatError


def dialogue(setting, scenario, *turns):
    ep = setting.new_episode(0, scenario)
    ep.turns.append(Turn("partner", setting.opening(scenario).text))
    for k, text in enumerate(turns):
        ep.turns.append(Turn("steered" if k % 2 == 0 else "partner", text))
    return ep


@pytest.fixture(scope="module")
def setting():
    return envs.make("openup", reward_mode="words")


def test_interest_reward_is_about_the_partners_own_interest():
    setting = envs.make("openup")
    scn = setting.scenario_by_id("baking-bread")
    on = dialogue(setting, scn, "What do you do for fun?",
                  "I bake sourdough loaves every weekend, kneading the dough by hand.")
    small_talk = dialogue(setting, scn, "What do you do for fun?",
                          "Oh, nothing much, thanks for asking, it's been nice.")
    echo = dialogue(setting, scn, "Do you bake sourdough loaves, kneading dough by hand?",
                    "Sourdough loaves, kneading dough by hand!")
    r_on, r_small, r_echo = setting.reward([on, small_talk, echo], 0)
    assert r_on.value > 0.3 and r_on.value == r_on.details["interest"]
    assert r_small.value < 0.05 and r_echo.value == 0.0
    assert r_echo.details["new_words"] == [] and r_echo.details["similarity_topic"] is None
    with pytest.raises(DatError, match="reward_mode"):
        envs.make("openup", reward_mode="length")


def test_scenarios_are_taboo_topics_with_the_same_split(setting):
    taboo = envs.make("taboo")
    for split in ("train", "test"):
        assert [s.id for s in setting.scenarios(split)] == [s.id for s in taboo.scenarios(split)]
    scn = setting.scenarios("test")[0]
    steered, partner = setting.system_prompts(scn)
    assert scn.data["topic"].lower() in partner  # the partner has the interest ...
    assert scn.data["topic"].lower() not in steered.lower()  # ... the steered agent is not told
    assert setting.opening(scn).speaker == "partner"


def test_reward_counts_only_new_words_of_the_partner(setting):
    scn = setting.scenarios("train")[0]
    ep = dialogue(setting, scn, "What do you love doing on weekends?",
                  "I love baking bread and kneading dough on weekends!",
                  "Baking bread sounds lovely.",
                  "Yes, baking bread is fun. Fresh loaves smell wonderful.")
    r0, r1 = setting.reward([ep], 0)[0], setting.reward([ep], 1)[0]
    assert r0.details["new_words"] == ["baking", "bread", "kneading", "dough"]
    assert set(r0.details["echoed"]) == {"love", "weekends"}
    assert r0.value == pytest.approx(0.4)
    # round 2: "baking", "bread" were said before (by both sides), "loaves" is new
    assert r1.details["new_words"] == ["fun", "fresh", "loaves", "smell", "wonderful"]
    assert r1.value == pytest.approx(0.5)


def test_pure_echo_earns_nothing_and_the_reward_is_capped(setting):
    scn = setting.scenarios("train")[0]
    echo = dialogue(setting, scn, "Tell me about your garden and your roses.",
                    "My gardens, my rose! Tell me about yours.")
    assert setting.reward([echo], 0)[0].value == 0.0
    chatty = dialogue(setting, scn, "Hi.", " ".join(f"word{c}x" for c in "abcdefghijklmnop"))
    # "wordax" etc. are content words; 16 new ones, capped at target_words = 10
    assert setting.reward([chatty], 0)[0].value == 1.0
    assert envs.make("openup", reward_mode="words", target_words=20).reward([chatty], 0)[0].value == pytest.approx(0.8)


def test_batch_equals_single(setting):
    scns = setting.scenarios("train")[:3]
    eps = [dialogue(setting, s, "How are you?", f"I went {w} today, it was great.")
           for s, w in zip(scns, ["hiking", "fishing", "shopping for shoes"])]
    batch = [r.value for r in setting.reward(eps, 0)]
    assert batch == [setting.reward([e], 0)[0].value for e in eps]
    assert batch == pytest.approx([0.4, 0.4, 0.5])  # went, <activity>, today, great


def test_words_helpers():
    assert content_words("The cats, the CAT and a dog!") == ["cats", "cat", "dog"]
    assert new_words("Cats and dogs", ["I have a cat"]) == (["dogs"], ["cats"])


def test_bad_input(setting):
    with pytest.raises(DatError, match="target_words"):
        envs.make("openup", target_words=0)
    with pytest.raises(DatError, match="rounds"):
        envs.make("openup", rounds=0)
    with pytest.raises(DatError, match="split"):
        setting.scenarios("dev")
    scn = setting.scenarios("train")[0]
    with pytest.raises(DatError, match="no partner reply"):
        setting.reward([dialogue(setting, scn, "Hello?")], 0)
