"""Offline buffers: round trip, resume, de-duplication, crash safety, clear errors, size,
both layouts (without terminal states, the default, and with them, as older buffers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dat.buffer import (
    Buffer,
    BufferWriter,
    EpisodeRecord,
    identity_diff,
    reference_bytes_per_transition,
)
from dat.envs.base import Episode, Reward, Scenario, Turn
from dat.errors import DatError

H, A, T = 16, 4, 3
META = {"hidden_size": H, "action_dim": A, "model": "tiny",
        "settings": {"noise": 0.25, "episodes": 8}}
META_TERMINAL = {**META, "terminal_states": True}  # the older layout: T + 1 rows per episode


def make_record(eid: int, steps: int = T, hidden: int = H, action_dim: int = A, seed: int = 0,
                judge_failed: bool = False) -> EpisodeRecord:
    """A deterministic episode: its content is a function of (eid, seed). It holds T + 1
    states (the final one is stored only by a buffer with terminal states)."""
    rng = np.random.default_rng([eid, seed])
    rewards = rng.random(steps).astype(np.float32)
    if judge_failed:
        rewards[:] = np.nan
    scen = Scenario(id=f"scen-{eid % 3}", data={"topic": "tea", "taboo": ["cup"]}, side=eid % 2)
    ep = Episode(eid, scen, "steered system", "partner system",
                 turns=[Turn("partner", "hi"), Turn("steered", f"hello {eid}")],
                 rewards=[Reward(None if judge_failed else float(r),
                                 {"raw": "judge said <garbled>" if judge_failed else "ok"},
                                 failed=judge_failed) for r in rewards])
    return EpisodeRecord(
        episode_id=eid, scenario_id=scen.id,
        states=rng.standard_normal((steps + 1, hidden)) * 3,
        actions=rng.standard_normal((steps, action_dim)),
        rewards=rewards, dones=[False] * (steps - 1) + [True],
        episode=ep, judge_failed=judge_failed)


def test_round_trip_two_shards(tmp_path):
    w = BufferWriter(tmp_path, META)
    recs = [make_record(i) for i in range(5)]
    recs.append(make_record(5, steps=1))  # episodes may have different lengths
    w.write(recs[:3])
    w.write(recs[3:])
    assert len(list(tmp_path.glob("transitions-*.parquet"))) == 2
    assert len(list(tmp_path.glob("dialogues-*.jsonl"))) == 2

    b = Buffer(tmp_path)
    assert len(b) == 6 and b.n_transitions == 5 * T + 1 and b.n_failed == 0
    assert b.meta["model"] == "tiny" and b.meta["dat_version"]
    assert b.meta["terminal_states"] is False and b.terminal_states is False
    assert json.loads((tmp_path / "meta.json").read_text())["terminal_states"] is False
    assert sum(pq.read_metadata(p).num_rows for p in b.shards) == 5 * T + 1  # no terminal rows
    x = b.tensors()
    assert set(x) == {"states", "actions", "rewards", "next_states", "dones"}
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in x.values())
    assert x["states"].shape == (16, H) and x["next_states"].shape == (16, H)
    assert x["actions"].shape == (16, A) and x["rewards"].shape == (16,)

    row = 0
    for r in sorted(recs, key=lambda r: r.episode_id):
        s = torch.tensor(r.states, dtype=torch.float32)
        n = r.steps
        # fp16 storage: relative error below 2**-11 (plus a tiny absolute part)
        torch.testing.assert_close(x["states"][row:row + n], s[:n], rtol=1e-3, atol=1e-3)
        # s' of step t is the state row t + 1 of the same episode (stored once); the last
        # step is done and its s' (the unstored s_T) is zeros
        torch.testing.assert_close(x["next_states"][row:row + n - 1], s[1:n], rtol=1e-3, atol=1e-3)
        assert torch.equal(x["next_states"][row:row + n - 1], x["states"][row + 1:row + n])
        assert torch.equal(x["next_states"][row + n - 1], torch.zeros(H))
        torch.testing.assert_close(x["actions"][row:row + n],  # stored as fp16
                                   torch.tensor(r.actions, dtype=torch.float32), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(x["rewards"][row:row + n], torch.tensor(r.rewards))
        assert x["dones"][row:row + n].tolist() == [0.0] * (n - 1) + [1.0]
        row += n

    # mean/std over all stored states (s_0 .. s_{T-1}), computed from the fp16 values
    every = np.concatenate([np.asarray(r.states[:r.steps], np.float16).astype(np.float64)
                            for r in recs])
    torch.testing.assert_close(b.state_mean, torch.tensor(every.mean(0), dtype=torch.float32))
    torch.testing.assert_close(b.state_std, torch.tensor(every.std(0), dtype=torch.float32))

    idx = b.index()
    assert idx["episode_id"][:4] == [0, 0, 0, 1] and idx["step"][:4] == [0, 1, 2, 0]
    only = b.tensors(scenarios=["scen-1"])  # episodes 1 and 4 (per-scenario training)
    assert only["states"].shape == (2 * T, H)
    assert set(b.index(scenarios=["scen-1"])["episode_id"]) == {1, 4}
    torch.testing.assert_close(only["states"][:T], x["states"][T:2 * T])

    eps = list(b.episodes())
    assert [e["episode_id"] for e in eps] == list(range(6))
    e3 = eps[3]
    assert e3["scenario_id"] == "scen-0" and e3["steps"] == T and e3["judge_failed"] is False
    assert e3["episode"]["scenario"]["data"]["taboo"] == ["cup"]
    assert e3["episode"]["turns"][1] == {"speaker": "steered", "text": "hello 3"}
    assert e3["episode"]["rewards"][0]["details"] == {"raw": "ok"}


def test_torch_inputs_and_device_argument(tmp_path):
    r = make_record(0)
    r.states, r.actions = torch.tensor(r.states), torch.tensor(r.actions)
    r.rewards, r.dones = torch.tensor(r.rewards), torch.tensor(r.dones)
    BufferWriter(tmp_path, META).write([r])
    x = Buffer(tmp_path).tensors(device=torch.device("cpu"))
    assert x["states"].shape == (T, H)


def test_judge_failed_episodes_are_kept_but_left_out_of_tensors(tmp_path):
    w = BufferWriter(tmp_path, META)
    w.write([make_record(0), make_record(1, judge_failed=True), make_record(2)])
    b = Buffer(tmp_path)
    assert len(b) == 3 and b.n_failed == 1
    assert b.tensors()["states"].shape[0] == 2 * T
    everything = b.tensors(drop_failed=False)
    assert everything["states"].shape[0] == 3 * T
    assert torch.isnan(everything["rewards"]).sum() == T  # no silent 0
    failed = [e for e in b.episodes() if e["judge_failed"]]
    assert failed[0]["episode"]["rewards"][0]["details"]["raw"] == "judge said <garbled>"

    bad = make_record(3)
    bad.rewards = np.array([0.1, np.nan, 0.2], np.float32)
    with pytest.raises(DatError, match="judge_failed"):
        w.write([bad])


def test_record_shape_errors(tmp_path):
    w = BufferWriter(tmp_path, META)
    r = make_record(0)
    r.states = np.asarray(r.states)[:T - 1]  # a state missing
    with pytest.raises(DatError, match=r"states has shape \(2, 16\), expected \(3, 16\)"):
        w.write([r])
    r.states = np.asarray(make_record(0).states)[:T]  # T states: fine without terminal states
    w.write([r])
    wt = BufferWriter(tmp_path / "terminal", META_TERMINAL)
    r = make_record(0)
    r.states = np.asarray(r.states)[:T]  # forgot the terminal state
    with pytest.raises(DatError, match=r"states has shape \(3, 16\), expected \(4, 16\)"):
        wt.write([r])
    w = BufferWriter(tmp_path / "more", META)
    r = make_record(0)
    r.states = np.full((T + 1, H), 1e6)
    with pytest.raises(DatError, match="float16 range"):
        w.write([r])
    with pytest.raises(DatError, match="Duplicate episode ids"):
        w.write([make_record(1), make_record(1)])
    with pytest.raises(DatError, match="hidden_size"):
        BufferWriter(tmp_path / "other", {"action_dim": 4})
    assert not list((tmp_path / "more").glob("transitions-*"))
    assert not list((tmp_path / "terminal").glob("transitions-*"))


def test_resume_ids_and_volatile_meta(tmp_path):
    w = BufferWriter(tmp_path, META, volatile=["settings.episodes"])
    assert w.completed_episode_ids() == set()
    w.write([make_record(i) for i in range(3)])
    w.write([make_record(i) for i in (7, 8)])
    assert w.completed_episode_ids() == {0, 1, 2, 7, 8}

    more = {**META, "settings": {"noise": 0.25, "episodes": 100}}  # asks for more episodes
    w2 = BufferWriter(tmp_path, more, volatile=["settings.episodes"])
    assert w2.completed_episode_ids() == {0, 1, 2, 7, 8}
    assert json.loads((tmp_path / "meta.json").read_text())["settings"]["episodes"] == 100
    w2.write([make_record(3)])
    assert Buffer(tmp_path).episode_ids() == [0, 1, 2, 3, 7, 8]


def test_meta_mismatch_is_a_clear_error(tmp_path):
    BufferWriter(tmp_path, META).write([make_record(0)])
    other = {**META, "model": "big", "settings": {"noise": 0.5, "episodes": 8}}
    with pytest.raises(DatError) as err:
        BufferWriter(tmp_path, other)
    msg = str(err.value)
    assert "refusing to mix runs" in msg
    assert 'model: "tiny" (existing) != "big" (new)' in msg
    assert "settings.noise: 0.25 (existing) != 0.5 (new)" in msg
    assert "episodes" not in msg  # equal keys are not listed
    # volatile keys may differ; a key present only on one side is reported
    assert identity_diff({"a": 1, "n": 5}, {"a": 1, "n": 6}, ["n"]) == []
    assert identity_diff({"a": 1}, {"a": 1, "b": 2}) == ['b: "<absent>" (existing) != 2 (new)']


def test_same_shard_twice_and_overlapping_shards_do_not_duplicate(tmp_path):
    w = BufferWriter(tmp_path, META)
    recs = [make_record(i) for i in range(4)]
    p1 = w.write(recs)
    p2 = w.write(recs)  # same content: same name, a no-op
    assert p1 == p2 and len(list(tmp_path.glob("transitions-*"))) == 1
    # the same episode ids with other content (e.g. a re-run that crashed after writing)
    w.write([make_record(i, seed=1) for i in range(2, 6)])
    b = Buffer(tmp_path)
    assert len(b) == 6 and b.n_duplicates == 2 and b.episode_ids() == list(range(6))
    assert b.n_transitions == 6 * T
    eps = list(b.episodes())
    assert sorted(e["episode_id"] for e in eps) == list(range(6))
    # the copy kept is the one from the first shard in name order (ids 2, 3: seed 0)
    x = b.tensors()
    torch.testing.assert_close(x["states"][2 * T], torch.tensor(recs[2].states[0],
                                                                 dtype=torch.float32),
                               rtol=1e-3, atol=1e-3)


def test_orphans_and_temporary_files_are_ignored(tmp_path):
    w = BufferWriter(tmp_path, META)
    w.write([make_record(0)])
    # a crash between the two renames: dialogues without transitions
    (tmp_path / "dialogues-0000000005-deadbeef0000.jsonl").write_text('{"episode_id": 5}\n')
    # a crash in the middle of writing: a half-written temporary file of a dead process
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          check=True, capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".transitions-0000000005-deadbeef0000.parquet.{dead}.tmp"
    stale.write_bytes(b"PAR1 half")
    b = Buffer(tmp_path)
    assert b.episode_ids() == [0] and [e["episode_id"] for e in b.episodes()] == [0]
    w2 = BufferWriter(tmp_path, META)  # resuming cleans temporary files of dead writers
    assert not stale.exists() and w2.completed_episode_ids() == {0}


def test_corrupted_and_truncated_shards_name_the_file(tmp_path):
    BufferWriter(tmp_path, META).write([make_record(i) for i in range(3)])
    path = next(tmp_path.glob("transitions-*.parquet"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatError, match=f"Cannot read buffer shard .*{path.name}"):
        Buffer(tmp_path)
    path.write_bytes(b"not a parquet file at all")
    with pytest.raises(DatError, match=path.name):
        Buffer(tmp_path)
    path.write_bytes(data[:-1])
    with pytest.raises(DatError, match=path.name):
        Buffer(tmp_path)


def test_missing_column_and_hidden_size_mismatch(tmp_path):
    BufferWriter(tmp_path, META).write([make_record(0)])
    path = next(tmp_path.glob("transitions-*.parquet"))
    good = pq.read_table(path)
    pq.write_table(good.drop_columns(["state"]), path)
    with pytest.raises(DatError, match=rf"{path.name} lacks the column\(s\) \['state'\]"):
        Buffer(tmp_path)
    pq.write_table(good, path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "hidden_size": 32}))
    with pytest.raises(DatError, match=rf"{path.name}: column 'state' holds vectors of size 16, "
                                       r"but meta.json says hidden_size = 32"):
        Buffer(tmp_path)
    # an inconsistent shard is refused, naming the file
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    no_action = good.set_column(good.schema.get_field_index("action"), "action",
                                pa.nulls(len(good), good.schema.field("action").type))
    pq.write_table(no_action, path)
    with pytest.raises(DatError, match=rf"{path.name}: column 'action' must be null exactly"):
        Buffer(tmp_path)
    pq.write_table(good.slice(0, T - 1), path)  # the last (done) step missing
    with pytest.raises(DatError, match=rf"{path.name} is inconsistent: .*last step .* not done"):
        Buffer(tmp_path)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DatError, match="does not exist"):
        Buffer(tmp_path / "nope")
    with pytest.raises(DatError, match="meta.json is missing"):
        Buffer(tmp_path)
    BufferWriter(tmp_path, META)
    with pytest.raises(DatError, match="no shards"):
        Buffer(tmp_path)
    (tmp_path / "meta.json").write_text("{broken")
    with pytest.raises(DatError, match="meta.json is not valid JSON"):
        Buffer(tmp_path)
    d = tmp_path / "foreign"
    d.mkdir()
    pq.write_table(pa.table({"x": [1]}), d / "transitions-0.parquet")
    with pytest.raises(DatError, match="no meta.json"):
        BufferWriter(d, META)


CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_buffer import make_record
    from dat.buffer import BufferWriter
    meta = {{"hidden_size": 576, "action_dim": 64, "model": "kill-test"}}
    w = BufferWriter({out!r}, meta)
    todo = [i for i in range({n}) if i not in w.completed_episode_ids()]
    for k in range(0, len(todo), 8):
        w.write([make_record(i, hidden=576, action_dim=64) for i in todo[k:k + 8]])
""")


def test_kill_9_leaves_only_complete_episodes_and_resume_finishes(tmp_path):
    out, n = tmp_path / "run", 400
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=os.path.dirname(__file__), out=str(out), n=n))
    rng = np.random.default_rng(0)
    kills = 0
    for _ in range(2):
        before = len(list(out.glob("transitions-*"))) if out.exists() else 0
        child = subprocess.Popen([sys.executable, str(script)])
        deadline = time.time() + 60
        while time.time() < deadline and child.poll() is None:
            if out.exists() and len(list(out.glob("transitions-*"))) >= before + 2:
                break
            time.sleep(0.005)
        time.sleep(float(rng.uniform(0, 0.05)))  # land anywhere inside the write loop
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            kills += 1
        child.wait()
        b = Buffer(out)  # reads cleanly: every committed episode is whole
        ids = b.episode_ids()
        assert len(b) == len(set(ids)) and b.n_transitions == len(ids) * T
        assert [e["episode_id"] for e in b.episodes()] == ids
        assert b.tensors()["states"].shape == (len(ids) * T, 576)
        assert BufferWriter(out, {"hidden_size": 576, "action_dim": 64, "model": "kill-test"}
                            ).completed_episode_ids() == set(ids)
    assert kills == 2 and len(ids) < n
    subprocess.run([sys.executable, str(script)], check=True)  # resume to the end
    b = Buffer(out)
    assert b.episode_ids() == list(range(n)) and b.n_duplicates == 0
    x = b.tensors()
    expect = np.concatenate([np.asarray(make_record(i, hidden=576, action_dim=64).states[:T],
                                        np.float16) for i in range(n)])
    assert np.array_equal(x["states"].numpy(), expect.astype(np.float32))
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("terminal_states", [False, True])
def test_bytes_per_transition_vs_float32_reference(tmp_path, terminal_states):
    hidden, action_dim = 576, 64
    ref = reference_bytes_per_transition(hidden, action_dim)
    assert ref == 4 * (2 * hidden + action_dim + 2)
    w = BufferWriter(tmp_path, {"hidden_size": hidden, "action_dim": action_dim,
                                "terminal_states": terminal_states})
    for k in range(0, 256, 64):
        w.write([make_record(i, hidden=hidden, action_dim=action_dim) for i in range(k, k + 64)])
    b = Buffer(tmp_path)
    per = b.bytes_per_transition()
    print(f"bytes/transition {per:.0f} vs float32 reference {ref}: {ref / per:.2f}x smaller")
    # s' is not stored twice: below two fp16 states per transition even before compression
    assert per < 2 * 2 * hidden
    # Random Gaussian states barely compress beyond fp16. With T = 3 steps an episode stores
    # 3 fp16 state rows for 3 transitions without terminal states: 576*2 + 64*2 = 1280 bytes
    # uncompressed (3.8x); with them 4 rows: 4/3*576*2 + 64*2 = 1664 bytes (2.9x). Real
    # hidden states compress further (bench/bench_buffer.py).
    assert ref / per > (3.8 if not terminal_states else 2.9)
    assert b.bytes_per_transition(include_dialogues=True) > per


# --------------------------------------------------------------------------------------
# The two layouts: without terminal states (default) and with them (older buffers)
# --------------------------------------------------------------------------------------


def hand_made(eid: int, steps: int, base: float) -> EpisodeRecord:
    """States whose rows are easy to recognise: row t is ``base + t`` everywhere (exact in
    fp16), T + 1 of them; actions of norm > 0; rewards 0.5 * (t + 1); done on the last."""
    return EpisodeRecord(
        episode_id=eid, scenario_id=f"scen-{eid}",
        states=np.array([[base + t] * H for t in range(steps + 1)], np.float32),
        actions=np.ones((steps, A), np.float32) * (eid + 1),
        rewards=[0.5 * (t + 1) for t in range(steps)],
        dones=[False] * (steps - 1) + [True], episode={"e": eid})


def test_without_terminal_states_s_prime_is_next_row_or_zeros(tmp_path):
    w = BufferWriter(tmp_path, META)  # terminal_states defaults to False
    w.write([hand_made(0, 3, 10.0), hand_made(1, 1, 20.0), hand_made(2, 2, 30.0)])
    table = pq.read_table(next(tmp_path.glob("transitions-*.parquet")))
    assert table.num_rows == 3 + 1 + 2 and not any(table.column("terminal").to_pylist())
    assert table.column("step").to_pylist() == [0, 1, 2, 0, 0, 1]
    assert table.column("reward").null_count == table.column("action").null_count == 0
    b = Buffer(tmp_path)
    assert not b.terminal_states and b.n_transitions == 6 and len(b) == 3
    x = b.tensors()
    assert x["states"][:, 0].tolist() == [10, 11, 12, 20, 30, 31]
    # s' = the next row of the same episode; zeros for the last (done) step, whose s_T is
    # not stored: the TD target r + gamma * (1 - done) * Q(s', .) ignores it
    assert x["next_states"][:, 0].tolist() == [11, 12, 0, 0, 31, 0]
    assert torch.equal(x["next_states"][[2, 3, 5]], torch.zeros(3, H))
    assert x["dones"].tolist() == [0, 0, 1, 1, 0, 1]
    assert x["rewards"].tolist() == [0.5, 1.0, 1.5, 0.5, 0.5, 1.0]
    assert x["actions"][:, 0].tolist() == [1, 1, 1, 2, 3, 3]
    # statistics over the stored states only
    stored = torch.tensor([10, 11, 12, 20, 30, 31], dtype=torch.float32)
    torch.testing.assert_close(b.state_mean, stored.mean().expand(H))
    # a judge-failed episode is counted once per episode, not once per row
    w.write([EpisodeRecord(5, "scen-5", np.ones((2, H)), np.ones((2, A)), [np.nan] * 2,
                           [False, True], judge_failed=True)])
    b = Buffer(tmp_path)
    assert b.n_failed == 1 and b.tensors()["states"].shape == (6, H)
    assert b.tensors(drop_failed=False)["next_states"][-2:, 0].tolist() == [1, 0]


def strip_layout_key(directory) -> None:
    """Make a buffer written with terminal states look as written before the option."""
    meta = json.loads((directory / "meta.json").read_text())
    del meta["terminal_states"]
    (directory / "meta.json").write_text(json.dumps(meta))
    for path in directory.glob("transitions-*.parquet"):
        table = pq.read_table(path)
        dat = json.loads(table.schema.metadata[b"dat"])
        del dat["terminal_states"]
        pq.write_table(table.replace_schema_metadata({"dat": json.dumps(dat)}), path)


def test_old_layout_with_terminal_states_still_loads(tmp_path):
    w = BufferWriter(tmp_path, META_TERMINAL)
    w.write([hand_made(0, 3, 10.0), hand_made(1, 1, 20.0)])
    w.write([make_record(2, judge_failed=True)])
    strip_layout_key(tmp_path)
    b = Buffer(tmp_path)
    assert b.terminal_states and b.meta["terminal_states"] is True
    assert len(b) == 3 and b.n_transitions == 3 + 1 + T and b.n_failed == 1
    x = b.tensors()
    assert x["states"][:, 0].tolist() == [10, 11, 12, 20]
    assert x["next_states"][:, 0].tolist() == [11, 12, 13, 21]  # the terminal states s_T
    assert x["dones"].tolist() == [0, 0, 1, 1]
    # mean over every stored row, terminal states included
    stored = torch.tensor([10, 11, 12, 13, 20, 21], dtype=torch.float32)
    assert b.tensors(drop_failed=False)["states"].shape == (4 + T, H)
    every = torch.cat([stored, torch.tensor(np.asarray(make_record(2, judge_failed=True).states,
                                                       np.float16)[:, 0].astype(np.float32))])
    torch.testing.assert_close(b.state_mean[0], every.mean())
    # an old run resumes with terminal states; its truncated last step may bootstrap from s_T
    w2 = BufferWriter(tmp_path, META_TERMINAL)
    assert w2.completed_episode_ids() == {0, 1, 2}
    cut = hand_made(3, 2, 40.0)
    cut.dones = [False, False]
    w2.write([cut])
    x = Buffer(tmp_path).tensors()
    assert x["next_states"][-2:, 0].tolist() == [41, 42] and x["dones"][-2:].tolist() == [0, 0]


def test_mixing_layouts_is_a_clear_error(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    BufferWriter(old, META_TERMINAL).write([make_record(0)])
    strip_layout_key(old)
    # resuming an older buffer without terminal states (the default) is refused
    with pytest.raises(DatError, match=r"with terminal states .* without terminal states.*"
                                       r"must not mix the two layouts.*--terminal-states"):
        BufferWriter(old, META)
    BufferWriter(new, META).write([make_record(1)])
    with pytest.raises(DatError, match=r"without terminal states .* with terminal states.*"
                                       r"must not mix.*--no-terminal-states"):
        BufferWriter(new, META_TERMINAL)
    # a shard of the other layout copied into a folder is refused by the reader, by name
    stray = next(old.glob("transitions-*.parquet"))
    (new / stray.name).write_bytes(stray.read_bytes())
    with pytest.raises(DatError, match=rf"{stray.name} holds episodes with terminal states.*"
                                       r"terminal_states = false.*must not mix"):
        Buffer(new)
    (new / stray.name).unlink()
    newer = next(new.glob("transitions-*.parquet"))
    (old / newer.name).write_bytes(newer.read_bytes())
    with pytest.raises(DatError, match=rf"{newer.name} holds episodes without terminal states.*"
                                       r"terminal_states = true.*without 'terminal_states'"):
        Buffer(old)
    # without terminal states the last step must be done (else it would have no s')
    cut = make_record(2)
    cut.dones = [False] * T
    with pytest.raises(DatError, match="last step has done = False.*terminal states"):
        BufferWriter(new, META).write([cut])
    with pytest.raises(DatError, match="no steps"):
        BufferWriter(new, META).write([EpisodeRecord(3, "s", np.ones((1, H)), np.ones((0, A)),
                                                     [], [])])
    with pytest.raises(DatError, match="terminal_states' must be True or False"):
        BufferWriter(tmp_path / "x", {**META, "terminal_states": "yes"})


def test_a_moved_collect_folder_resumes(tmp_path):
    """`dat collect` records its --out; a buffer folder moved elsewhere still resumes there."""
    import shutil

    from dat.collect import VOLATILE

    meta = {**META, "settings": {"noise": 0.25, "episodes": 8, "out": str(tmp_path / "a")}}
    BufferWriter(tmp_path / "a", meta, volatile=VOLATILE).write([make_record(0)])
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = {**meta, "settings": {**meta["settings"], "out": str(tmp_path / "b")}}
    w = BufferWriter(tmp_path / "b", moved, volatile=VOLATILE)
    assert w.completed_episode_ids() == {0}
    with pytest.raises(DatError, match="settings.noise"):  # real setting changes still refuse
        BufferWriter(tmp_path / "b", {**moved, "settings": {**moved["settings"], "noise": 0.5}},
                     volatile=VOLATILE)
