"""SteeredLM: exact insertion, batch invariance, loss gradients, errors."""

import inspect

import pytest
import torch

from dat import SteeredLM, UpMapping
from dat.errors import ContextLengthError, DatError


def _actions(lm, n, seed=0, L=2):
    up = UpMapping.from_embedding_pca(lm, action_dim=16, n_tokens=L, act_norm=1.0)
    a = torch.nn.functional.normalize(torch.randn(n, 16, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return up(a)


@pytest.mark.parametrize("position", ["prefix", "infix", "suffix"])
@pytest.mark.parametrize("steered", [False, True])
def test_batch_equals_single(default_lm, dialogues, position, steered):
    acts = _actions(default_lm, len(dialogues)) if steered else None
    batch = default_lm.generate(dialogues, actions=acts, position=position, max_new_tokens=20)
    for i, d in enumerate(dialogues):
        one = default_lm.generate([d], actions=None if acts is None else acts[i:i + 1],
                                  position=position, max_new_tokens=20)
        assert batch[i] == one[0], (position, steered, i)
    assert all(t for t in batch)


def test_no_actions_equals_model_generate(default_lm, dialogues):
    lm = default_lm
    ours = lm.generate(dialogues, max_new_tokens=24)
    for d, text in zip(dialogues, ours):
        ids = torch.tensor([lm.encode(d)])
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        assert lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == text


def test_steering_changes_reply(default_lm, dialogues):
    plain = default_lm.generate(dialogues, max_new_tokens=24)
    up = UpMapping.from_embedding_pca(default_lm, action_dim=16, n_tokens=2, act_norm=1.0)
    a = torch.nn.functional.normalize(torch.randn(len(dialogues), 16, generator=torch.Generator().manual_seed(3)), dim=-1)
    steered = default_lm.generate(dialogues, actions=up(a * 8), max_new_tokens=24)
    assert steered != plain


def test_insertion_points(default_lm, dialogues):
    lm = default_lm
    d = dialogues[0]
    ids = lm.encode(d)
    assert lm.insertion_point(d, ids, "prefix") == 1  # after <|im_start|>, the BOS of this tokenizer
    assert ids[0] == lm.tokenizer.bos_token_id
    assert lm.insertion_point(d, ids, "suffix") == len(ids)
    infix = lm.insertion_point(d, ids, "infix")
    system_block = lm.tokenizer.decode(ids[:infix])
    assert system_block.rstrip().endswith("You are a friendly assistant.<|im_end|>")
    assert "user" not in system_block


def test_inserted_embeddings_and_positions_exact(tiny_lm, dialogues):
    """The batch holds exactly the token embeddings with the action vectors spliced in."""
    lm = tiny_lm
    acts = torch.randn(len(dialogues), 3, lm.hidden_size)
    _, ids, at, acts = lm.prepare(dialogues, acts, "infix", 0)
    b = lm.make_batch(ids, at, acts)
    emb = lm.model.get_input_embeddings().weight
    T = b.inputs_embeds.shape[1]
    for i, row in enumerate(ids):
        n = len(row) + 3
        assert b.attention_mask[i].sum() == n and b.attention_mask[i, T - n:].all()
        assert torch.equal(b.position_ids[i, T - n:], torch.arange(n))
        expect = torch.cat([emb[row[:at[i]]], acts[i], emb[row[at[i]:]]])
        assert torch.equal(b.inputs_embeds[i, T - n:], expect)


def test_state_shape_and_batch_invariance(default_lm, dialogues):
    s = default_lm.state(dialogues)
    assert s.shape == (3, 576) and s.dtype == torch.float32
    for i, d in enumerate(dialogues):
        assert torch.allclose(default_lm.state([d])[0], s[i], atol=1e-4)


def test_loss_gradients_reach_actions_only(tiny_lm, dialogues):
    lm = tiny_lm
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    acts = torch.randn(len(dialogues), 2, lm.hidden_size, requires_grad=True)
    nll = lm.loss(dialogues, ["Sure thing.", "Arr!", "Dogs are loyal."], acts, "prefix")
    assert nll.shape == (3,) and torch.isfinite(nll).all()
    opt = torch.optim.SGD([acts], lr=1.0)
    nll.sum().backward()
    assert acts.grad is not None and acts.grad.abs().sum() > 0
    assert all(p.grad is None for p in lm.model.parameters())
    opt.step()
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_loss_batch_equals_single(default_lm, dialogues):
    targets = ["Spring, because of the flowers.", "Ahoy matey!", "Dogs are more social."]
    acts = _actions(default_lm, 3)
    for pos in ("prefix", "infix", "suffix"):
        nll = default_lm.loss(dialogues, targets, acts, pos)
        for i in range(3):
            one = default_lm.loss([dialogues[i]], [targets[i]], acts[i:i + 1], pos)
            assert torch.allclose(one[0], nll[i], atol=1e-4)


def test_loss_matches_model_labels(default_lm, dialogues):
    """Unsteered loss equals the model's own label loss over the reply tokens."""
    lm = default_lm
    d, target = dialogues[1], "Ahoy there!"
    prompt = lm.encode(d)
    reply = lm.reply_ids(d, target)
    assert lm.tokenizer.decode(reply) == "Ahoy there!<|im_end|>"
    ids = torch.tensor([prompt + reply])
    labels = ids.clone()
    labels[0, :len(prompt)] = -100
    ref = lm.model(ids, labels=labels).loss
    assert torch.allclose(lm.loss([d], [target])[0], ref, atol=1e-5)


def test_sampling_reproducible(default_lm, dialogues):
    a = default_lm.generate(dialogues, temperature=0.9, top_p=0.9, seed=7, max_new_tokens=16)
    b = default_lm.generate(dialogues, temperature=0.9, top_p=0.9, seed=7, max_new_tokens=16)
    assert a == b


# --------------------------------------------------------------------- errors
def test_infix_without_system_message(default_lm):
    with pytest.raises(DatError, match="no system message"):
        default_lm.generate([[{"role": "user", "content": "hi"}]], actions=torch.zeros(1, 2, 576),
                            position="infix")


def test_wrong_action_shape(default_lm, dialogues):
    with pytest.raises(DatError, match=r"shape \[batch=3, n_tokens, hidden=576\]"):
        default_lm.generate(dialogues, actions=torch.zeros(3, 2, 100))
    with pytest.raises(DatError, match="batch=3"):
        default_lm.generate(dialogues, actions=torch.zeros(2, 2, 576))


def test_bad_position_and_dialogue(default_lm, dialogues):
    with pytest.raises(DatError, match="position must be one of"):
        default_lm.generate(dialogues, position="middle")
    with pytest.raises(DatError, match="list of dialogues"):
        default_lm.generate(dialogues[0])
    with pytest.raises(DatError, match="'role' and 'content'"):
        default_lm.generate([[{"role": "user"}]])


def test_context_limit(default_lm):
    lm = SteeredLM(default_lm.model, default_lm.tokenizer, max_context=64)
    long = [{"role": "system", "content": "Be kind."}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"Message number {i} " * 5}
        for i in range(9)
    ]
    with pytest.raises(ContextLengthError, match="context limit of 64 tokens"):
        lm.generate([long], max_new_tokens=8)
    left = SteeredLM(default_lm.model, default_lm.tokenizer, max_context=64, truncation="left")
    ids = left.encode(long, reserve=8)
    assert len(ids) + 8 <= 64
    text = left.tokenizer.decode(ids)
    assert "Be kind." in text and "Message number 8" in text and "Message number 0" not in text


def test_prefix_cache_across_turns(default_lm, dialogues):
    """States and replies with per-dialogue prefix caches equal full re-encoding, turn after
    turn, for rows whose cached prefixes have different lengths; steered calls reuse the
    cache only up to the action tokens and leave it unchanged."""
    from dat.kvcache import PrefixCache

    caches = [PrefixCache() for _ in dialogues]
    for turn in range(2):
        assert torch.allclose(default_lm.state(dialogues), default_lm.state(dialogues, caches=caches), atol=1e-4)
        full = default_lm.generate(dialogues, max_new_tokens=10)
        assert default_lm.generate(dialogues, max_new_tokens=10, caches=caches) == full
        lengths = [len(c) for c in caches]
        assert len(set(lengths)) > 1
        torch.manual_seed(turn)
        actions = torch.randn(len(dialogues), 2, default_lm.hidden_size) * 0.5
        for position in ("prefix", "infix", "suffix"):
            plain = default_lm.generate(dialogues, actions=actions, position=position, max_new_tokens=10)
            assert default_lm.generate(dialogues, actions=actions, position=position, max_new_tokens=10,
                                       caches=caches) == plain
        assert [len(c) for c in caches] == lengths
        for d, reply in zip(dialogues, full):
            d += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Go on, please."}]
    with pytest.raises(DatError, match="PrefixCache"):
        default_lm.state(dialogues, caches=caches[:1])


def test_blockwise_head_gives_the_models_own_logits(default_lm, dialogues):
    """With 8+ rows the LM head runs in vocabulary blocks on the CPU: bitwise the same logits,
    so a batch of 9 still decodes exactly like each dialogue alone (1 row: plain head)."""
    from dat.decoding import HEAD_BLOCK_ROWS, head_logits

    head = default_lm.model.get_output_embeddings()
    hidden = torch.randn(HEAD_BLOCK_ROWS + 1, 1, default_lm.hidden_size, generator=torch.Generator().manual_seed(0))
    assert head.weight.shape[0] > 8 * 1024
    assert torch.equal(head_logits(head, hidden), head(hidden))
    assert default_lm.decoder.head_is_blockwise()
    many = [d[:-1] + [{"role": "user", "content": d[-1]["content"] + f" ({k})"}]
            for k in range(3) for d in dialogues]
    assert len(many) >= HEAD_BLOCK_ROWS
    batch = default_lm.generate(many, max_new_tokens=12)
    assert [default_lm.generate([d], max_new_tokens=12)[0] for d in many] == batch


def test_head_post_processing_keeps_the_models_forward(tiny_lm, dialogues):
    """A model that changes its logits after the head is not run blockwise, and generation
    follows the model's own logits (forcing the blockwise head would change the tokens)."""
    from transformers import LlamaForCausalLM

    class Flipped(LlamaForCausalLM):  # stands for soft-capping, logit scaling, ...
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits.flip(-1)
            return out

    Flipped.forward.__signature__ = inspect.signature(LlamaForCausalLM.forward)  # same cache keyword

    model = Flipped(tiny_lm.model.config)
    model.load_state_dict(tiny_lm.model.state_dict())
    lm = SteeredLM(model.eval(), tiny_lm.tokenizer, name="flipped")
    assert not lm.decoder.head_is_blockwise() and tiny_lm.decoder.head_is_blockwise()
    many = [d for _ in range(3) for d in dialogues]
    got = lm.generate_detailed(many, max_new_tokens=6, ignore_eos=True).token_ids
    lm.decoder.blockwise_head = False
    assert lm.generate_detailed(many, max_new_tokens=6, ignore_eos=True).token_ids == got
    lm.decoder.blockwise_head = True
    assert lm.generate_detailed(many, max_new_tokens=6, ignore_eos=True).token_ids != got
