"""TD3+BC (dat.td3bc) on tiny hand-made buffers: seconds, CPU, no language model."""

from __future__ import annotations

import csv
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dat import td3bc
from dat.errors import DatError
from dat.agent import Agent
from dat.planner import Planner, PlannerConfig, UpMapping, UpMappingConfig
from dat.td3bc import TD3BC, TD3BCConfig, load_critics, td_target, train
from dat.training import NonFiniteLossError
from dat.transitions import TransitionDataset, set_planner_state_norm

H, D = 8, 4  # tiny hidden size and action size


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is much faster, and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sphere(x: torch.Tensor, norm: float = 1.0) -> torch.Tensor:
    return x * (norm / x.norm(dim=-1, keepdim=True))


def bandit_data(n: int = 256, seed: int = 0, a_star: torch.Tensor | None = None,
                scenario_ids=None) -> tuple[TransitionDataset, torch.Tensor]:
    """One-step episodes whose reward is cos(a, a*): the best action a* is known."""
    g = torch.Generator().manual_seed(seed)
    if a_star is None:
        a_star = sphere(torch.randn(D, generator=g))
    states = torch.randn(n, H, generator=g) * 3 + 1  # not standardised: the norm must handle it
    actions = sphere(torch.randn(n, D, generator=g))
    rewards = F.cosine_similarity(actions, a_star.expand(n, D), dim=-1)
    data = TransitionDataset(states, actions, rewards, torch.randn(n, H, generator=g),
                             torch.ones(n), scenario_ids=scenario_ids)
    return data, a_star


def fast(**kw) -> TD3BCConfig:
    base = {"critic_lr": 1e-3, "actor_lr": 1e-3, "batch_size": 64, "progress": False,
            "tensorboard": False, "checkpoint_every": 0, "device": "cpu", "seed": 0}
    return TD3BCConfig(**{**base, **kw})


def new_agent(data: TransitionDataset, config: TD3BCConfig) -> TD3BC:
    torch.manual_seed(0)
    planner = Planner(PlannerConfig(H, D, act_norm=1.0))
    set_planner_state_norm(planner, data.state_mean, data.state_std, preserve_function=False)
    return TD3BC(planner, config)


def cos_to(planner: Planner, states: torch.Tensor, a_star: torch.Tensor) -> float:
    with torch.no_grad():
        pi = planner(states)
        return float(F.cosine_similarity(pi, a_star.expand(len(states), D), dim=-1).mean())


# ---------------------------------------------------------------------------------------------
# the update moves critics and actor the right way
# ---------------------------------------------------------------------------------------------


def test_one_update_moves_critics_and_actor_toward_the_better_action():
    data, a_star = bandit_data()
    agent = new_agent(data, fast(policy_freq=10**9))  # critics only, for now
    batch = data.batch(torch.arange(len(data)))
    s, a, r = batch["states"], batch["actions"], batch["rewards"]

    def critic_mse() -> float:  # done = 1 everywhere, so the TD target is exactly r
        with torch.no_grad():
            return float(F.mse_loss(agent.critic1(s, a), r) + F.mse_loss(agent.critic2(s, a), r))

    before = critic_mse()
    agent.update(batch)
    assert critic_mse() < before  # one critic step fits the rewards better

    for _ in range(300):  # let the critic learn Q(s, a) = cos(a, a*)
        agent.update(batch)
    with torch.no_grad():
        q_good = agent.critic1(s, a_star.expand(len(s), D)).mean()
        q_bad = agent.critic1(s, -a_star.expand(len(s), D)).mean()
    assert q_good > q_bad + 0.5

    # one actor step on a well-trained critic lowers the actor loss on that batch
    def actor_loss() -> float:
        with torch.no_grad():
            pi = agent.actor(s)
            q = agent.critic1(s, pi)
            return float(-(agent.config.alpha / q.abs().mean()) * q.mean() + agent.bc_term(pi, a))

    agent.config.policy_freq = 1  # from now on the actor is updated at every step
    before_loss, before_cos = actor_loss(), cos_to(agent.actor, s, a_star)
    m = agent.update(batch)
    assert {"actor_loss", "bc_term", "lambda", "q_pi_mean", "pi_norm"} <= set(m)
    assert actor_loss() < before_loss
    for _ in range(150):
        agent.update(batch)
    after_cos = cos_to(agent.actor, s, a_star)
    assert after_cos > before_cos + 0.3, (before_cos, after_cos)
    assert after_cos > 0.8
    # actions stay on the act_norm sphere
    with torch.no_grad():
        assert torch.allclose(agent.actor(s).norm(dim=-1), torch.ones(len(s)), atol=1e-5)


def test_train_moves_the_actor_toward_the_better_action(tmp_path):
    data, a_star = bandit_data()
    res = train(data, tmp_path, fast(epochs=60))
    assert res.steps == 60 * 4
    torch.manual_seed(0)
    start = Planner(PlannerConfig(H, D, act_norm=1.0))  # the same initial weights (seed 0)
    set_planner_state_norm(start, data.state_mean, data.state_std, preserve_function=False)
    assert cos_to(res.planner, data.states, a_star) > cos_to(start, data.states, a_star) + 0.3


def test_alpha_zero_is_plain_td3(tmp_path):
    data, a_star = bandit_data()
    agent = new_agent(data, fast(alpha=0.0, policy_freq=1))
    batch = data.batch(torch.arange(len(data)))
    m = agent.update(batch)
    assert m["lambda"] == 1.0
    assert m["actor_loss"] == pytest.approx(-m["q_pi_mean"], rel=1e-5)  # no BC term in the loss
    res = train(data, tmp_path, fast(alpha=0.0, epochs=40))
    assert res.metrics["lambda"] == 1.0
    assert cos_to(res.planner, data.states, a_star) > 0.5


def held_directions_data(k: int = 6, n: int = 240, seed: int = 0):
    """An exploration buffer of ``k`` random directions, each held on ``n / k`` states that do
    not say which one was taken; direction ``j`` earns ``j / k`` (plus noise): the last is best."""
    g = torch.Generator().manual_seed(seed)
    dirs = sphere(torch.randn(k, D, generator=g))
    which = torch.arange(n) % k
    rewards = which.float() / k + 0.05 * torch.randn(n, generator=g)
    data = TransitionDataset(torch.randn(n, H, generator=g), dirs[which], rewards,
                             torch.randn(n, H, generator=g), torch.ones(n))
    return data, dirs


def test_bc_toward_the_best_explored_direction_stays_on_the_data(tmp_path):
    data, dirs = held_directions_data()
    cfg = {"epochs": 150, "alpha": 0.02, "bc_candidates": 64}
    own = train(data, tmp_path / "data", fast(**cfg))
    best = train(data, tmp_path / "best", fast(bc_target="best", **cfg))
    with torch.no_grad():
        cos_own = F.normalize(own.planner(data.states), dim=-1) @ dirs.T
        cos_best = F.normalize(best.planner(data.states), dim=-1) @ dirs.T
    # BC toward the critic's best: on the best direction; toward each transition's own
    # action: pulled toward the average of all directions, well off the best one
    assert cos_best[:, -1].mean() > 0.9
    assert cos_own[:, -1].mean() < cos_best[:, -1].mean() - 0.2
    assert best.metrics["pi_data_cos"] > 0.9


def test_bc_target_best_resumes_exactly(tmp_path):
    data, _ = held_directions_data()
    cfg = {"epochs": 2, "checkpoint_every": 4, "bc_target": "best", "bc_candidates": 16}
    straight = train(data, tmp_path / "a", fast(**cfg))
    train(data, tmp_path / "b", fast(max_steps=5, **cfg))
    second = train(data, tmp_path / "b", fast(**cfg))
    for (k, v), (_, w) in zip(straight.planner.state_dict().items(),
                              second.planner.state_dict().items()):
        assert torch.equal(v, w), k


# ---------------------------------------------------------------------------------------------
# critic targets and target-policy smoothing
# ---------------------------------------------------------------------------------------------


def test_td_target_by_hand():
    r = torch.tensor([1.0, 2.0, -0.5])
    done = torch.tensor([0.0, 1.0, 0.0])
    q1 = torch.tensor([3.0, 5.0, 2.0])
    q2 = torch.tensor([4.0, 1.0, -1.0])
    # 1 + 0.9*min(3,4) = 3.7;  2 (terminal);  -0.5 + 0.9*min(2,-1) = -1.4
    assert torch.allclose(td_target(r, done, q1, q2, 0.9), torch.tensor([3.7, 2.0, -1.4]))


def test_critic_target_uses_min_of_target_critics_gamma_and_done():
    data, _ = bandit_data(n=4)
    agent = new_agent(data, fast(gamma=0.5))
    with torch.no_grad():  # target critics output the constants 3 and 2 for every input
        for q, c in ((agent.critic1_target, 3.0), (agent.critic2_target, 2.0)):
            q.net[-1].weight.zero_()
            q.net[-1].bias.fill_(c)
    r = torch.tensor([1.0, 0.0, -1.0, 0.25])
    done = torch.tensor([0.0, 1.0, 0.0, 1.0])
    y, next_a = agent.critic_target(r, data.next_states, done)
    assert torch.allclose(y, torch.tensor([1.0 + 0.5 * 2, 0.0, -1.0 + 0.5 * 2, 0.25]))
    assert torch.allclose(next_a.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_target_noise_is_scaled_to_the_action_sphere():
    data, _ = bandit_data()
    cfg = fast(policy_noise=0.2, noise_clip=0.5)
    agent = new_agent(data, cfg)
    unit = 1.0 / math.sqrt(D)
    noise = agent.target_noise(torch.Size([20000, D]))
    assert noise.abs().max() <= 0.5 * unit + 1e-6
    assert float(noise.std()) == pytest.approx(0.2 * unit, rel=0.05)
    absolute = new_agent(data, fast(noise_scale="absolute")).target_noise(torch.Size([20000, D]))
    assert float(absolute.abs().max()) == pytest.approx(0.5, abs=1e-6)


def test_state_norm_change_keeps_a_trained_planner_unchanged():
    torch.manual_seed(1)
    planner = Planner(PlannerConfig(H, D, act_norm=0.6))
    planner.set_state_norm(torch.randn(H), torch.rand(H) + 0.5)
    s = torch.randn(32, H) * 4
    with torch.no_grad():
        before = planner(s)
        set_planner_state_norm(planner, torch.randn(H) * 2, torch.rand(H) * 3 + 0.1)
        after = planner(s)
    assert torch.allclose(before, after, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# failures, checkpoints, resume, saving
# ---------------------------------------------------------------------------------------------


def test_nan_stops_with_a_clear_message_and_the_last_checkpoint_survives(tmp_path, monkeypatch):
    data, _ = bandit_data()  # 4 updates per epoch
    original = TD3BC.update

    def poisoned(self, batch):
        m = original(self, batch)
        if self.step == 5:  # the weights go bad after step 5; the loss of step 6 is NaN
            with torch.no_grad():
                self.critic1.net[0].weight.fill_(float("nan"))
        return m

    monkeypatch.setattr(TD3BC, "update", poisoned)
    cfg = fast(epochs=3, checkpoint_every=2, keep_checkpoints=1)
    with pytest.raises(NonFiniteLossError) as err:
        train(data, tmp_path, cfg)
    msg = str(err.value)
    assert "critic loss is nan at update step 6" in msg
    assert "step-00000004" in msg and "last good checkpoint" in msg
    ckpt = tmp_path / "checkpoints" / "step-00000004"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 4
    weights = load_file(str(ckpt / "networks.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (tmp_path / "model.safetensors").exists()  # no final actor from a failed run

    monkeypatch.setattr(TD3BC, "update", original)  # a rerun resumes from step 4 and finishes
    res = train(data, tmp_path, cfg)
    assert res.steps == 12
    summary = json.loads((tmp_path / "td3bc.json").read_text())
    assert summary["steps_this_run"] == 8


def test_weights_turning_nan_are_never_checkpointed(tmp_path, monkeypatch):
    data, _ = bandit_data()
    original = TD3BC.update

    def poisoned(self, batch):
        m = original(self, batch)
        if self.step == 2:
            with torch.no_grad():
                self.actor.net[0].bias.fill_(float("inf"))
        return m

    monkeypatch.setattr(TD3BC, "update", poisoned)
    with pytest.raises(DatError, match="step 2"):
        train(data, tmp_path, fast(checkpoint_every=2))
    assert not (tmp_path / "checkpoints" / "step-00000002").exists()


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    data, _ = bandit_data()
    straight = train(data, tmp_path / "a", fast(epochs=3, checkpoint_every=5))
    first = train(data, tmp_path / "b", fast(epochs=3, checkpoint_every=5, max_steps=7))
    assert first.steps == 7
    second = train(data, tmp_path / "b", fast(epochs=3, checkpoint_every=5))
    assert second.steps == 12
    for (k, v), (_, w) in zip(straight.planner.state_dict().items(),
                              second.planner.state_dict().items()):
        assert torch.equal(v, w), k
    with (tmp_path / "b" / "logs" / "metrics.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == list(range(1, 13))  # nothing lost, nothing duplicated
    # only the last checkpoint is kept
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["step-00000012"]


def test_resume_refuses_a_different_batch_size(tmp_path):
    data, _ = bandit_data()
    train(data, tmp_path, fast(max_steps=2))
    with pytest.raises(DatError, match="batch_size"):
        train(data, tmp_path, fast(batch_size=32))
    res = train(data, tmp_path, fast(batch_size=32, overwrite=True, max_steps=3))
    assert res.steps == 3


def test_resume_refuses_another_run_naming_what_differs(tmp_path):
    data, _ = bandit_data()
    train(data, tmp_path, fast(max_steps=2, checkpoint_every=1))
    other, _ = bandit_data(seed=1)  # another buffer of the same size
    with pytest.raises(DatError, match=r"another run; these differ: data"):
        train(other, tmp_path, fast(max_steps=4))
    with pytest.raises(DatError, match=r"differ: actor_lr .*alpha"):
        train(data, tmp_path, fast(max_steps=4, alpha=1.0, actor_lr=1e-4))
    assert train(data, tmp_path, fast(max_steps=4)).steps == 4  # the same run resumes


def test_a_trained_agent_is_never_overwritten_unasked(tmp_path):
    data, _ = bandit_data()
    first = train(data, tmp_path / "a", fast(max_steps=2, checkpoint_every=0))
    before = (tmp_path / "a" / "model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "a" / "checkpoints")  # e.g. a copied agent: no checkpoints
    with pytest.raises(DatError, match="already holds a trained agent.*--overwrite"):
        train(data, tmp_path / "a", fast(max_steps=2))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == before
    with pytest.raises(DatError, match="is the starting planner"):
        train(data, tmp_path / "a", fast(max_steps=2, overwrite=True), init=tmp_path / "a")
    (tmp_path / "a" / "clone.json").write_text("{}")  # a summary of the weights to be replaced
    train(data, tmp_path / "a", fast(max_steps=3, overwrite=True, seed=1))
    assert not (tmp_path / "a" / "clone.json").exists()
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != before
    assert first.steps == 2


def test_a_garbled_checkpoint_state_is_a_clear_error(tmp_path):
    data, _ = bandit_data()
    train(data, tmp_path, fast(max_steps=2, checkpoint_every=1))
    state = next((tmp_path / "checkpoints").glob("step-*")) / "state.json"
    state.write_bytes(b"\xff{not json")
    with pytest.raises(DatError, match=r"state.json: unreadable checkpoint state"):
        train(data, tmp_path, fast(max_steps=4))


def test_save_load_round_trip_with_up_mapping(tmp_path):
    data, _ = bandit_data()
    up = UpMapping(UpMappingConfig(H, D, n_tokens=2, kind="pca"))
    with torch.no_grad():
        up.components.copy_(torch.linalg.qr(torch.randn(H, D))[0].T)
    res = train(data, tmp_path, fast(epochs=2), up_mapping=up)
    loaded = Agent.load(tmp_path)
    planner, up2 = loaded.planner, loaded.up
    with torch.no_grad():
        assert torch.allclose(planner(data.states), res.planner(data.states), atol=1e-6)
    assert torch.allclose(planner.state_mean, data.state_mean)
    assert torch.allclose(planner.state_std, data.state_std.clamp_min(1e-3))
    assert planner.config.state_norm["count"] == len(data)
    assert torch.equal(up2.components, up.components)
    q1, _ = load_critics(tmp_path / "critics")
    assert torch.allclose(q1.state_mean, planner.state_mean)
    # a saved planner can be the starting point of another run (its function is preserved)
    res2 = train(data, tmp_path / "again", fast(max_steps=1, actor_lr=1e-12))
    res3 = train(data, tmp_path / "from_saved", fast(max_steps=1, actor_lr=1e-12), init=tmp_path)
    assert (tmp_path / "from_saved" / "up_mapping" / "config.json").is_file()
    with torch.no_grad():
        assert torch.allclose(res3.planner(data.states), planner(data.states), atol=1e-4)
        assert not torch.allclose(res2.planner(data.states), planner(data.states), atol=1e-4)


def test_planner_only_saved_without_up_mapping(tmp_path):
    data, _ = bandit_data()
    res = train(data, tmp_path, fast(max_steps=2))
    loaded = Planner.from_pretrained(tmp_path)
    assert not (tmp_path / "up_mapping").exists()
    with torch.no_grad():
        assert torch.allclose(loaded(data.states), res.planner(data.states), atol=1e-6)


def test_per_scenario_trains_one_actor_per_scenario(tmp_path):
    n = 128
    a = sphere(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    b = sphere(torch.tensor([0.0, 0.0, -1.0, 0.0]))
    da, _ = bandit_data(n, seed=1, a_star=a)
    db, _ = bandit_data(n, seed=2, a_star=b)

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(da, name), getattr(db, name)])

    data = TransitionDataset(cat("states"), cat("actions"), cat("rewards"), cat("next_states"),
                             cat("dones"), scenario_ids=["a/1"] * n + ["b"] * n)
    res = train(data, tmp_path, fast(per_scenario=True, epochs=100, batch_size=32))
    assert res.planner is None and set(res.per_scenario) == {"a/1", "b"}
    index = json.loads((tmp_path / "scenarios.json").read_text())
    assert index["a/1"]["transitions"] == n and index["b"]["steps"] == 400
    pa = Planner.from_pretrained(tmp_path / index["a/1"]["dir"])
    pb = Planner.from_pretrained(tmp_path / index["b"]["dir"])
    s = data.states
    assert cos_to(pa, s, a) > 0.7 and cos_to(pb, s, b) > 0.7  # each learns its own best action
    assert cos_to(pa, s, b) < 0.3 and cos_to(pb, s, a) < 0.3


def test_logs_csv_and_tensorboard(tmp_path):
    data, _ = bandit_data()
    train(data, tmp_path, fast(epochs=2, tensorboard=True, log_dir=str(tmp_path / "tb")))
    with (tmp_path / "tb" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert rows[1]["actor_loss"] and not rows[0]["actor_loss"]  # actor every 2nd update
    assert float(rows[1]["pi_norm"]) == pytest.approx(1.0, abs=1e-4)
    if _has_tensorboard():
        assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------------------------
# from a buffer folder (dat.buffer)
# ---------------------------------------------------------------------------------------------


def write_buffer(directory, episodes: int = 24, steps: int = 3, failed: bool = False,
                 meta: dict | None = None) -> torch.Tensor:
    """A buffer of ``episodes`` bandit-like episodes over two scenarios; returns a*."""
    buffer = pytest.importorskip("dat.buffer")
    g = torch.Generator().manual_seed(0)
    a_star = sphere(torch.randn(D, generator=g))
    writer = buffer.BufferWriter(directory, {"hidden_size": H, "action_dim": D, **(meta or {})})
    records = []
    for e in range(episodes):
        actions = sphere(torch.randn(steps, D, generator=g))
        rewards = F.cosine_similarity(actions, a_star.expand(steps, D), dim=-1)
        records.append(buffer.EpisodeRecord(
            e, "s1" if e % 2 else "s0", torch.randn(steps + 1, H, generator=g), actions,
            rewards, [False] * (steps - 1) + [True], episode={"e": e}, judge_failed=failed))
    writer.write(records)
    return a_star


def test_train_from_buffer_folder(tmp_path):
    write_buffer(tmp_path / "buf", meta={"model": "tiny"})
    res = td3bc.train_from_buffer(tmp_path / "buf", tmp_path / "out", fast(epochs=2))
    assert res.steps == 2 * math.ceil(24 * 3 / 64)
    planner = Planner.from_pretrained(tmp_path / "out")
    assert planner.config.state_norm["source"] == str(tmp_path / "buf")
    assert planner.config.base_model == "tiny" and planner.config.hidden_size == H
    # per scenario: the buffer's scenario ids split the transitions
    res = td3bc.train_from_buffer(tmp_path / "buf", tmp_path / "per", fast(per_scenario=True))
    assert set(res.per_scenario) == {"s0", "s1"}
    assert json.loads((tmp_path / "per" / "scenarios.json").read_text())["s0"]["transitions"] == 36
    # a planner made for another model is refused
    other = Planner(PlannerConfig(H, D, act_norm=1.0, base_model="other-model"))
    with pytest.raises(DatError, match="other-model"):
        td3bc.train_from_buffer(tmp_path / "buf", tmp_path / "x", fast(), init=other)


def test_buffer_without_usable_transitions_is_a_clear_error(tmp_path):
    write_buffer(tmp_path / "buf", episodes=2, failed=True)  # every judge failed
    with pytest.raises(DatError, match="empty"):
        td3bc.train_from_buffer(tmp_path / "buf", tmp_path / "out", fast())


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_empty_buffer_is_a_clear_error():
    with pytest.raises(DatError, match="empty"):
        TransitionDataset(torch.zeros(0, H), torch.zeros(0, D), torch.zeros(0), torch.zeros(0, H),
                          torch.zeros(0))


def test_bad_fields_are_clear_errors(tmp_path):
    data, _ = bandit_data(n=8)
    rewards = data.rewards.clone()
    rewards[3] = float("nan")
    with pytest.raises(DatError, match="'rewards'.*transition 3"):
        TransitionDataset(data.states, data.actions, rewards, data.next_states, data.dones)
    with pytest.raises(DatError, match="next_states"):
        TransitionDataset(data.states, data.actions, data.rewards, data.next_states[:, :3],
                          data.dones)
    with pytest.raises(DatError, match="per-scenario"):
        train(data, tmp_path, fast(per_scenario=True))


def test_planner_for_another_hidden_size_is_refused(tmp_path):
    data, _ = bandit_data(n=16)
    other = Planner(PlannerConfig(H + 4, D, act_norm=1.0))
    with pytest.raises(DatError, match="hidden size 12.*size 8"):
        train(data, tmp_path, fast(), init=other)
    other.save_pretrained(tmp_path / "saved")
    with pytest.raises(DatError, match="hidden size"):
        train(data, tmp_path / "out", fast(), init=tmp_path / "saved")


def test_act_norm_mismatch_is_refused(tmp_path):
    data, _ = bandit_data(n=16)
    with pytest.raises(DatError, match="act_norm"):
        train(data, tmp_path, fast(), init=Planner(PlannerConfig(H, D, act_norm=0.6)))


def test_bad_config_is_refused():
    with pytest.raises(DatError, match="alpha"):
        TD3BCConfig(alpha=-1).validate()
    with pytest.raises(DatError, match="noise_scale"):
        TD3BCConfig(noise_scale="big").validate()
    with pytest.raises(DatError, match="bc_target"):
        TD3BCConfig(bc_target="mean").validate()
    with pytest.raises(DatError, match="bc_candidates"):
        TD3BCConfig(bc_candidates=0).validate()


def test_train_from_buffer_missing_folder(tmp_path):
    with pytest.raises(DatError, match="does not exist"):
        td3bc.train_from_buffer(tmp_path / "nope", tmp_path / "out", fast())


# ---------------------------------------------------------------------------------------------

def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True
