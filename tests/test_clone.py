"""Self-cloning (dat.clone) on a tiny corpus written with the real buffer writer, with the real
default model (SmolLM2-135M-Instruct). Kept small: short prompts, short utterances."""

from __future__ import annotations

import csv
import itertools
import json
import shutil

import numpy as np
import pytest
import torch

from dat import clone as dc
from dat import clone_data as cd
from dat.buffer import Buffer, BufferWriter, EpisodeRecord
from dat.clone import CloneConfig
from dat.clone_data import CloneExample
from dat.envs.base import Episode, Scenario, Turn
from dat.errors import DatError
from dat.agent import Agent

SYSTEMS = [f"Reply with one short sentence about {x}."
           for x in ("the sea", "bread", "music", "trees")]
OPENERS = ["Hi!", "Hello, how are you?", "Good morning!", "Hey there."]
FOLLOW_UPS = ["Tell me more.", "Why?", "Nice.", "Really?"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy 2-core box: one thread is several times faster
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lm(default_lm):
    return default_lm


def make_episodes(lm, n: int = 4, steered_turns: int = 2, max_new_tokens: int = 24,
                  steered: bool = True) -> list[Episode]:
    """Partner opens; the steered agent answers with the model's own greedy replies (short
    enough to end with the model's own end-of-turn token)."""
    eps = [Episode(i, Scenario(f"s{i}", {}), SYSTEMS[i % 4], "Be friendly.",
                   [Turn("partner", OPENERS[i % 4])]) for i in range(n)]
    for r in range(steered_turns):
        if steered:
            replies = lm.generate([e.view("steered") for e in eps], max_new_tokens=max_new_tokens)
            for e, text in zip(eps, replies):
                e.turns.append(Turn("steered", text))
        for i, e in enumerate(eps):
            e.turns.append(Turn("partner", FOLLOW_UPS[(i + r) % 4]))
    return eps


def write_corpus(directory, lm, episodes: list[Episode], model: str | None = None):
    """A corpus folder as `dat collect --terminal-states` writes it without a planner (no
    actions); the terminal row also lets an episode without steered turns be stored."""
    w = BufferWriter(directory, {"kind": "corpus", "model": model or lm.name, "terminal_states": True,
                                 "hidden_size": lm.hidden_size, "action_dim": 0})
    records = []
    for e in episodes:
        T = len(e.utterances("steered"))
        records.append(EpisodeRecord(e.episode_id, e.scenario.id,
                                     np.zeros((T + 1, lm.hidden_size), np.float32),
                                     np.zeros((T, 0), np.float32), [0.0] * T,
                                     [t == T - 1 for t in range(T)], e))
    w.write(records)
    return directory


@pytest.fixture(scope="module")
def corpus(lm, tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), lm, make_episodes(lm))


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def small(**kw) -> CloneConfig:
    base = {"action_dim": 16, "epochs": 4, "batch_size": 2, "grad_accum": 1, "lr": 3e-4,
            "up_mapping_lr": 3e-2,
            "warmup_fraction": 0.0, "eval_fraction": 0.25, "progress": False,
            "keep_checkpoints": 0, "fidelity_generate": 2, "fidelity_max_new_tokens": 24,
            "fidelity_examples": 4}
    base.update(kw)
    return CloneConfig(**base)


@pytest.fixture(scope="module")
def trained(lm, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("clone")
    return dc.clone(lm, corpus, out, small())


# ---------------------------------------------------------------------------------- examples


def test_examples_are_the_steered_view_before_each_utterance(lm, corpus):
    examples, meta = cd.load_corpus(corpus)
    assert meta["kind"] == "corpus"
    assert len(examples) == 8  # 4 episodes x 2 steered utterances
    rec = next(r for r in Buffer(corpus).episodes() if r["episode_id"] == 0)
    turns = rec["episode"]["turns"]
    first, second = [e for e in examples if e.episode_id == 0]
    assert first.prompt == [{"role": "system", "content": SYSTEMS[0]},
                            {"role": "user", "content": OPENERS[0]}]
    assert first.target == turns[1]["text"]
    assert second.prompt == first.prompt + [{"role": "assistant", "content": turns[1]["text"]},
                                            {"role": "user", "content": turns[2]["text"]}]
    assert second.target == turns[3]["text"] and second.turn == 3


def test_split_is_by_episode_and_deterministic():
    ex = [CloneExample([{"role": "system", "content": "x"}], f"t{i}{k}", i)
          for i in range(20) for k in range(3)]
    tr, ev = cd.split_examples(ex, 0.2, seed=0)
    assert len({e.episode_id for e in ev}) == 4
    assert not {e.episode_id for e in tr} & {e.episode_id for e in ev}
    assert len(tr) + len(ev) == len(ex)
    assert cd.split_examples(ex, 0.2, seed=0) == (tr, ev)
    assert cd.split_examples(ex, 0.2, seed=1)[1] != ev
    # growing the corpus keeps held-out episodes held out (hash of the id, not a permutation)
    more = ex + [CloneExample([{"role": "system", "content": "x"}], "t", 99)]
    assert {e.episode_id for e in ev} <= {e.episode_id for e in cd.split_examples(more, 0.2)[1]} | {
        e.episode_id for e in cd.split_examples(more, 0.2)[0]}
    assert cd.split_examples(ex[:3], 0.5)[1] == []  # one episode: nothing to hold out


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [dc.lr_at(s, 20, 1.0, 0.1) for s in range(20)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))
    assert lrs[-1] == pytest.approx(1 / 18)


# ---------------------------------------------------------------------------------- bad input


def test_corpus_without_steered_utterances_is_a_clear_error(lm, tmp_path):
    eps = make_episodes(lm, n=2, steered=False)
    d = write_corpus(tmp_path / "partner_only", lm, eps)
    with pytest.raises(DatError, match="no steered-agent utterances"):
        dc.clone(lm, d, tmp_path / "out", small())


def test_an_exploration_buffer_is_not_a_corpus(lm, tmp_path):
    d = write_corpus(tmp_path / "explore", lm, make_episodes(lm, n=2))
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, "kind": "exploration"}))
    with pytest.raises(DatError, match="exploration buffer.*unsteered corpus"):
        dc.clone(lm, d, tmp_path / "out", small())
    assert not (tmp_path / "out").exists()


def test_a_trained_clone_is_never_overwritten_unasked(lm, corpus, trained, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(trained.out_dir, out, ignore=shutil.ignore_patterns("checkpoints"))
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(DatError, match="already holds a trained agent.*--overwrite"):
        dc.clone(lm, corpus, out, small(epochs=1, fidelity=False))
    assert (out / "model.safetensors").read_bytes() == before
    assert (out / "fidelity.json").is_file()
    dc.clone(lm, corpus, out, small(epochs=1, fidelity=False, overwrite=True))
    assert (out / "model.safetensors").read_bytes() != before
    assert not (out / "fidelity.json").exists()  # it described the replaced weights


def test_missing_or_bad_corpus_is_a_clear_error(lm, tmp_path):
    with pytest.raises(DatError, match="does not exist"):
        dc.clone(lm, tmp_path / "nope", tmp_path / "out", small())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatError, match="meta.json"):
        dc.clone(lm, tmp_path / "empty", tmp_path / "out", small())
    with pytest.raises(DatError, match="turn 0"):
        cd.episode_examples({"episode_id": 3, "episode": {"steered_system": "s",
                                                          "turns": [{"speaker": "me"}]}})
    with pytest.raises(DatError, match="CloneConfig.position"):
        small(position="middle").validate()


# ---------------------------------------------------------------------------------- training


def test_self_clone_reduces_the_loss(trained):
    losses = trained.epoch_losses
    assert len(losses) == 4 and all(np.isfinite(losses))
    # a self-clone starts close to the unsteered model (two prefix tokens barely disturb it), so
    # the loss falls slowly; on this tiny corpus it goes below the unsteered NLL (memorising)
    assert losses[-1] < losses[0] - 0.02, losses
    assert trained.n_train == 6 and trained.n_eval == 2
    assert trained.tokens_per_second and trained.tokens_per_second > 0
    rows = read_csv(trained.out_dir / "logs" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, trained.steps + 1))


def test_saves_loads_and_freezes_the_up_mapping(lm, trained):
    assert not any(p.requires_grad for p in trained.up_mapping.parameters())
    loaded = Agent.load(trained.out_dir, lm=lm)
    planner, up = loaded.planner, loaded.up
    assert planner.config.action_dim == 16 and up.config.kind == "learned"
    assert planner.config.state_norm["count"] == trained.n_train
    s = torch.randn(3, lm.hidden_size) * 5
    with torch.no_grad():
        assert torch.equal(planner(s), trained.planner(s.to(lm.device)).cpu())
        a = planner(s)
        assert torch.equal(up(a), trained.up_mapping(a.to(lm.device)).cpu())
        assert torch.allclose(a.norm(dim=-1), torch.ones(3))
    summary = json.loads((trained.out_dir / "clone.json").read_text())
    assert summary["epoch_losses"] == trained.epoch_losses


def test_fidelity_report(trained):
    rep = json.loads((trained.out_dir / "fidelity.json").read_text())
    assert rep == json.loads(json.dumps(trained.fidelity))
    for name in ("clone", "pca_random_planner"):
        r = rep[name]
        assert r["nll_unsteered"] > 0 and r["nll_ratio"] == pytest.approx(
            r["nll_steered"] / r["nll_unsteered"])
        assert r["generated"] == 2 and 0.0 <= r["exact_match"] <= 1.0
    # the corpus is the model's own greedy replies (same max_new_tokens): the unsteered model
    # reproduces it exactly, and its own NLL of them is low
    assert rep["clone"]["unsteered_matches_corpus"] == 1.0


def test_resume_from_an_epoch_checkpoint_gives_the_same_weights(lm, corpus, trained, tmp_path):
    ckpts = sorted((trained.out_dir / "checkpoints").glob("epoch-*"))
    assert [p.name for p in ckpts] == ["epoch-0001", "epoch-0002", "epoch-0003", "epoch-0004"]
    out = tmp_path / "resumed"
    shutil.copytree(ckpts[2], out / "checkpoints" / ckpts[2].name)  # as if stopped after epoch 3
    shutil.copytree(trained.out_dir / "cache", out / "cache")
    rows = read_csv(trained.out_dir / "logs" / "metrics.csv")
    (out / "logs").mkdir()
    shutil.copy(trained.out_dir / "logs" / "metrics.csv", out / "logs" / "metrics.csv")
    res = dc.clone(lm, corpus, out, small(fidelity=False))
    assert res.epoch_losses[:3] == trained.epoch_losses[:3]
    assert res.epoch_losses[3] == pytest.approx(trained.epoch_losses[3], rel=1e-5)
    assert res.steps == trained.steps and res.target_tokens < trained.target_tokens
    for a, b in zip(res.planner.state_dict().values(), trained.planner.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    for a, b in zip(res.up_mapping.state_dict().values(), trained.up_mapping.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    resumed_rows = read_csv(out / "logs" / "metrics.csv")
    assert [r["step"] for r in resumed_rows] == [r["step"] for r in rows]  # no duplicates
    # a run with other settings refuses to resume from it
    with pytest.raises(DatError, match="cannot resume"):
        dc.clone(lm, corpus, out, small(batch_size=3, fidelity=False))


def test_resume_refuses_another_run_naming_what_differs(lm, corpus, trained, tmp_path):
    """As for TD3+BC: a checkpoint resumes only the same run (the same examples of the same
    model, every setting that shapes the weights); the refusal names what differs."""
    out = tmp_path / "other"
    last = sorted((trained.out_dir / "checkpoints").glob("epoch-*"))[-1]
    shutil.copytree(last, out / "checkpoints" / last.name)
    shutil.copytree(trained.out_dir / "cache", out / "cache")
    eps = [Episode(i, Scenario(f"p{i}"), SYSTEMS[i % 4], "Be friendly.",
                   [Turn("partner", OPENERS[i % 4]), Turn("steered", "Arr, matey!")])
           for i in range(4)]
    pirate = write_corpus(tmp_path / "pirate", lm, eps)
    with pytest.raises(DatError, match=r"another run; these differ: .*examples_fingerprint"):
        dc.clone(lm, pirate, out, small(fidelity=False))
    with pytest.raises(DatError, match=r"another run; these differ: weight_decay \(0.0 there"):
        dc.clone(lm, corpus, out, small(fidelity=False, weight_decay=0.1))
    res = dc.clone(lm, corpus, out, small(fidelity=False))  # the same run resumes (it is done)
    assert res.steps == trained.steps and res.epoch_losses == trained.epoch_losses


def test_cloning_another_agents_corpus_is_the_same_command(lm, tmp_path):
    """A corpus whose steered seat was another agent (here: fixed pirate lines): the same
    command clones its policy, and the loss falls far below the unsteered model's."""
    eps = [Episode(i, Scenario(f"p{i}"), SYSTEMS[i % 4], "Be friendly.",
                   [Turn("partner", OPENERS[i % 4]), Turn("steered", "Arr, matey!")])
           for i in range(4)]
    d = write_corpus(tmp_path / "pirate", lm, eps, model="some-better-agent")
    res = dc.clone(lm, d, tmp_path / "out", small(epochs=6, batch_size=3, fidelity=False))
    assert res.n_train == 3 and res.n_eval == 1
    # two prefix tokens are a weak lever on a 30-layer model: a few steps move it slowly
    assert res.epoch_losses[-1] < res.first_step_loss - 0.25, (res.first_step_loss,
                                                              res.epoch_losses)


def test_states_stored_in_the_corpus_are_used_when_they_are_the_models(lm, tmp_path, monkeypatch):
    """A corpus written with real states (as `dat collect` stores them) is cloned without a
    second state pass; a corpus whose states are not the model's (zeros) is recomputed."""
    episodes = make_episodes(lm, n=2, steered_turns=2, max_new_tokens=12)
    zeros = write_corpus(tmp_path / "zeros", lm, episodes)
    examples, _ = cd.load_corpus(zeros)
    real = lm.state([x.prompt for x in examples])
    w = BufferWriter(tmp_path / "real", {"kind": "corpus", "model": lm.name,
                                         "hidden_size": lm.hidden_size, "action_dim": 0})
    w.write([EpisodeRecord(e.episode_id, e.scenario.id, real[2 * i:2 * i + 2].numpy(),
                           np.zeros((2, 0), np.float32), [0.0, 0.0], [False, True], e)
             for i, e in enumerate(episodes)])
    stored = cd.stored_states(Buffer(tmp_path / "real"), examples)
    assert stored.shape == real.shape
    assert torch.allclose(stored, real, atol=1e-2 * float(real.abs().max()))  # fp16 storage
    calls = []
    compute = dc.compute_states
    monkeypatch.setattr(dc, "compute_states", lambda *a, **k: calls.append(1) or compute(*a, **k))
    cfg = small(epochs=1, fidelity=False, eval_fraction=0.0)
    dc.clone(lm, tmp_path / "real", tmp_path / "out", cfg)
    assert calls == []  # the stored states were used
    dc.clone(lm, zeros, tmp_path / "out2", cfg)
    assert calls == [1]  # zeros are not the model's states: computed
