"""Residual-stream actions: exact and batch-invariant, hook gone after every call, partner
untouched, agents saved and loaded bit-identically, clear errors for bad settings."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from dat.agent import ActionSpace, Agent, setting_prompts
from dat.envs import make
from dat.errors import DatError
from dat.rollout import Rollout, RolloutConfig, episode_jobs
from dat.steer import ResidualAt


def _hooks(lm):
    return sum(len(layer._forward_hooks) for layer in lm.model.base_model.layers)


def _vectors(lm, n, seed=0, scale=25.0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, 1, lm.hidden_size, generator=g), dim=-1) * scale


@pytest.fixture(scope="module")
def taboo():
    return make("taboo")


@pytest.mark.parametrize("positions", ["reply", "all"])
def test_batch_equals_single(default_lm, dialogues, positions):
    pos = ResidualAt(15, positions)
    vec = _vectors(default_lm, len(dialogues))
    plain = default_lm.generate(dialogues, max_new_tokens=16)
    batch = default_lm.generate(dialogues, actions=vec, position=pos, max_new_tokens=16)
    for i, d in enumerate(dialogues):
        assert default_lm.generate([d], actions=vec[i:i + 1], position=pos, max_new_tokens=16) == [batch[i]]
    assert batch != plain  # a vector of ~0.15x the residual norm changes the text


def test_reply_positions_are_exactly_the_hooked_positions(tiny_lm, dialogues):
    """'reply' adds the vector from the last prompt token on: the next-token logits equal a
    hand-written forward with the vector added at that position only."""
    lm = tiny_lm
    d = dialogues[0]
    vec = _vectors(lm, 1, scale=3.0)
    ids = torch.tensor([lm.encode(d)])
    layer = lm.model.base_model.layers[1]

    def add_last(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[:, -1] += vec[0, 0]
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = layer.register_forward_hook(add_last)
    try:
        want = lm.model(input_ids=ids).logits[0, -1].argmax().item()
    finally:
        handle.remove()
    got = lm.generate_detailed([d], actions=vec, position=ResidualAt(1), max_new_tokens=1)
    assert got.token_ids[0][:1] == [want] or (not got.token_ids[0] and want in lm.eos_token_ids)


def test_hook_removed_after_calls_and_errors(default_lm, dialogues):
    lm = default_lm
    before = _hooks(lm)
    vec = _vectors(lm, len(dialogues))
    lm.generate(dialogues, actions=vec, position=ResidualAt(10), max_new_tokens=4)
    lm.loss(dialogues, ["Hello."] * len(dialogues), vec, ResidualAt(10))
    assert _hooks(lm) == before
    ids = lm.encode(dialogues[0])
    batch = lm.make_batch([ids])
    steered = lm.make_batch([ids], [len(ids) - 1], vec[:1], ResidualAt(10))
    with pytest.raises(RuntimeError, match="boom"), lm.steering(steered):
        assert _hooks(lm) == before + 1
        raise RuntimeError("boom")
    assert _hooks(lm) == before
    assert batch.residual is None


def test_loss_batch_equals_single_and_has_gradients(default_lm, dialogues):
    lm = default_lm
    vec = _vectors(lm, len(dialogues)).requires_grad_(True)
    targets = ["I like autumn.", "Arr!", "Dogs are loyal."]
    nll = lm.loss(dialogues, targets, vec, ResidualAt(15))
    for i, d in enumerate(dialogues):
        one = lm.loss([d], [targets[i]], vec[i:i + 1].detach(), ResidualAt(15))
        assert torch.allclose(nll[i], one[0], atol=1e-4)
    nll.sum().backward()
    assert vec.grad is not None and vec.grad.abs().sum() > 0
    assert not torch.allclose(nll.detach(), lm.loss(dialogues, targets))


def test_partner_untouched_and_caches_exact(default_lm, taboo):
    """With the steered model as its own partner, every partner reply equals what the
    unsteered model says to the same dialogue; prefix caches change nothing."""
    lm = default_lm
    prompts = setting_prompts(taboo, "train", limit=16)
    up = ActionSpace(kind="residual", action_dim=16, layer=15).pca(lm, prompts)
    jobs = episode_jobs(taboo, 2, "train", seed=2)
    runs = {}
    for cache in (True, False):
        cfg = RolloutConfig(batch_size=2, rounds=2, max_new_tokens=8, seed=1, prefix_cache=cache)
        runs[cache] = Rollout(lm, taboo, agent=Agent(up), config=cfg).run(jobs)
    for a, b in zip(runs[True], runs[False]):
        assert [t.text for t in a.episode.turns] == [t.text for t in b.episode.turns]
    for r in runs[True]:
        turns = r.episode.turns
        for k, t in enumerate(turns):
            if t.speaker == "partner" and k > 0:
                view = replace(r.episode, turns=turns[:k]).view("partner")
                assert lm.generate([view], max_new_tokens=8) == [t.text]


def test_agent_save_load_bit_identical(default_lm, taboo, tmp_path):
    lm = default_lm
    prompts = setting_prompts(taboo, "train", limit=8)
    states = lm.state(prompts[:4])
    for kind in ("residual", "tokens"):
        space = ActionSpace(kind=kind, action_dim=16, layer=12)
        agent = Agent.new(lm, space.pca(lm, prompts), seed=0)
        agent.save(tmp_path / kind)
        again = Agent.load(tmp_path / kind, lm)
        assert again.kind == kind and again.position == agent.position
        a, b = agent.act(states), again.act(states)
        assert torch.equal(a, b)
        assert torch.equal(agent.embed(a), again.embed(b))
        other = "tokens" if kind == "residual" else "residual"
        with pytest.raises(DatError, match=f"{kind} actions, but {other} actions"):
            Agent.load(tmp_path / kind, lm, kind=other)


def test_bad_settings(default_lm, tiny_lm, dialogues, taboo):
    lm = default_lm
    with pytest.raises(DatError, match="layer 30 is outside .* 30 decoder layers"):
        lm.generate(dialogues, actions=_vectors(lm, 3), position=ResidualAt(30))
    with pytest.raises(DatError, match="layer -1 is outside"):
        ActionSpace(kind="residual", layer=-1).validate(lm)
    for bad in (0.0, -0.1, math.nan, math.inf):
        with pytest.raises(DatError, match="scale must be a finite number > 0"):
            ActionSpace(kind="residual", scale=bad).validate()
    with pytest.raises(DatError, match="needs hidden size >= 64"):
        ActionSpace(kind="residual", action_dim=64, layer=1).pca(tiny_lm, dialogues)
    with pytest.raises(DatError, match="one vector per row"):
        lm.generate(dialogues, actions=_vectors(lm, 3).expand(3, 2, -1), position=ResidualAt(3))
    with pytest.raises(DatError, match="positions must be one of"):
        ResidualAt(3, "prompt")


def test_per_scenario_agents_act_per_scenario_and_refuse_unknown(default_lm, taboo, tmp_path):
    import json

    from dat.agent import ScenarioAgents
    from dat.evaluate import AgentSpec, evaluate

    lm = default_lm
    prompts = setting_prompts(taboo, "train", limit=16)
    up = ActionSpace(kind="residual", action_dim=16, layer=15).pca(lm, prompts)
    jobs = episode_jobs(taboo, 2, "train", seed=0)
    index = {}
    for k, (_, scn) in enumerate(jobs):
        Agent.new(lm, up, seed=k).save(tmp_path / "per" / f"s{k}")
        index[scn.id] = {"dir": f"s{k}"}
    (tmp_path / "per" / "scenarios.json").write_text(json.dumps(index))
    agents = ScenarioAgents.load(tmp_path / "per", lm)
    states = lm.state(prompts[:2])
    ids = [scn.id for _, scn in jobs]
    acts = agents.act(states, scenario_ids=ids)
    for k, sid in enumerate(ids):  # each row acts with its own scenario's planner
        assert torch.equal(acts[k], agents.agents[sid].act(states[k:k + 1])[0].cpu())
    assert not torch.equal(acts[0], agents.agents[ids[1]].act(states[:1])[0].cpu())
    with pytest.raises(DatError, match="has no planner for"):
        evaluate(lm, taboo, {"per": AgentSpec.from_dir(tmp_path / "per")}, 4, split="test",
                 compute_perplexity=False, plots=False)


def test_probe_reports_reliabilities(default_lm, taboo):
    from dat.probe import ProbeConfig, probe, split_half_cosine

    # the measure itself: identical shifts on every scenario -> 1; independent noise -> ~0
    same = np.tile(np.random.default_rng(0).normal(size=(4, 1, 8)), (1, 6, 1))
    assert split_half_cosine(same) == pytest.approx(1.0)
    noise = np.random.default_rng(1).normal(size=(50, 40, 8))
    assert abs(split_half_cosine(noise)) < 0.1
    res = probe(default_lm, taboo, ActionSpace(kind="residual", action_dim=16, layer=15),
                ProbeConfig(directions=2, scenarios=3, max_new_tokens=6, rounds=1))
    assert res["episodes"] == 2 * 3 + 3
    assert -1 <= res["text"]["reliability"] <= 1
    assert 0 <= res["text"]["unchanged_share"] <= 1
    assert res["reward"]["k"] == 2
