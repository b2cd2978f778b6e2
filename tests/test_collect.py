"""`dat collect` end to end: a real run, resume after kill -9, refusal to mix settings."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dat.buffer import Buffer

DAT = [sys.executable, "-m", "dat.cli"]
ARGS = ["--rounds", "1", "--max-new-tokens", "8", "--batch-size", "2"]


def dat(*args, check=True, **kw):
    p = subprocess.run(DAT + list(args), capture_output=True, text=True, timeout=900, **kw)
    if check and p.returncode != 0:
        raise AssertionError(p.stdout + p.stderr)
    return p


def test_collect_end_to_end_and_resume_noop(tmp_path):
    out = tmp_path / "corpus"
    dat("collect", "--out", str(out), "--episodes", "4", *ARGS)
    b = Buffer(out)
    assert b.episode_ids() == [0, 1, 2, 3] and b.n_transitions == 4
    t = b.tensors()
    assert t["states"].shape == (4, 576) and t["actions"].shape == (4, 0)
    assert t["dones"].tolist() == [1.0] * 4
    ep = next(b.episodes())["episode"]
    assert [x["speaker"] for x in ep["turns"]] == ["partner", "steered", "partner"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["env"] == "taboo" and meta["hidden_size"] == 576 and meta["kind"] == "corpus"
    assert meta["terminal_states"] is False and "terminal_states" not in meta["settings"]
    assert b.tensors()["next_states"].abs().sum() == 0  # 1 step each: s' = zeros at done
    # the same command again runs nothing new; more episodes extend the run
    p = dat("collect", "--out", str(out), "--episodes", "4", *ARGS)
    assert "0 episodes run, 4 already there" in p.stdout.replace("\n", " ")
    # different settings: a clear error, not a silent mix
    p = dat("collect", "--out", str(out), "--episodes", "4", "--rounds", "2", "--max-new-tokens", "8",
            check=False)
    assert p.returncode == 2 and "different settings" in p.stdout and "rounds" in p.stdout
    # the other layout (terminal states stored): a clear error too
    p = dat("collect", "--out", str(out), "--episodes", "4", "--terminal-states", *ARGS,
            check=False)
    assert p.returncode == 2 and "must not mix" in " ".join(p.stdout.split())


def test_kill_and_resume(tmp_path):
    out = tmp_path / "explore"
    # with terminal states (the older layout): the final state pass runs, s_T is stored
    args = ["collect", "--out", str(out), "--episodes", "8", "--up-mapping", "pca",
            "--terminal-states", *ARGS]
    proc = subprocess.Popen(DAT + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not list(Path(out).glob("transitions-*.parquet")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = Buffer(out).episode_ids()
    assert 0 < len(first) < 8, first
    dat(*args)
    b = Buffer(out)
    assert b.episode_ids() == list(range(8)) and b.n_duplicates == 0
    assert b.tensors()["actions"].shape == (8, 64)
    assert b.terminal_states and b.meta["terminal_states"] is True
    assert (b.tensors()["next_states"].abs().sum(-1) > 0).all()  # s' = the stored s_T


def test_bad_env_and_missing_data(tmp_path):
    p = dat("collect", "--out", str(tmp_path / "x"), "--env", "social", check=False)
    assert p.returncode == 2 and "needs data" in p.stdout
    p = dat("collect", "--out", str(tmp_path / "x"), "--env", "chess", check=False)
    assert p.returncode == 2 and "unknown setting" in p.stdout


@pytest.mark.parametrize("cmd", ["info", "generate", "collect", "directions"])
def test_help(cmd):
    assert "Usage" in dat(cmd, "--help").stdout


@pytest.mark.parametrize("bad", [{"rounds": 0}, {"max_new_tokens": 0}, {"act_norm": -1.0},
                                 {"noise": -1.0}, {"explore_directions": -1},
                                 {"act_norm": float("nan")}])
def test_invalid_values_are_refused_before_anything_is_written(tiny_lm, tmp_path, bad):
    from dat.collect import CollectConfig, collect
    from dat.errors import DatError

    out = tmp_path / "buf"
    base = {"out": str(out), "episodes": 2, "rounds": 1, "max_new_tokens": 4, "batch_size": 2,
            "up_mapping": "pca", "action_dim": 4, "progress": False}
    name = next(iter(bad)).replace("_", "-")
    with pytest.raises(DatError, match=f"--{name} must be"):
        collect(CollectConfig(**{**base, **bad}), lm=tiny_lm)
    assert not (out / "meta.json").exists()  # nothing written: the fixed command runs
    collect(CollectConfig(**base), lm=tiny_lm)
    assert Buffer(out).episode_ids() == [0, 1]


@pytest.fixture
def full_disk(tmp_path):
    """A 16 KiB tmpfs: a real full disk (ENOSPC), where this machine lets us mount one."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill up: {p.stderr.strip() or p.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_full_out_disk_is_one_clear_line(full_disk):
    p = dat("collect", "--out", str(full_disk / "buf"), "--episodes", "8", *ARGS, check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "error:" in p.stdout and "Traceback" not in p.stdout + p.stderr
    flat = "".join(p.stdout.split())  # rich wraps long lines
    assert "Nospaceleft" in flat and str(full_disk) in flat


def test_a_read_only_out_folder_is_one_clear_line(tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits: make --out a path under a regular file instead
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "buf"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        out = ro / "buf"
    p = dat("collect", "--out", str(out), "--episodes", "1", *ARGS, check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "error:" in p.stdout and "Traceback" not in p.stdout + p.stderr
