"""Rollout engine: lock-step batches equal one-by-one runs; slots refill; actions seeded."""

import pytest
import torch

from dat import UpMapping
from dat.envs import make
from dat.rollout import Rollout, RolloutConfig, episode_jobs


@pytest.fixture(scope="module")
def taboo():
    return make("taboo")


def _run(lm, setting, jobs, batch, up=None, noise=0.0):
    cfg = RolloutConfig(batch_size=batch, rounds=2, max_new_tokens=12, noise=noise, seed=3)
    return {r.episode.episode_id: r for r in Rollout(lm, setting, up_mapping=up, config=cfg).run(jobs)}


@pytest.mark.parametrize("steered", [False, True])
def test_batched_equals_one_by_one(default_lm, taboo, steered):
    up = UpMapping.from_embedding_pca(default_lm, 16, 2) if steered else None
    jobs = episode_jobs(taboo, 3, "train", seed=1)
    batched = _run(default_lm, taboo, jobs, batch=3, up=up)
    single = {}
    for job in jobs:
        single.update(_run(default_lm, taboo, [job], batch=1, up=up))
    assert sorted(batched) == [0, 1, 2]
    for i in batched:
        a, b = batched[i], single[i]
        assert [(t.speaker, t.text) for t in a.episode.turns] == [(t.speaker, t.text) for t in b.episode.turns]
        assert torch.allclose(a.states, b.states, atol=1e-4)
        assert torch.equal(a.actions, b.actions)
        assert a.rewards == pytest.approx(b.rewards, abs=1e-5)
        # partner greeting + 2 rounds of (steered, partner)
        assert [t.speaker for t in a.episode.turns] == ["partner", "steered", "partner", "steered", "partner"]
        # s_0 and s_1; the terminal s_2 only with RolloutConfig(terminal_states=True)
        assert a.states.shape == (2, default_lm.hidden_size)
        assert a.actions.shape == ((2, 16) if steered else (2, 0))
        assert all(0.0 <= r <= 1.0 for r in a.rewards)


def test_slots_refill_and_ids(default_lm, taboo):
    jobs = episode_jobs(taboo, 5, "train", seed=0)
    out = _run(default_lm, taboo, jobs, batch=2)
    assert sorted(out) == [0, 1, 2, 3, 4]
    assert [out[i].episode.scenario.id for i in range(5)] == [s.id for _, s in jobs]
    # the same id always gets the same scenario
    assert [s.id for _, s in episode_jobs(taboo, 5, "train", seed=0)] == [s.id for _, s in jobs]


def test_noise_is_per_episode_and_seeded(default_lm, taboo):
    from dat import Planner

    up = UpMapping.from_embedding_pca(default_lm, 16, 2)
    planner = Planner.for_model(default_lm, action_dim=16)
    cfg = RolloutConfig(batch_size=2, rounds=1, max_new_tokens=4, noise=0.25, seed=5)
    r = Rollout(default_lm, taboo, planner=planner, up_mapping=up, config=cfg)
    jobs = episode_jobs(taboo, 2, "train")
    a = {e.episode.episode_id: e.actions for e in r.run(jobs)}
    b = {e.episode.episode_id: e.actions for e in Rollout(default_lm, taboo, planner=planner, up_mapping=up,
                                                            config=cfg).run(jobs[::-1])}
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.allclose(a[0].norm(dim=-1), torch.ones(1), atol=1e-5)
    assert not torch.allclose(a[0], a[1])


def test_explore_directions_are_held_per_episode_and_shared_mod_k(tiny_lm, taboo):
    up = UpMapping.from_embedding_pca(tiny_lm, 8, 2)
    cfg = RolloutConfig(batch_size=3, rounds=2, max_new_tokens=3, seed=7, explore_directions=2)
    jobs = episode_jobs(taboo, 5, "train")
    a = {e.episode.episode_id: e.actions for e in Rollout(tiny_lm, taboo, up_mapping=up, config=cfg).run(jobs)}
    for i in range(5):  # one direction for all steps of an episode, of norm act_norm
        assert torch.equal(a[i][0], a[i][1])
        assert a[i][0].norm().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(a[0], a[2]) and torch.equal(a[0], a[4]) and torch.equal(a[1], a[3])
    assert not torch.allclose(a[0], a[1])
    # without it, every step draws a fresh direction
    fresh = next(iter(Rollout(tiny_lm, taboo, up_mapping=up, config=RolloutConfig(
        batch_size=3, rounds=2, max_new_tokens=3, seed=7)).run(jobs[:1]))).actions
    assert not torch.allclose(fresh[0], fresh[1])


@pytest.mark.parametrize("steered", [False, True])
def test_prefix_cache_equals_full_reencoding(default_lm, taboo, steered):
    """Keeping KV caches across turns gives the same episodes as re-encoding every prompt."""
    up = UpMapping.from_embedding_pca(default_lm, 16, 2) if steered else None
    jobs = episode_jobs(taboo, 3, "train", seed=2)
    runs = []
    for cached in (True, False):
        cfg = RolloutConfig(batch_size=3, rounds=2, max_new_tokens=12, seed=3, prefix_cache=cached)
        runs.append({r.episode.episode_id: r for r in Rollout(default_lm, taboo, up_mapping=up, config=cfg).run(jobs)})
    for i, a in runs[0].items():
        b = runs[1][i]
        assert [t.text for t in a.episode.turns] == [t.text for t in b.episode.turns]
        assert torch.allclose(a.states, b.states, atol=1e-4)
        assert a.rewards == pytest.approx(b.rewards, abs=1e-5)


def test_a_judge_failing_on_the_whole_first_batch_stops_the_run(tiny_lm):
    import pytest

    from dat.envs import Reward, Taboo
    from dat.errors import DatError
    from dat.rollout import JudgeFailedError

    class Unjudgeable(Taboo):
        def reward(self, episodes, round_index):
            self.calls = getattr(self, "calls", 0) + 1
            return [Reward(None, {"raw": "I cannot write JSON"}, failed=True) for _ in episodes]

    setting = Unjudgeable(rounds=2)
    jobs = episode_jobs(setting, 4)
    cfg = RolloutConfig(batch_size=2, max_new_tokens=3)
    with pytest.raises(JudgeFailedError, match="failed on all 2 episodes.*--judge 'api:.*"
                                               "--allow-judge-failures") as info:
        Rollout(tiny_lm, setting, config=cfg).run(jobs)
    assert isinstance(info.value, DatError) and setting.calls == 1  # stopped at once
    done = Rollout(tiny_lm, setting, config=RolloutConfig(
        batch_size=2, max_new_tokens=3, allow_judge_failures=True)).run(jobs)
    assert len(done) == 4 and all(r.judge_failed for r in done)
