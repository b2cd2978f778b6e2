"""dat.cpu_kernels: the bf16 CPU kernels of --precision fast change the speed, not the results
(logits, replies, gradients), hold no large tensors between forwards, and fall back to each
projection's own product when siblings get different inputs."""

from __future__ import annotations

import pytest
import torch

from dat import precision
from dat.cpu_kernels import (
    PackedLinear,
    SharedInputLinear,
    StackedProduct,
    can_pack,
    use_cpu_kernels,
)
from dat.steer import SteeredLM

pytestmark = pytest.mark.skipif(not can_pack(), reason="this torch build has no oneDNN linear kernels")

CHATS = [[{"role": "user", "content": "Name a fruit that is yellow."}],
         [{"role": "user", "content": "Tell me about cats, in detail please."}]]


@pytest.fixture(scope="module")
def plain_and_fast():
    plain = SteeredLM.from_pretrained("default", device="cpu", dtype="bfloat16")
    fast = SteeredLM.from_pretrained("default", device="cpu", precision="bf16")
    return plain, fast


def test_fast_loads_the_kernels_and_keeps_the_state_dict(plain_and_fast):
    plain, fast = plain_and_fast
    assert "prepacked and stacked linear layers" in fast.precision.describe()
    kinds = [type(m) for m in fast.model.modules()]
    layers = fast.model.config.num_hidden_layers
    assert kinds.count(SharedInputLinear) == 5 * layers  # q, k, v; gate, up
    assert kinds.count(PackedLinear) == 2 * layers + 1  # o, down; the LM head
    assert torch.nn.Linear not in kinds
    own, theirs = plain.model.state_dict(), fast.model.state_dict()
    assert own.keys() == theirs.keys()
    assert all(torch.equal(own[k], theirs[k]) for k in own)


def test_kernels_give_the_plain_bf16_results(plain_and_fast):
    plain, fast = plain_and_fast
    ids = [plain.encode(c) for c in CHATS]
    logits = []
    with torch.no_grad():
        for lm in (plain, fast):
            b = lm.make_batch(ids)
            logits.append(lm.model(inputs_embeds=b.inputs_embeds, attention_mask=b.attention_mask,
                                   position_ids=b.position_ids).logits.float())
    scale = float(logits[0].abs().max())
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-2 * scale)
    assert torch.equal(logits[1][:, -1].argmax(-1), logits[0][:, -1].argmax(-1))
    # every sibling took its slice: no prefill-sized result is kept between forwards
    products = {id(m.product): m.product for m in fast.model.modules() if isinstance(m, SharedInputLinear)}
    assert products and all(p.entry is None for p in products.values())
    # gradients reach the actions through the plain products (dat clone with bf16)
    grads = []
    for lm in (plain, fast):
        actions = torch.zeros(2, 2, lm.hidden_size, requires_grad=True)
        lm.loss(CHATS, ["A banana.", "Cats purr."], actions=actions).sum().backward()
        grads.append(actions.grad)
    assert grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


class Siblings(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(16, n, bias=True).bfloat16()
                                                 for n in (16, 8, 8))


def test_siblings_with_other_inputs_get_their_own_products():
    plain, module = Siblings(), Siblings()
    assert use_cpu_kernels(module) == ["0 prepacked linear layers",
                                       "3 projections stacked with their siblings"]
    assert isinstance(module.q_proj.product, StackedProduct)
    x, y = torch.randn(3, 16).bfloat16(), torch.randn(3, 16).bfloat16()
    with torch.no_grad():
        got = [module.q_proj(x), module.k_proj(y), module.v_proj(x)]  # k reads another input
        want = [plain.q_proj(x), plain.k_proj(y), plain.v_proj(x)]
        q = module.q_proj(x)
        x.mul_(2)  # changed in place after q took its slice: k must see the new values
        k = module.k_proj(x)
        wk = plain.k_proj(x)
    torch.testing.assert_close(q, plain.q_proj(x / 2).detach())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.detach(), rtol=0, atol=2e-2)
    torch.testing.assert_close(k, wk.detach(), rtol=0, atol=2e-2)


def test_fast_without_onednn_kernels_keeps_plain_bf16(monkeypatch):
    monkeypatch.setattr(precision, "can_pack", lambda: False)
    choice = precision.choose("fast", torch.device("cpu"), flags={"amx_bf16"})
    assert choice.dtype is torch.bfloat16 and not choice.packed_linear
    assert "prepacked" not in choice.describe()
    assert precision.choose("fast", torch.device("cpu"), flags={"avx2"}).packed_linear is False
