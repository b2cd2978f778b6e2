"""Injection overhead: SteeredLM.generate with actions vs plain model.generate.

Default model, 32 dialogues x 48 new tokens at batch 32, greedy, same prompts.
Run: python bench/bench_inject.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report, timed  # noqa: E402

from dat import SteeredLM, UpMapping  # noqa: E402
from dat.planner import normalize_action  # noqa: E402

TOPICS = ["cooking", "the weather", "football", "space travel", "gardening", "music", "old movies",
          "mountain hiking"]


def dialogues(n: int) -> list:
    return [[{"role": "system", "content": f"You are a friendly person who likes {TOPICS[i % 8]}."},
             {"role": "user", "content": f"Hello! Tell me something about {TOPICS[(i * 3) % 8]}."
              + " Please." * (i % 5)}] for i in range(n)]


def main(n: int = 32, new_tokens: int = 48, repeats: int = 2) -> dict:
    lm = SteeredLM.from_pretrained("default", device="cpu")
    model = lm.model
    ds = dialogues(n)
    up = UpMapping.from_embedding_pca(lm, 64, 2)
    actions = up(normalize_action(torch.randn(n, 64, generator=torch.Generator().manual_seed(0)), 1.0))

    ids = [lm.encode(d) for d in ds]
    T = max(map(len, ids))
    input_ids = torch.tensor([[lm.pad_token_id] * (T - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in ids])

    def plain():
        with torch.no_grad():
            out = model.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=lm.pad_token_id)
        return out.shape[1] - T

    def ours(acts):
        return lambda: lm.generate_detailed(ds, actions=acts, max_new_tokens=new_tokens,
                                            ignore_eos=True).num_generated

    plain()  # warm-up
    t_plain, n_plain = timed(plain, repeats)
    t_uns, n_uns = timed(ours(None), repeats)
    t_st, n_st = timed(ours(actions), repeats)
    rows = [
        {"run": "model.generate (plain HF)", "seconds": t_plain, "tokens": n * n_plain,
         "tokens/s": n * n_plain / t_plain, "ratio": 1.0},
        {"run": "SteeredLM.generate, no actions", "seconds": t_uns, "tokens": n_uns,
         "tokens/s": n_uns / t_uns, "ratio": t_uns / t_plain},
        {"run": "SteeredLM.generate, actions (prefix)", "seconds": t_st, "tokens": n_st,
         "tokens/s": n_st / t_st, "ratio": t_st / t_plain},
    ]
    report("inject", rows, {"dialogues": n, "new_tokens": new_tokens, "batch": n,
                            "target": "steered/plain <= 1.2"})
    return {"ratio": t_st / t_plain}


if __name__ == "__main__":
    main()
