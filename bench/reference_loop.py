"""The reference way of collecting DAT dialogues, for comparison (not used by the library).

One episode at a time at batch 1, as the paper's code does it: for every steered turn the
whole prompt is encoded once for the state and again by ``model.generate``; the partner's
whole prompt is re-encoded by ``model.generate`` every turn; the judge scores one episode at a
time. Greedy, unsteered.
"""

from __future__ import annotations

import torch

from dat.envs.base import Turn


@torch.no_grad()
def reference_rollout(lm, setting, jobs, rounds: int, new_tokens: int) -> tuple[list, int]:
    """Run ``(episode_id, scenario)`` jobs; return the episodes and the generated token count."""
    model, tok = lm.model, lm.tokenizer
    base = getattr(model, model.base_model_prefix)
    generated = 0
    episodes = []

    def reply(view):
        nonlocal generated
        ids = torch.tensor([lm.encode(view)])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=lm.eos_token_ids, pad_token_id=lm.pad_token_id)
        new = out[0, ids.shape[1]:]
        generated += len(new)
        return tok.decode(new, skip_special_tokens=True).strip()

    for eid, scenario in jobs:
        ep = setting.new_episode(eid, scenario)
        opening = setting.opening(scenario)
        speaker = opening.speaker
        if opening.text is not None:
            ep.turns.append(Turn(opening.speaker, opening.text))
            speaker = "partner" if opening.speaker == "steered" else "steered"
        rounds_done = 0
        while rounds_done < rounds:
            if speaker == "steered":
                ids = torch.tensor([lm.encode(ep.view("steered"))])
                base(input_ids=ids).last_hidden_state[:, -1]  # the planner's state
                ep.turns.append(Turn("steered", reply(ep.view("steered"))))
                speaker = "partner"
            else:
                first = not any(t.speaker == "steered" for t in ep.turns)
                ep.turns.append(Turn("partner", reply(ep.view("partner"))))
                speaker = "steered"
                if not first:
                    rounds_done += 1
                    if setting.reward_timing == "round" or rounds_done == rounds:
                        ep.rewards += setting.reward([ep], rounds_done - 1)
        base(input_ids=torch.tensor([lm.encode(ep.view("steered"))]))  # terminal state
        episodes.append(ep)
    return episodes, generated
