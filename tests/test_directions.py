"""`dat directions`: per-direction effects of a held-direction buffer, split-half reliability,
transfer between buffers."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from dat.cli import app
from dat.directions import direction_effects, held_directions, transfer
from dat.errors import DatError


def crossed(effects, scenarios=8, noise=None, seed=0):
    """Every direction on every scenario once: episode id e -> direction e mod K."""
    k = len(effects)
    rng = np.random.default_rng(seed)
    base = {f"s{j}": float(j) / 10 for j in range(scenarios)}
    rows = []
    for e in range(k * scenarios):
        sid = f"s{e // k}"
        eps = 0.0 if noise is None else float(rng.normal(0, noise))
        rows.append((e, sid, base[sid] + effects[e % k] + eps))
    return rows, base


def test_effects_are_paired_differences_and_reliable_when_real():
    rows, base = crossed([0.0, 0.2, 0.4])
    res = direction_effects(rows, 3, base)
    # without noise, each direction's effect is exactly its offset, whatever the scenario
    assert [res["directions"][d]["mean"] for d in range(3)] == pytest.approx([0.0, 0.2, 0.4])
    assert res["directions"][1]["n"] == 8 and res["directions"][1]["se"] == pytest.approx(0.0)
    assert res["best"]["direction"] == 2 and res["mean_effect"] == pytest.approx(0.2)
    assert res["spread"] == pytest.approx(np.std([0.0, 0.2, 0.4], ddof=1))
    assert res["split_half_r"] == pytest.approx(1.0) and res["reliability"] == pytest.approx(1.0)
    # unpaired, the scenarios' own levels are in every mean (same here: crossed design)
    raw = direction_effects(rows, 3)
    assert raw["directions"][0]["mean"] == pytest.approx(np.mean(list(base.values())))
    assert not raw["paired"]


def test_pure_noise_is_unreliable_and_real_effects_survive_noise():
    rows, base = crossed([0.0] * 20, scenarios=40, noise=1.0)
    noise = direction_effects(rows, 20, base)
    assert noise["split_half_r"] < 0.3 and noise["reliability"] < 0.5
    rows, base = crossed(list(np.linspace(0, 2, 20)), scenarios=40, noise=1.0)
    real = direction_effects(rows, 20, base)
    assert real["split_half_r"] > 0.6
    # a hand check of one direction's SE
    v = [r - base[s] for e, s, r in rows if e % 20 == 3]
    assert real["directions"][3]["se"] == pytest.approx(np.std(v, ddof=1) / np.sqrt(len(v)))


def test_transfer_and_errors():
    rows, base = crossed([0.0, 0.1, 0.3])
    a = direction_effects(rows, 3, base)
    rows_b, base_b = crossed([0.0, 0.2, 0.6])
    rows_c, base_c = crossed([0.6, 0.2, 0.0])
    b = direction_effects(rows_b, 3, base_b)
    c = direction_effects(rows_c, 3, base_c)
    assert transfer(a, b) == pytest.approx(1.0)
    assert transfer(a, c) < -0.9
    with pytest.raises(DatError, match="k must be"):
        direction_effects(rows, 0, base)
    with pytest.raises(DatError, match="at least 2 directions"):
        direction_effects(rows, 3, {"nowhere": 0.0})
    with pytest.raises(DatError, match="--explore-directions"):
        held_directions({"settings": {"explore_directions": 0}})


def test_cli_on_real_buffers(tmp_path, tiny_lm):
    from dat.collect import CollectConfig, collect, make_setting

    setting = make_setting("taboo", None, None, tiny_lm, 1)
    common = {"rounds": 1, "max_new_tokens": 4, "batch_size": 6, "episodes": 6, "progress": False}
    collect(CollectConfig(out=str(tmp_path / "base"), **common), lm=tiny_lm, setting=setting)
    collect(CollectConfig(out=str(tmp_path / "dirs"), up_mapping="pca", action_dim=8,
                          explore_directions=3, **common), lm=tiny_lm, setting=setting)
    out = tmp_path / "d.json"
    r = CliRunner().invoke(app, ["directions", str(tmp_path / "dirs"), "--baseline",
                                 str(tmp_path / "base"), "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "K = 3 directions" in r.output and "split-half r" in r.output
    res = json.loads(out.read_text())["buffer"]
    assert res["k"] == 3 and res["episodes"] == 6 and res["paired"]

    def totals(d):
        return {rec["episode_id"]: (rec["scenario_id"], sum(x["value"] for x in rec["episode"]["rewards"]))
                for f in sorted(d.glob("dialogues-*.jsonl")) for rec in map(json.loads, f.open())}

    base = {s: v for s, v in totals(tmp_path / "base").values()}
    for d in range(3):  # by hand: mean over the direction's episodes of reward - baseline
        want = np.mean([v - base[s] for e, (s, v) in totals(tmp_path / "dirs").items() if e % 3 == d])
        assert res["directions"][str(d)]["mean"] == pytest.approx(want)
    # a second buffer (here the same one): effects and their transfer
    r = CliRunner().invoke(app, ["directions", str(tmp_path / "dirs"), "--baseline", str(tmp_path / "base"),
                                 "--compare", str(tmp_path / "dirs"), "--compare-baseline",
                                 str(tmp_path / "base"), "--json", str(out)])
    assert r.exit_code == 0, r.output
    both = json.loads(out.read_text())
    assert "transfer:" in r.output and both["compare"]["directions"] == both["buffer"]["directions"]
    assert both["transfer_r"] is None or both["transfer_r"] == pytest.approx(1.0)
    # a buffer without held directions is a clear error
    r = CliRunner().invoke(app, ["directions", str(tmp_path / "base")])
    assert r.exit_code == 2 and "--explore-directions" in r.output
    # a k other than the buffer's mixes directions: refused, not printed as NaN
    r = CliRunner().invoke(app, ["directions", str(tmp_path / "dirs"), "--k", "100"])
    assert r.exit_code == 2 and "collected with 3 held directions" in r.output
    assert "nan" not in r.output.lower()
