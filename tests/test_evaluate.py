"""dat.evaluate: language-quality figures, per-agent metrics, the split check, reports, and
one small real evaluation with the embedded default model (statistics: test_stats.py)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from dat.agentspec import AgentSpec
from dat.envs.base import Episode, Reward, Scenario, Setting, Turn
from dat.errors import DatError, MissingPackageError
from dat.evaluate import agent_metrics, evaluate
from dat.provenance import PROVENANCE_FILE, Provenance, derived
from dat.quality import distinct_n, language_quality, words
from dat.report import format_samples_html, format_table, plotting_backend
from dat.rollout import RolloutEpisode
from dat.splitcheck import check_split

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------- language
def test_words_and_distinct_n():
    assert words("Don't STOP, now!") == ["don't", "stop", "now"]
    texts = ["the cat sat", "The cat ran."]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)  # the, cat, sat, ran of 6
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # (the cat) twice; n-grams never cross texts
    assert distinct_n(["a b", "c"], 2) == 1.0
    assert distinct_n(["", "   "], 1) is None


def _episode(eid, steered_texts, rewards=(), partner="ok", scenario="s0", details=None, success=None):
    ep = Episode(eid, Scenario(scenario, {"topic": "t"}), "sys steered", "sys partner")
    ep.turns.append(Turn("partner", "Hi!"))
    for t in steered_texts:
        ep.turns += [Turn("steered", t), Turn("partner", partner)]
    for k, v in enumerate(rewards):
        ep.rewards.append(Reward(v, dict(details or {}), success=None if success is None else success[k],
                                 failed=v is None))
    return ep


def _run(ep, tokens=None, stopped=None, failed=None):
    vals = [r.value for r in ep.rewards]
    failed = any(v is None for v in vals) if failed is None else failed
    return RolloutEpisode(ep, torch.zeros(0), torch.zeros(0), vals, failed, 0,
                          list(tokens or []), list(stopped or []))


def test_language_quality_shares_from_the_rollout_record():
    runs = [_run(_episode(0, ["one two three", ""]), [3, 0], [True, True]),
            _run(_episode(1, ["a b c d e f", "x y"]), [12, 2], [False, True])]
    q = language_quality(runs)
    assert q["utterances"] == 4
    assert q["empty_share"] == 0.25 and q["truncated_share"] == 0.25
    assert q["truncation_source"] == "generation"
    assert q["mean_words"] == pytest.approx((3 + 0 + 6 + 2) / 4)
    assert q["mean_tokens"] == pytest.approx((3 + 0 + 12 + 2) / 4)
    assert q["perplexity"] is None  # no model given


def test_language_quality_retokenizes_when_the_rollout_did_not_record():
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text.split()}

    class LM:
        tokenizer = Tok()

    runs = [_run(_episode(0, ["a b c d", "a b"]))]  # no per-turn record
    q = language_quality(runs, LM(), max_new_tokens=4, compute_perplexity=False)
    assert q["truncated_share"] == 0.5 and q["truncation_source"] == "retokenized"
    assert language_quality(runs)["truncated_share"] is None


class _Round(Setting):
    name = "tiny"
    reward_timing = "round"


class _End(Setting):
    name = "tiny-end"
    reward_timing = "end"


def test_agent_metrics_rounds_failures_and_redteam():
    runs = [_run(_episode(0, ["a", "b"], [0.2, 0.9], success=[False, True])),
            _run(_episode(1, ["a", "b"], [0.1, 0.3], success=[False, False])),
            _run(_episode(2, ["a", "b"], [0.4, None], success=[False, None]))]  # judge failed
    m = agent_metrics(runs, _Round(), n_boot=500)
    assert m["episodes"] == 3 and m["judge_failed"] == 1 and m["scored"] == 2
    assert m["reward"]["mean"] == pytest.approx((1.1 + 0.4) / 2)
    assert [r["mean"] for r in m["reward_by_round"]] == pytest.approx([0.15, 0.6])
    assert m["asr"]["rate"] == 0.5 and m["asr"]["n"] == 2
    assert m["best_round_reward"]["mean"] == pytest.approx((0.9 + 0.3) / 2)


def test_agent_metrics_social_dimensions():
    dims = lambda g: {"goal": g, "secret": -1.0, "overall": g / 7}
    runs = [_run(_episode(i, ["hi"], [g / 7], details={"steered": dims(g), "partner": dims(10 - g)}))
            for i, g in enumerate([4.0, 6.0, 8.0])]
    m = agent_metrics(runs, _End(), n_boot=500)
    assert m["reward_by_round"] == []
    assert m["dimensions"]["steered"]["goal"]["mean"] == pytest.approx(6.0)
    assert m["dimensions"]["partner"]["goal"]["mean"] == pytest.approx(4.0)
    assert m["dimensions"]["steered"]["secret"]["ci"] == [-1.0, -1.0]
    assert "asr" not in m


def test_samples_html_escapes_everything():
    ep = _episode(0, ["<script>alert('x')</script> & more"], [0.5], scenario="<b>id</b>")
    ep.scenario.data["topic"] = "<script>topic</script>"
    runs = {"a<i>": [_run(ep, [5], [True])]}
    results = {"setting": "tiny", "split": "test", "episodes": 1, "episode_ids": [0],
               "agents": {"a<i>": {"reward": {"mean": 0.5, "se": None, "ci": None, "n": 1}}}}
    page = format_samples_html(results, runs)
    assert "<script>" not in page and "<b>id</b>" not in page and "<i>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page
    assert "&lt;script&gt;topic&lt;/script&gt;" in page


def test_missing_matplotlib_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(MissingPackageError, match=r'pip install "dat\[plots\]"'):
        plotting_backend()


# ---------------------------------------------------------------------------------- split check
class _Tiny(Setting):
    """Four scenarios, two of them in the test split; a deterministic reward."""

    name = "tiny"
    rounds = 1

    def scenarios(self, split="train"):
        all_ = [Scenario(f"s{i}", {"split": "test" if i < 2 else "train"}) for i in range(4)]
        return [s for s in all_ if split == "all" or s.data["split"] == split]


def _planner_dir(tmp_path):
    d = tmp_path / "planner"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def test_overlap_with_the_test_split_is_an_error(tmp_path):
    d = _planner_dir(tmp_path)
    Provenance(kind="planner", setting="tiny", scenario_ids=["s1", "s2", "s3"]).write(d)
    prov = Provenance.read(d)
    assert (set(prov.scenario_ids), prov.setting) == ({"s1", "s2", "s3"}, "tiny")
    with pytest.raises(DatError, match=r"trained on 1 scenario\(s\) of the 'tiny' 'test' split.*s1"):
        evaluate(None, _Tiny(), {"base": None, "dat": AgentSpec.from_dir(d)}, split="test")


def test_overlap_found_through_the_training_buffer(tmp_path):
    """A planner trained on a buffer records the buffer's scenarios in its provenance."""
    buf = tmp_path / "buffer"
    buf.mkdir()
    Provenance(kind="buffer", setting="tiny", scenario_ids=["s3", "s0", "s3"]).write(buf)
    d = _planner_dir(tmp_path)
    derived("planner", [], [buf]).write(d)
    prov = Provenance.read(d)
    ids, sources = set(prov.scenario_ids), prov.sources
    assert ids == {"s0", "s3"} and str(buf) in sources[0]
    with pytest.raises(DatError, match="s0"):
        evaluate(None, _Tiny(), {"dat": str(d)}, split="test")


def test_provenance_follows_dat_to_self_clone_to_corpus(tmp_path):
    """The self-clone's provenance carries its corpus's scenarios; the planner trained from
    the self-clone (on a buffer that records nothing) carries the clone's."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    Provenance(kind="buffer", setting="tiny", scenario_ids=["s2", "s3"]).write(corpus)
    clone_dir = tmp_path / "clone"
    clone_dir.mkdir()
    (clone_dir / "config.json").write_text("{}")
    derived("clone", [], [corpus]).write(clone_dir)
    d = _planner_dir(tmp_path)
    derived("planner", [], [tmp_path / "missing", clone_dir]).write(d)
    prov = Provenance.read(d)
    ids, name = set(prov.scenario_ids), prov.setting
    assert ids == {"s2", "s3"} and name == "tiny" and len(prov.sources) == 2

    status = check_split("dat", AgentSpec.from_dir(d), _Tiny(), "test", {"s0", "s1"})
    assert status == {"status": "ok", "train_scenarios": 2, "sources": [str(d / PROVENANCE_FILE)]}
    assert check_split("base", AgentSpec(), _Tiny(), "test", {"s0"})["status"] == "not-applicable"
    other = tmp_path / "other"
    other.mkdir()
    Provenance(kind="planner", setting="taboo", scenario_ids=["s0"]).write(other)
    assert check_split("x", AgentSpec.from_dir(other), _Tiny(), "test", {"s0"})["status"] == "other-setting"


def test_no_provenance_is_unknown_and_says_how_to_write_one(tmp_path, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    with caplog.at_level("WARNING", logger="dat.evaluate"):
        assert check_split("x", AgentSpec.from_dir(empty), _Tiny(), "test", {"s0"})["status"] == "unknown"
    assert "Provenance(kind=\"planner\", setting='tiny', scenario_ids=[...]).write(" in caplog.text


# ---------------------------------------------------------------------------------- real run
TABOO = {"scenarios": [
    {"id": "bake", "topic": "baking <script>alert(1)</script>",
     "description": "Making bread and cakes in an oven.", "taboo": ["bake", "oven"], "split": "test"},
    {"id": "swim", "topic": "swimming", "description": "Moving through water in a pool or the sea.",
     "taboo": ["swim", "pool"], "split": "test"},
    {"id": "garden", "topic": "gardening", "description": "Growing plants and flowers at home.",
     "taboo": ["garden", "plant"], "split": "train"},
]}


@pytest.fixture
def one_thread():
    """One intra-op thread: on a loaded 2-core machine, two OpenMP threads that spin-wait on
    each other make decoding an order of magnitude slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_evaluate_end_to_end_on_taboo(default_lm, tmp_path, one_thread):
    from dat import envs
    from dat.agent import Agent
    from dat.planner import Planner, UpMapping
    from dat.rollout import RolloutConfig

    data = tmp_path / "taboo.json"
    data.write_text(json.dumps(TABOO))
    setting = envs.make("taboo", data=str(data))
    pdir = Agent(UpMapping.learned(default_lm, action_dim=16),
                 Planner.for_model(default_lm, action_dim=16)).save(tmp_path / "dat")
    Provenance(kind="planner", setting="taboo", scenario_ids=["garden"]).write(pdir)
    agents = {"unsteered": AgentSpec(), "dat": AgentSpec.from_dir(pdir)}
    cfg = RolloutConfig(rounds=1, max_new_tokens=12, batch_size=4)
    out = tmp_path / "eval"
    res = evaluate(default_lm, setting, agents, episodes=2, config=cfg, out_dir=out, n_bootstrap=500)

    for f in ("results.json", "results.md", "samples.html", "reward.png", "reward_by_round.png",
              "episodes/unsteered.jsonl", "episodes/dat.jsonl"):
        assert (out / f).is_file(), f
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
    doc = json.loads((out / "results.json").read_text())
    assert doc["baseline"] == "unsteered" and doc["episodes"] == 2
    assert sorted(doc["scenario_ids"]) == ["bake", "swim"]
    for name in agents:
        a = doc["agents"][name]
        assert a["episodes"] == 2 and a["scored"] + a["judge_failed"] == 2
        assert set(a["reward"]) == {"mean", "se", "ci", "n"}
        assert len(a["reward_by_round"]) == 1
        lang = a["language"]
        assert lang["utterances"] == 2 and lang["truncation_source"] == "generation"
        assert lang["perplexity"] is None or 1.0 < lang["perplexity"] < 1e4
        assert 0.0 <= lang["empty_share"] <= 1.0 and 0.0 <= lang["truncated_share"] <= 1.0
        assert a["split_check"]["status"] == ("ok" if name == "dat" else "not-applicable")
    assert doc["agents"]["unsteered"]["diff_vs_baseline"] is None
    assert doc["agents"]["dat"]["diff_vs_baseline"]["n"] == doc["agents"]["dat"]["scored"]
    # paired: both agents played the same episode ids on the same scenarios
    ids = [[(e["episode_id"], e["scenario_id"]) for e in doc["agents"][n]["per_episode"]] for n in agents]
    assert ids[0] == ids[1]
    page = (out / "samples.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    table = format_table(res)
    assert table.splitlines()[0].startswith("| agent |") and "unsteered" in table and "dat" in table
    assert table in (out / "results.md").read_text()

    # a second run with the same settings reads the episodes back instead of generating
    res2 = evaluate(default_lm, setting, agents, episodes=2, config=cfg, out_dir=out, n_bootstrap=500,
                    compute_perplexity=False, plots=False)
    assert all(a["from_cache"] for a in res2["agents"].values())
    for name in agents:
        assert res2["agents"][name]["reward"] == res["agents"][name]["reward"]
        assert res2["agents"][name]["language"]["truncated_share"] == \
            res["agents"][name]["language"]["truncated_share"]
    assert np.isfinite(res2["agents"]["dat"]["generated_tokens"])


# ---------------------------------------------------------------------------------- tiny model
class _TinySocial(_Tiny):
    """Rewards at the end with per-dimension scores of both agents (like ``social``)."""

    name = "tiny-social"
    rounds = 2
    reward_timing = "end"

    def system_prompts(self, scenario):
        return f"You play scenario {scenario.id}.", "You are the partner."

    def opening(self, scenario):
        from dat.envs.base import Opening

        return Opening("steered")

    def reward(self, episodes, round_index):
        out = []
        for ep in episodes:
            g = float(3 * ep.episode_id)  # deterministic, whatever the tiny model says
            mine, theirs = {"goal": g, "secret": -1.0}, {"goal": 10 - g, "secret": 0.0}
            mine["overall"], theirs["overall"] = (g - 1) / 2, (10 - g) / 2
            failed = ep.episode_id == 2  # one judge failure, to be counted and left out
            out.append(Reward(None, {}, failed=True) if failed else
                          Reward(mine["overall"], {"steered": mine, "partner": theirs}))
        return out


class _TinyRed(_TinySocial):
    """Rewards every round with a Yes/No verdict (like ``redteam``)."""

    name = "tiny-red"
    reward_timing = "round"

    def reward(self, episodes, round_index):
        out = []
        for ep in episodes:
            v = ((ep.episode_id + round_index) % 3) / 2  # 0, 0.5 or 1
            out.append(Reward(v, {}, success=v > 0.5))
        return out


def test_n_samples_per_scenario_at_a_temperature(tiny_lm, tmp_path):
    from dat.planner import UpMapping
    from dat.rollout import RolloutConfig

    agents = {"unsteered": None, "random": AgentSpec.random(UpMapping.learned(tiny_lm, action_dim=4))}
    cfg = RolloutConfig(max_new_tokens=4, batch_size=6, temperature=0.7)
    res = evaluate(tiny_lm, _TinyRed(), agents, episodes=6, split="train", scenarios=1,
                   config=cfg, n_bootstrap=200, plots=False, compute_perplexity=False)
    assert len(set(res["scenario_ids"])) == 1 and len(res["scenario_ids"]) == 6
    d = res["agents"]["random"]["diff_vs_baseline"]
    assert (d["n"], d["pairs"]) == (1, 6)
    with pytest.raises(DatError, match="scenarios must be between 1 and the 2"):
        evaluate(tiny_lm, _TinyRed(), agents, episodes=6, split="train", scenarios=3, config=cfg)


@pytest.mark.parametrize("setting_cls", [_TinySocial, _TinyRed])
def test_evaluate_reports_social_dimensions_and_asr(tiny_lm, tmp_path, setting_cls):
    from dat.planner import UpMapping
    from dat.rollout import RolloutConfig

    agents = {"unsteered": None, "random": AgentSpec.random(UpMapping.learned(tiny_lm, action_dim=4))}
    res = evaluate(tiny_lm, setting_cls(), agents, episodes=3, split="train",
                   config=RolloutConfig(max_new_tokens=6, batch_size=3), out_dir=tmp_path,
                   n_bootstrap=200, samples=2)
    doc = json.loads((tmp_path / "results.json").read_text())
    table = format_table(res)
    for name in agents:
        a = doc["agents"][name]
        assert a["episodes"] == 3
        if setting_cls is _TinySocial:
            assert a["judge_failed"] == 1 and a["scored"] == 2 and a["reward"]["n"] == 2
            assert set(a["dimensions"]) == {"steered", "partner"}
            assert set(a["dimensions"]["steered"]) == {"goal", "secret", "overall"}
            assert a["dimensions"]["steered"]["secret"]["mean"] == -1.0
            assert a["dimensions"]["steered"]["goal"]["mean"] == 1.5  # episodes 0 and 1
            assert a["reward"]["mean"] == pytest.approx(((0 - 1) / 2 + (3 - 1) / 2) / 2)
            assert a["reward_by_round"] == []
        else:
            # rounds (0, .5), (.5, 1), (1, 0): best rounds .5, 1, 1 -> 2 of 3 judged Yes
            assert a["asr"]["rate"] == pytest.approx(2 / 3) and a["asr"]["n"] == 3
            assert a["best_round_reward"]["mean"] == pytest.approx(2.5 / 3)
            assert a["reward"]["mean"] == pytest.approx(1.0)
            assert [r["mean"] for r in a["reward_by_round"]] == pytest.approx([0.5, 0.5])
            assert len(a["reward_by_round"]) == 2
            assert a["best_round_reward"]["n"] == 3
    if setting_cls is _TinySocial:
        assert (tmp_path / "dimensions.png").read_bytes()[:8] == PNG_MAGIC
        assert "## Judge dimensions: steered agent" in (tmp_path / "results.md").read_text()
        assert doc["agents"]["random"]["diff_vs_baseline"]["n"] == 2
    else:
        assert "ASR" in table and (tmp_path / "reward_by_round.png").is_file()
        # 3 episodes on the 2 train scenarios: the difference resamples the 2 scenarios
        d = doc["agents"]["random"]["asr_diff_vs_baseline"]
        assert (d["n"], d["pairs"]) == (2, 3)
    assert (tmp_path / "reward.png").read_bytes()[:8] == PNG_MAGIC
    assert doc["agents"]["random"]["language"]["truncation_source"] == "generation"


def test_eval_cli_refuses_a_planner_named_like_the_baseline(tmp_path):
    from typer.testing import CliRunner

    from dat.cli import app

    d = _planner_dir(tmp_path)
    for item in (f"unsteered={d}", f"x={d} x={d}"):
        args = ["eval", "--out", str(tmp_path / "r")]
        for a in item.split():
            args += ["--agent", a]
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and "is taken" in r.output, r.output
    assert not (tmp_path / "r").exists()
