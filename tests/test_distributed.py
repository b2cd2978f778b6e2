"""Distributed collection and evaluation on a real local Ray cluster (2 CPU workers, the
default model, a few short episodes): the same content as a single-process run, a worker
killed mid-run is replaced without losing or duplicating episodes, and a whole job killed
with SIGKILL resumes. Ray itself is not mocked anywhere."""

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from dat.buffer import Buffer
from dat.collect import CollectConfig, collect
from dat.errors import DatError

DAT = [sys.executable, "-m", "dat.cli"]
EPISODES = 6
# short episodes; the single-process reference runs all of them in one batch, the Ray
# workers in chunks of 2 (batch 2): the batching differs, the content must not
RUN = {"env": "taboo", "episodes": EPISODES, "rounds": 1, "max_new_tokens": 8,
       "up_mapping": "pca", "action_dim": 16, "seed": 3, "progress": False}
ARGS = ["--episodes", str(EPISODES), "--rounds", "1", "--max-new-tokens", "8", "--batch-size", "2"]


def test_missing_ray_says_how_to_install(monkeypatch):
    from dat.distributed import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(DatError, match=r"pip install \"dat\[ray\]\""):
        import_ray()


def _session_processes(sid: int) -> list:
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (OSError, psutil.Error):
            pass
    return out


@pytest.mark.slow
def test_kill_whole_job_and_resume(tmp_path):
    """``dat collect --ray`` killed with SIGKILL (driver, Ray and workers), then run again."""
    pytest.importorskip("ray")
    out = tmp_path / "buffer"
    args = ["collect", "--ray", "--num-workers", "2", "--out", str(out), *ARGS]
    proc = subprocess.Popen(DAT + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not list(out.glob("transitions-*.parquet")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # nothing of the killed job (Ray's own processes, its workers) goes on writing
    deadline = time.time() + 30
    while _session_processes(proc.pid) and time.time() < deadline:
        time.sleep(0.5)
    assert not _session_processes(proc.pid)
    first = Buffer(out).episode_ids()
    assert 0 < len(first) < EPISODES, first
    p = subprocess.run(DAT + args, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"{EPISODES - len(first)} episodes run, {len(first)} already there" in " ".join(p.stdout.split())
    b = Buffer(out)
    assert b.episode_ids() == list(range(EPISODES)) and b.n_duplicates == 0
    assert len(list(out.glob("transitions-*.parquet"))) == len(list(out.glob("dialogues-*.jsonl")))
    assert not list(out.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------
# In-process driver: one Ray cluster and 2 workers for the tests below
# ---------------------------------------------------------------------------------------------


class Events:
    """Pool events, and an optional hook run on each (to kill a worker at the right moment)."""

    def __init__(self):
        self.log, self.hook = [], None

    def __call__(self, event, info):
        self.log.append((event, info))
        if self.hook is not None:
            self.hook(event, info)


@pytest.fixture(scope="module")
def pool():
    pytest.importorskip("ray")
    from dat.distributed import RayConfig, RayPool

    events = Events()
    with RayPool(RayConfig(num_workers=2), progress=False, callback=events) as p:
        p.events = events
        assert p.num_workers == 2 and p.num_cpus == 0.5 and p.threads == max(1, os.cpu_count() // 2)
        yield p


@pytest.fixture(scope="module")
def reference(default_lm, tmp_path_factory):
    """The single-process run: all episodes in one lock-step batch."""
    out = tmp_path_factory.mktemp("single") / "buffer"
    collect(CollectConfig(out=str(out), batch_size=EPISODES, **RUN), lm=default_lm)
    return Buffer(out)


def assert_same_content(a: Buffer, b: Buffer) -> None:
    assert a.episode_ids() == b.episode_ids() == list(range(EPISODES))
    assert a.n_duplicates == b.n_duplicates == 0
    da = {e["episode_id"]: e for e in a.episodes()}
    db = {e["episode_id"]: e for e in b.episodes()}
    for i in da:
        ea, eb = da[i]["episode"], db[i]["episode"]
        assert ea["scenario"] == eb["scenario"]
        assert [(t["speaker"], t["text"]) for t in ea["turns"]] == \
               [(t["speaker"], t["text"]) for t in eb["turns"]]
        assert [r["value"] for r in ea["rewards"]] == pytest.approx(
            [r["value"] for r in eb["rewards"]], abs=1e-4)
    ta, tb = a.tensors(), b.tensors()
    assert a.index() == b.index()
    assert ta["actions"].shape == (EPISODES, 16)
    assert np.array_equal(ta["actions"].numpy(), tb["actions"].numpy())  # noise per episode
    assert np.allclose(ta["states"].numpy(), tb["states"].numpy(), rtol=2e-3, atol=2e-3)  # fp16
    assert np.allclose(ta["rewards"].numpy(), tb["rewards"].numpy(), atol=1e-4)
    assert a.meta["settings"]["out"] != b.meta["settings"]["out"]
    strip = lambda m: {k: v for k, v in m.items() if k not in ("settings", "volatile_keys")}
    assert strip(a.meta) == strip(b.meta)


@pytest.mark.slow
def test_same_content_as_single_process(pool, reference, default_lm, tmp_path):
    from dat.distributed import collect_ray

    pool.events.log.clear()
    out = tmp_path / "buffer"
    s = collect_ray(CollectConfig(out=str(out), batch_size=2, **RUN), pool=pool)
    assert s["episodes_run"] == EPISODES and s["workers"] == 2
    # both workers ran episodes, each wrote its own shards into the folder
    done = [(info["slot"], info["ids"]) for e, info in pool.events.log if e == "done" and info["ids"]]
    assert {slot for slot, _ in done} == {0, 1}
    assert sorted(i for _, ids in done for i in ids) == list(range(EPISODES))
    assert len({info["result"]["pid"] for e, info in pool.events.log if e == "done"}) == 2
    assert_same_content(Buffer(out), reference)
    # the same command again runs nothing
    again = collect_ray(CollectConfig(out=str(out), batch_size=2, **RUN), pool=pool)
    assert again["episodes_run"] == 0 and again["episodes_skipped"] == EPISODES
    # a single-process run resumes a Ray run's folder: they write the same meta.json
    single = collect(CollectConfig(out=str(out), batch_size=EPISODES, **RUN), lm=default_lm)
    assert single["episodes_run"] == 0 and single["episodes_skipped"] == EPISODES


@pytest.mark.slow
def test_worker_killed_mid_run_is_recovered(pool, reference, tmp_path):
    """Kill a worker's process (SIGKILL) in the middle of a chunk: after the first half of
    its episodes reached the disk, before the second half did. A fresh worker replaces it,
    the chunk is handed out again, its finished half is skipped and the rest is run: the
    buffer equals the single-process one, nothing lost, nothing twice."""
    from dat.distributed import collect_ray

    out = tmp_path / "buffer"
    chunk = [0, 1, 2, 3]  # two lock-step batches of 2: a shard after each
    killed = []

    def kill_after_first_shard(pid):
        deadline = time.time() + 300
        while time.time() < deadline:
            if list(out.glob(f"transitions-{chunk[0]:010d}-*.parquet")):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.01)

    def hook(event, info):
        if event == "dispatch" and info["ids"] == chunk and not killed:
            pid = pool.workers[info["slot"]]["pid"]
            threading.Thread(target=kill_after_first_shard, args=(pid,), daemon=True).start()

    pool.events.log.clear()
    pool.events.hook = hook
    restarts, config = pool.restarts, pool.config
    pool.config = replace(config, chunk_size=len(chunk))
    try:
        s = collect_ray(CollectConfig(out=str(out), batch_size=2, **RUN), pool=pool)
    finally:
        pool.events.hook, pool.config = None, config
    assert killed, "the worker was not killed"
    assert pool.restarts == restarts + 1 and s["retried_chunks"] == 1
    log = pool.events.log
    died = [info for e, info in log if e == "died"]
    assert len(died) == 1 and died[0]["ids"] == chunk
    # run again once, by a live worker: the half on disk skipped, the other half run
    redone = [info["result"] for e, info in log if e == "done" and info["ids"] == chunk]
    assert len(redone) == 1 and redone[0]["pid"] != killed[0]
    assert redone[0]["skipped"] == 2 and redone[0]["episodes"] == 2
    assert s["episodes_run"] == EPISODES
    assert_same_content(Buffer(out), reference)
    assert not list(out.glob(".*.tmp"))
    # the replacement worker comes up: both slots usable again
    deadline = time.time() + 300
    while len(pool.workers) < 2 and time.time() < deadline:
        pool.call("info")
        time.sleep(0.2)
    assert len(pool.workers) == 2 and killed[0] not in {w["pid"] for w in pool.workers.values()}


@pytest.mark.slow
def test_eval_on_ray_equals_single_process(pool, default_lm):
    from dat.envs import make
    from dat.evaluate import AgentSpec, evaluate
    from dat.rollout import RolloutConfig

    setting = make("taboo", rounds=1)
    agents = {"unsteered": AgentSpec(), "random": AgentSpec.random(action_dim=16)}
    cfg = RolloutConfig(batch_size=4, rounds=1, max_new_tokens=8)
    kw = {"split": "test", "seed": 1, "config": cfg, "compute_perplexity": False, "plots": False,
          "n_bootstrap": 200}
    single = evaluate(default_lm, setting, agents, 4, **kw)
    runner = pool.eval_runner(model="default", env="taboo", rounds=1, split="test", seed=1)
    ray_run = evaluate(default_lm, setting, agents, 4, runner=runner, **kw)
    for name in agents:
        a, b = single["agents"][name], ray_run["agents"][name]
        assert [r["episode_id"] for r in a["per_episode"]] == [r["episode_id"] for r in b["per_episode"]]
        assert [r["total_reward"] for r in a["per_episode"]] == pytest.approx(
            [r["total_reward"] for r in b["per_episode"]], abs=1e-4)
        assert a["language"]["distinct_2"] == b["language"]["distinct_2"]
        assert a["language"]["mean_tokens"] == b["language"]["mean_tokens"]
        assert a["generated_tokens"] == b["generated_tokens"]
