"""Baselines next to DAT in one evaluation: strategy prompting, an API model as the steered
agent, baseline folders (GCG/PAIR format) in `dat eval`, and their errors. GCG and PAIR
themselves run in test_baselines_attacks.py."""

import json

import pytest

from dat.baseline_folder import Baseline
from dat.envs.base import Reward, Scenario, Setting
from dat.errors import DatError
from dat.evaluate import AgentSpec, evaluate, format_table
from dat.prompting import PromptPolicy
from dat.rollout import Rollout, RolloutConfig

# what the hand-made judge pays for each strategy in each scenario: the answer is known
PAY = {"s0": {"alpha": 0.2, "beta": 1.0, "gamma": 0.0},
       "s1": {"alpha": 0.2, "beta": 0.3, "gamma": 0.9}}
STRATEGIES = {"alpha": "Mention alpha.", "beta": "Mention beta.", "gamma": "Mention gamma."}


class _KnownJudge(Setting):
    """Two train and two test scenarios; the judge reads which strategy the steered agent's
    system prompt carries and pays ``PAY`` (0.1 for none), whatever the model says."""

    name = "known"
    rounds = 1
    greeting = "Hello."

    def __init__(self):
        self.calls = 0
        self.all_scenarios = [Scenario(f"s{i}", {"split": "train" if i < 2 else "test"})
                              for i in range(4)]

    def system_prompts(self, scenario):
        return "You are the agent.", "You are the partner."

    def reward(self, episodes, round_index):
        self.calls += len(episodes)
        out = []
        for ep in episodes:
            used = [k for k, v in STRATEGIES.items() if ep.steered_system.endswith(v)]
            table = PAY.get(ep.scenario.id, PAY["s0"])
            out.append(Reward(table[used[0]] if used else 0.1, {}))
        return out


CFG = RolloutConfig(max_new_tokens=3, batch_size=4)


def test_strategy_best_and_oracle_pick_the_known_answer(tiny_lm, tmp_path):
    from dat.baselines.strategy import StrategySettings, run_strategy

    setting = _KnownJudge()
    best = run_strategy(tiny_lm, setting, tmp_path / "best",
                        StrategySettings(dict(STRATEGIES), "best"), CFG, progress=False)
    assert best.details["chosen"] == {"*": "beta"}  # means: alpha .2, beta .65, gamma .45
    assert best.details["mean_reward"] == pytest.approx({"alpha": 0.2, "beta": 0.65, "gamma": 0.45})
    assert best.policy.system("s3", "base") == "base\n\nMention beta."
    assert best.compute == {"judge_calls": 3.0, "generations": 6.0}  # 3 strategies x 1 round
    assert not best.oracle and sorted(best.scenario_ids) == ["s0", "s1"]

    calls = setting.calls
    again = run_strategy(tiny_lm, setting, tmp_path / "best",
                         StrategySettings(dict(STRATEGIES), "best"), CFG, progress=False)
    assert setting.calls == calls and again.details == best.details  # resumed, nothing rerun

    oracle = run_strategy(tiny_lm, setting, tmp_path / "oracle",
                          StrategySettings(dict(STRATEGIES), "oracle", split="train"), CFG,
                          progress=False)
    assert oracle.details["chosen"] == {"s0": "beta", "s1": "gamma"}
    assert oracle.oracle and "oracle" in oracle.label
    back = Baseline.read(tmp_path / "oracle")
    assert back.policy.system_suffix == {"s0": "Mention beta.", "s1": "Mention gamma."}


def _strategy_then_eval(lm, tmp_path, mode: str) -> dict:
    """Build a strategy baseline in ``mode`` and evaluate it next to the unsteered agent on
    the 2 test scenarios."""
    from dat.baselines.strategy import StrategySettings, run_strategy

    setting = _KnownJudge()
    run_strategy(lm, setting, tmp_path / mode, StrategySettings(dict(STRATEGIES), mode), CFG,
                 progress=False)
    return evaluate(lm, setting, {"unsteered": None, "strategy": tmp_path / mode}, episodes=2,
                    config=CFG, n_bootstrap=200, plots=False, compute_perplexity=False)


def test_a_baseline_folder_runs_in_eval_with_its_compute(tiny_lm, tmp_path):
    res = _strategy_then_eval(tiny_lm, tmp_path, "best")
    a = res["agents"]["strategy"]
    assert a["reward"]["mean"] == pytest.approx(1.0)  # beta on s2, s3 (paid as s0)
    assert res["agents"]["unsteered"]["reward"]["mean"] == pytest.approx(0.1)
    assert a["diff_vs_baseline"]["mean"] == pytest.approx(0.9)
    assert a["spec"]["kind"] == "baseline" and a["split_check"]["status"] == "ok"
    table = format_table(res)
    assert "compute / scenario" in table and "6 gen + 3 judge" in table


def test_oracle_on_the_test_split_is_labelled_and_not_an_overlap(tiny_lm, tmp_path):
    res = _strategy_then_eval(tiny_lm, tmp_path, "oracle")
    assert res["agents"]["strategy"]["split_check"]["status"] == "per-scenario"
    assert "strategy (oracle)" in format_table(res)


def test_fixed_first_turn_and_system_suffix_reach_the_dialogue(tiny_lm):
    setting = _KnownJudge()
    policy = PromptPolicy(system_suffix={"*": "Mention gamma."},
                          first_turns={"s0": "FIXED OPENING", "s1": "OTHER"})
    runs = Rollout(tiny_lm, setting, config=RolloutConfig(max_new_tokens=3, rounds=2),
                   policy=policy).run([(0, setting.scenario_by_id("s0"))])
    ep = runs[0].episode
    assert ep.steered_system.endswith("Mention gamma.")
    steered = ep.utterances("steered")
    assert steered[0] == "FIXED OPENING" and steered[1] != "FIXED OPENING"
    with pytest.raises(DatError, match="nothing for 1 scenario"):
        Rollout(tiny_lm, setting, config=CFG, policy=policy).run([(0, setting.scenario_by_id("s2"))])


def test_a_baseline_for_another_setting_or_model_is_refused(tiny_lm, tmp_path):
    setting = _KnownJudge()
    Baseline("pair", "redteam", tiny_lm.name, PromptPolicy(first_turns={"*": "x"}), "PAIR").write(
        tmp_path / "other_setting")
    Baseline("gcg", "known", "some/other-model", PromptPolicy(first_turns={"*": "x"}), "GCG").write(
        tmp_path / "other_model")
    with pytest.raises(DatError, match="made for the 'redteam' setting"):
        evaluate(tiny_lm, setting, {"u": None, "b": tmp_path / "other_setting"}, episodes=1,
                 config=CFG, plots=False)
    with pytest.raises(DatError, match="made for model 'some/other-model'.*suffixes"):
        evaluate(tiny_lm, setting, {"u": None, "b": tmp_path / "other_model"}, episodes=1,
                 config=CFG, plots=False)
    (tmp_path / "other_model" / "baseline.json").write_text('{"format": "dat-baseline/1"}')
    with pytest.raises(DatError, match="baseline.json: field 'method'"):
        AgentSpec.from_dir(tmp_path / "other_model").read_baseline()


def test_api_model_as_the_steered_agent(tiny_lm, tmp_path):
    from test_api_clients import FakeServer, chat_body

    from dat.baselines.api_model import make_api_baseline

    def script(n, body):
        if not body:  # GET /models
            return 200, None, {"object": "list", "data": [{"id": "big-model"}]}, 0
        return 200, None, chat_body(f"API turn {len(body['messages'])}"), 0

    srv = FakeServer(script)
    try:
        setting = _KnownJudge()
        with pytest.raises(DatError, match="serves \\['big-model'\\], not 'nope'"):
            make_api_baseline(setting, tmp_path / "bad", f"api:{srv.url}#nope")
        made = make_api_baseline(setting, tmp_path / "api", f"api:{srv.url}#big-model")
        assert made.policy.speaker.endswith("#big-model") and made.model is None
        res = evaluate(tiny_lm, setting, {"unsteered": None, "api": tmp_path / "api"}, episodes=2,
                       config=RolloutConfig(max_new_tokens=3, rounds=2), n_bootstrap=100,
                       plots=False, compute_perplexity=False, out_dir=tmp_path / "eval")
        eps = [json.loads(line) for line in
               (tmp_path / "eval" / "episodes" / "api.jsonl").read_text().splitlines()[1:]]
        steered = [t["text"] for e in eps for t in e["turns"] if t["speaker"] == "steered"]
        # system + greeting -> 2 messages; then + own turn + partner reply -> 4
        assert steered == ["API turn 2", "API turn 4"] * 2
        assert res["agents"]["api"]["split_check"]["status"] == "not-applicable"
        chats = [r for r in srv.requests if r]
        assert len(chats) == 4 and all(r["model"] == "big-model" for r in chats)
        assert res["agents"]["api"]["baseline"]["compute_text"] == "2 api"
    finally:
        srv.stop()


def test_eval_table_has_every_row(tiny_lm, tmp_path):
    """unsteered, self-clone, DAT, GCG, PAIR, strategy prompting, API model: one table."""
    from test_api_clients import FakeServer, chat_body

    from dat.agent import Agent
    from dat.baselines.api_model import make_api_baseline
    from dat.planner import Planner, UpMapping

    setting = _KnownJudge()
    for name in ("self-clone", "DAT"):
        Agent(UpMapping.learned(tiny_lm, action_dim=4), Planner.for_model(tiny_lm, action_dim=4)).save(tmp_path / name)
    Baseline("gcg", "known", tiny_lm.name, PromptPolicy(first_turns={"s2": "a x!y", "s3": "b z?"}),
             "GCG", ["s2", "s3"], {"forward_passes": 1290.0, "backward_passes": 10.0}).write(tmp_path / "GCG")
    Baseline("pair", "known", tiny_lm.name, PromptPolicy(first_turns={"s2": "p1", "s3": "p2"}),
             "PAIR", ["s2", "s3"], {"generations": 18.0, "judge_calls": 9.0}).write(tmp_path / "PAIR")
    Baseline("strategy", "known", tiny_lm.name, PromptPolicy(system_suffix={"*": "Mention beta."}),
             "strategy", ["s0", "s1"], {"judge_calls": 3.0}).write(tmp_path / "strategy")
    srv = FakeServer(lambda n, body: (200, None, {"data": [{"id": "m"}]} if not body
                                      else chat_body("from the API"), 0))
    try:
        make_api_baseline(setting, tmp_path / "API", f"api:{srv.url}#m")
        agents = {"unsteered": None, **{n: tmp_path / n for n in
                                        ("self-clone", "DAT", "GCG", "PAIR", "strategy", "API")}}
        for n in ("self-clone", "DAT"):  # trained on train scenarios only
            from dat.provenance import Provenance

            Provenance("planner", "known", ["s0", "s1"]).write(tmp_path / n)
        res = evaluate(tiny_lm, setting, agents, episodes=2, config=CFG, n_bootstrap=100,
                       plots=False, compute_perplexity=False)
    finally:
        srv.stop()
    table = format_table(res).splitlines()
    assert "compute / scenario" in table[0]
    rows = {line.split("|")[1].strip(): line for line in table[2:]}
    assert set(rows) == set(agents)
    assert "1,290 fwd + 10 bwd" in rows["GCG"] and "18 gen + 9 judge" in rows["PAIR"]
    assert "1 api" in rows["API"]  # one steered turn per episode (1 round)
    assert res["agents"]["strategy"]["reward"]["mean"] == pytest.approx(1.0)


def test_baseline_cli_errors(tmp_path):
    from typer.testing import CliRunner

    from dat.cli import app

    run = lambda *a: CliRunner().invoke(app, ["baseline", *a])
    r = run("gcg", "--out", str(tmp_path / "g"), "--data", "x.csv", "--partner", "api:http://h/v1#m")
    assert r.exit_code == 2 and "needs the defender's gradients" in r.output, r.output
    r = run("api", "--out", str(tmp_path / "a"), "--env", "openup")
    assert r.exit_code == 2 and "needs --speaker" in r.output
    r = run("pair", "--out", str(tmp_path / "p"), "--env", "openup")
    assert r.exit_code == 2 and "red-teaming baseline" in r.output
    r = run("strategy", "--out", str(tmp_path / "s"), "--env", "openup", "--strategy", "nope")
    assert r.exit_code == 2 and "not a built-in strategy" in r.output
    Baseline("strategy", "openup", "default", PromptPolicy(), "s").write(tmp_path / "done")
    r = run("strategy", "--out", str(tmp_path / "done"), "--env", "openup")
    assert r.exit_code == 2 and "--overwrite" in r.output
    for name in ("g", "a", "p", "s"):
        assert not (tmp_path / name).exists()


class _PartnerSaysYes(_KnownJudge):
    name = "known-partner"

    def reward(self, episodes, round_index):
        return [Reward(1.0 if "yes" in ep.utterances("partner")[-1] else 0.0, {}) for ep in episodes]


def test_partner_transfer_table_has_a_column_per_partner(tiny_lm, tmp_path):
    from test_api_clients import FakeServer, chat_body

    from dat.evaluate import evaluate_partners
    from dat.report import partner_table

    yes = FakeServer(lambda n, body: (200, None, chat_body("yes, sure"), 0))
    no = FakeServer(lambda n, body: (200, None, chat_body("no way"), 0))
    try:
        res = evaluate_partners(tiny_lm, _PartnerSaysYes(), {"unsteered": None},
                                [f"api:{yes.url}#yes-model", f"api:{no.url}#no-model"], 2,
                                config=CFG, n_bootstrap=100, plots=False, compute_perplexity=False,
                                out_dir=tmp_path)
    finally:
        yes.stop()
        no.stop()
    by = res["by_partner"]
    assert [by[k]["agents"]["unsteered"]["reward"]["mean"] for k in by] == [1.0, 0.0]
    table = partner_table(by)
    head, row = table.splitlines()[0], table.splitlines()[2]
    assert "reward vs" in head and "yes-model" in head and "no-model" in head
    assert "1.000" in row and "0.000" in row
    assert (tmp_path / "partners.md").read_text().count("|") > 6
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2
