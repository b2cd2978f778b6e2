import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

DIALOGUES = [
    [{"role": "system", "content": "You are a friendly assistant."},
     {"role": "user", "content": "What is your favourite season and why?"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Tell me about cats."},
     {"role": "assistant", "content": "Cats are small furry pets."},
     {"role": "user", "content": "And dogs? Explain in detail how they differ from cats in behaviour."}],
]


@pytest.fixture(scope="session")
def default_lm():
    """The real embedded default model (SmolLM2-135M-Instruct), loaded once per test run."""
    from dat import SteeredLM

    return SteeredLM.from_pretrained("default")


@pytest.fixture(scope="session")
def tiny_lm(default_lm):
    """A tiny randomly initialised Llama with the default tokenizer, for mechanics."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dat import SteeredLM
    from dat.models import freeze

    tok = default_lm.tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    model = freeze(LlamaForCausalLM(cfg))
    return SteeredLM(model, tok, name="tiny-random-llama")


@pytest.fixture
def dialogues():
    return [list(d) for d in DIALOGUES]
