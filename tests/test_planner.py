"""Planner and UpMapping: shapes, norms, PCA properties, save/load round trips, errors."""

import json

import pytest
import torch

from dat import Planner, UpMapping
from dat.errors import DatError
from dat.agent import Agent
from dat.planner import embedding_pca


def test_planner_output_norm(tiny_lm):
    p = Planner.for_model(tiny_lm, action_dim=8, act_norm=0.6)
    a = p(torch.randn(5, tiny_lm.hidden_size))
    assert a.shape == (5, 8)
    assert torch.allclose(a.norm(dim=-1), torch.full((5,), 0.6), atol=1e-5)


def test_save_load_roundtrip(tiny_lm, tmp_path):
    p = Planner.for_model(tiny_lm, action_dim=8, n_tokens=3, position="infix", act_norm=0.6)
    p.set_state_norm(torch.randn(tiny_lm.hidden_size), torch.rand(tiny_lm.hidden_size) + 0.5,
                     source="buffer-x", count=123)
    up = UpMapping.learned(tiny_lm, action_dim=8, n_tokens=3, act_norm=0.6)
    Agent(up, p).save(tmp_path / "agent")
    loaded = Agent.load(tmp_path / "agent", lm=tiny_lm)
    p2, up2 = loaded.planner, loaded.up
    s = torch.randn(4, tiny_lm.hidden_size)
    assert torch.equal(p(s), p2(s))
    assert torch.equal(up(p(s)), up2(p2(s)))
    cfg = json.loads((tmp_path / "agent" / "config.json").read_text())
    assert cfg["hidden_size"] == 32 and cfg["action_dim"] == 8 and cfg["n_tokens"] == 3
    assert cfg["position"] == "infix" and cfg["act_norm"] == 0.6
    assert cfg["base_model"] == "tiny-random-llama" and cfg["dat_version"]
    assert cfg["state_norm"] == {"source": "buffer-x", "count": 123, "eps": 0.001}
    assert torch.equal(p2.state_mean, p.state_mean) and torch.equal(p2.state_std, p.state_std)
    ucfg = json.loads((tmp_path / "agent" / "up_mapping" / "config.json").read_text())
    assert ucfg["kind"] == "learned" and ucfg["n_tokens"] == 3
    assert up2(torch.randn(2, 8)).shape == (2, 3, 32)


def test_pca_components_orthonormal_and_scale(default_lm, tmp_path):
    up = UpMapping.from_embedding_pca(default_lm, action_dim=64, n_tokens=2, act_norm=1.0)
    C = up.components
    assert torch.allclose(C @ C.T, torch.eye(64), atol=1e-4)
    w = default_lm.model.get_input_embeddings().weight
    typical = w.norm(dim=-1).median()
    a = torch.nn.functional.normalize(torch.randn(10, 64), dim=-1)
    e = up(a)
    assert e.shape == (10, 2, 576)
    assert torch.allclose(e.norm(dim=-1), torch.full((10, 2), float(typical)), rtol=1e-3)
    # the top component captures more variance than a random direction
    centered = w - w.mean(0)
    top = (centered @ C[0]).var()
    rnd = (centered @ torch.nn.functional.normalize(torch.randn(576), dim=0)).var()
    assert top > 5 * rnd
    up.save_pretrained(tmp_path / "pca")
    up2 = UpMapping.from_pretrained(tmp_path / "pca", hidden_size=576)
    assert torch.equal(up2(a), e)


def test_pca_matches_exact_svd():
    torch.manual_seed(0)
    W = torch.randn(3000, 40) @ torch.diag(torch.linspace(5, 0.1, 40)) + 3.0
    comps = embedding_pca(W, 5, chunk_rows=700)
    _, _, Vh = torch.linalg.svd(W - W.mean(0), full_matrices=False)
    overlap = (comps @ Vh[:5].T).abs()
    assert torch.allclose(overlap.diagonal(), torch.ones(5), atol=1e-3)
    assert torch.equal(comps, embedding_pca(W, 5, chunk_rows=700))  # deterministic


def test_hidden_size_mismatch(tiny_lm, default_lm, tmp_path):
    p = Planner.for_model(tiny_lm, action_dim=8)
    p.save_pretrained(tmp_path / "p")
    with pytest.raises(DatError, match="hidden size 32.*hidden size 576"):
        Planner.from_pretrained(tmp_path / "p", hidden_size=default_lm)


def test_not_a_planner_folder(tmp_path):
    with pytest.raises(DatError, match="not a saved Planner"):
        Planner.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(DatError, match="not a valid Planner config"):
        Planner.from_pretrained(tmp_path)


def test_broken_saved_planners_are_clear_errors(tmp_path):
    import json as _json

    import pytest as _pytest
    from safetensors.torch import load_file, save_file

    from dat.errors import DatError
    from dat.planner import Planner, PlannerConfig

    d = Planner(PlannerConfig(8, 4)).save_pretrained(tmp_path / "p")
    weights = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # truncated
    with _pytest.raises(DatError, match="model.safetensors: unreadable weights"):
        Planner.from_pretrained(d)
    (d / "model.safetensors").write_bytes(weights)
    state = load_file(str(d / "model.safetensors"))
    first = min(k for k in state if state[k].is_floating_point())
    state[first][...] = float("nan")
    save_file(state, str(d / "model.safetensors"))
    with _pytest.raises(DatError, match="non-finite"):
        Planner.from_pretrained(d)  # at load, before any episode runs
    (d / "model.safetensors").write_bytes(weights)
    cfg = (d / "config.json").read_text()
    (d / "config.json").write_bytes("{\"hidden_size\": 8, \"x\": \"\xe9\"}".encode("latin-1"))
    with _pytest.raises(DatError, match="config.json: not a valid Planner config"):
        Planner.from_pretrained(d)
    (d / "config.json").write_text(cfg)
    assert _json.loads(cfg)["hidden_size"] == 8
    Planner.from_pretrained(d)
