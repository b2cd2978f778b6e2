"""dat chat on the real default model: replies, /unsteered, /reward, /save, piped stdin."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dat.agent import ActionSpace, Agent
from dat.chat import DEFAULT_SYSTEM, ChatSession, load_episode, new_episode
from dat.envs import make
from dat.errors import DatError


@pytest.fixture(scope="module")
def agent_dir(default_lm, tmp_path_factory):
    """A planner (untrained, seeded) on the embedded default's embedding PCA: prefix tokens
    of a norm large enough that steering visibly changes the reply."""
    up = ActionSpace(kind="tokens", action_dim=16, act_norm=8.0).pca(default_lm)
    d = tmp_path_factory.mktemp("agent")
    Agent.new(default_lm, up, seed=0).save(d)
    return d


def chat(*args, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dat.cli", "chat", *args], input=stdin,
                          capture_output=True, text=True, timeout=600)


def test_piped_chat_replies_toggles_and_saves(default_lm, agent_dir, tmp_path):
    saved = tmp_path / "chat.json"
    p = chat("--agent", str(agent_dir), "--max-new-tokens", "24",
             stdin=f"What should I cook tonight?\n/unsteered\n/save {saved}\n/quit\nnever read\n")
    assert p.returncode == 0, p.stdout + p.stderr
    steered, unsteered = p.stdout.splitlines()  # one line per reply, nothing else on stdout
    view = [{"role": "system", "content": DEFAULT_SYSTEM},
            {"role": "user", "content": "What should I cook tonight?"}]
    # /unsteered regenerates the reply as the plain model's greedy reply (dat generate's path)
    assert unsteered == " ".join(default_lm.generate([view], max_new_tokens=24)[0].split())
    assert steered != unsteered
    assert "steered · |a| = 8.00" in p.stderr and "steering off" in p.stderr
    episode = load_episode(saved)  # the file loads back as the dialogue
    assert [t.speaker for t in episode.turns] == ["partner", "steered"]
    assert episode.turns[0].text == "What should I cook tonight?"
    assert " ".join(episode.turns[1].text.split()) == unsteered
    assert episode.steered_system == DEFAULT_SYSTEM


def test_session_rewards_with_the_settings_judge(default_lm):
    setting = make("openup")
    sid = setting.scenarios("test")[0].id
    session = ChatSession(default_lm, new_episode(None, setting, sid), None, setting,
                          max_new_tokens=16)
    assert session.episode.steered_system == setting.system_prompts(setting.scenario_by_id(sid))[0]
    session.say("Hi! How has your day been?")
    first = session.reply()
    assert not first.steered and first.text
    with pytest.raises(DatError, match="no round to judge yet"):
        session.rewards()
    session.say("I made a big salad with fresh tomatoes from my garden today.")
    ((r, reward),) = session.rewards()
    assert r == 0 and not reward.failed and 0.0 <= reward.value <= 1.0
    assert reward.value == setting.reward([session.episode], 0)[0].value
    with pytest.raises(DatError, match="no agent is loaded"):
        session.toggle_steering()


def test_cosine_to_the_previous_turns_action(default_lm, agent_dir):
    session = ChatSession(default_lm, new_episode("Be brief."), Agent.load(agent_dir, default_lm),
                          max_new_tokens=8)
    session.say("Hello!")
    a = session.reply()
    session.say("Tell me about the sea.")
    b = session.reply()
    assert a.cosine_to_previous is None and -1.0 <= b.cosine_to_previous <= 1.0
    session.toggle_steering()
    again = session.toggle_steering()  # back on: the same reply, compared with the same turn
    assert again.text == b.text and again.cosine_to_previous == pytest.approx(b.cosine_to_previous)


def test_bad_input_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"turns": [{"speaker": "nobody", "text": "x"}],
                               "steered_system": "s"}))
    p = chat("--resume", str(bad), stdin="")
    assert p.returncode == 2 and "error:" in p.stdout and "Traceback" not in p.stdout + p.stderr
    with pytest.raises(DatError, match="has no scenario 'no-such-id'"):
        new_episode(None, make("openup"), "no-such-id")
