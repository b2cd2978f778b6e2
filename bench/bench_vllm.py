"""vLLM backend vs transformers backend, on this machine's CPU (default model, float32).

1. Generation: 32 dialogues x 48 new tokens at batch 32, greedy, the same dialogues and the
   same actions (PCA up-mapping, prefix position) for both backends; generated tokens/s.
   The transformers backend is timed before the vLLM engine starts (its idle worker would
   otherwise share the 2 cores).
2. Where the action tokens go, under vLLM's prefix cache: 32 dialogues that share a long,
   static system prompt; a first call with actions A fills the cache, a second with new
   actions B (as every turn of a rollout has) is timed, with 1 new token (prefill only).
   Reported: prompt tokens vLLM took from its cache, and the prefill time.
4. The rollout engine itself on each backend: the same ``openup`` test episodes (3 rounds, 48
   new tokens, greedy, batch 32, unsteered), episodes/h and generated tokens/s, and how many
   dialogues are identical (``--rollout-episodes``, 0 skips it).
3. States: the transformers model's final hidden state of the last prompt token (what the
   vLLM backend uses), and, with ``--vllm-states``, the same from a second vLLM engine in
   pooling mode (last-token pooling, no normalisation).

Needs vLLM (CPU: ``make vllm-env``, then ``make bench-vllm``). Without it, prints why and
exits 0. Writes bench/results/vllm.json (``--compile``: vllm-compile.json).
Run: .venv-vllm/bin/python bench/bench_vllm.py [--n 32] [--new-tokens 48] [--vllm-states]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report, timed

TOPICS = ["cooking", "the weather", "football", "space travel", "gardening", "music",
          "old movies", "mountain hiking"]
RULES = " ".join(
    f"Rule {k}: stay friendly, keep to the topic, answer in one or two sentences, never mention "
    f"these rules, and ask a short question back when the other person stops talking."
    for k in range(1, 9))  # ~250 tokens of static system prompt, the same for every dialogue


def dialogues(n: int) -> list:
    return [[{"role": "system", "content": f"You are a friendly person who likes {TOPICS[i % 8]}."},
             {"role": "user", "content": f"Hello! Tell me something about {TOPICS[(i * 3) % 8]}."
              + " Please." * (i % 5)}] for i in range(n)]


def shared_system_dialogues(n: int) -> list:
    return [[{"role": "system", "content": "You are playing a word game. " + RULES},
             {"role": "user", "content": f"Hi! Let's talk about {TOPICS[i % 8]}, shall we? "
              + "Tell me more." * (i % 3)}] for i in range(n)]


def actions(lm, n: int, seed: int):
    import torch

    from dat import UpMapping
    from dat.planner import normalize_action

    up = UpMapping.from_embedding_pca(lm, 64, 2, act_norm=1.0)
    return up(normalize_action(torch.randn(n, 64, generator=torch.Generator().manual_seed(seed)), 1.0))


def rollout_run(lm, episodes: int, new_tokens: int) -> tuple[list, float, int]:
    """The default setting's rollout on ``lm``: finished episodes, seconds, tokens."""
    from dat.envs import make
    from dat.rollout import Rollout, RolloutConfig, episode_jobs

    setting = make("openup")
    jobs = episode_jobs(setting, episodes, "test", seed=0)
    Rollout(lm, setting, config=RolloutConfig(batch_size=2, rounds=1, max_new_tokens=4)).run(jobs[:2])
    r = Rollout(lm, setting, config=RolloutConfig(batch_size=32, rounds=3, max_new_tokens=new_tokens))
    t = time.perf_counter()
    out = sorted(r.run(jobs), key=lambda e: e.episode.episode_id)
    return out, time.perf_counter() - t, r.generated_tokens


def rollout_row(name: str, out: list, seconds: float, tokens: int) -> dict:
    return {"run": name, "seconds": seconds, "tokens": tokens, "tokens/s": tokens / seconds,
            "episodes/hour": 3600 * len(out) / seconds}


def main(n: int = 32, new_tokens: int = 48, repeats: int = 2, vllm_states: bool = False,
         eager: bool = True, rollout_episodes: int = 32) -> dict | None:
    if importlib.util.find_spec("vllm") is None:
        print("bench_vllm: vLLM is not installed here; run `make bench-vllm` (CPU) or install "
              "'dat[vllm]' (GPU). Skipped.")
        return None
    from dat import SteeredLM
    from dat.backends.vllm_lm import VLLMSteeredLM

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    ds = dialogues(n)
    rows, extra = [], {"dialogues": n, "batch": n, "new_tokens": new_tokens, "dtype": "float32",
                       "position": "prefix", "vllm_enforce_eager": eager}

    # 1a. transformers backend, alone on the machine
    hf = SteeredLM.from_pretrained("default", device="cpu", dtype="float32")
    acts = actions(hf, n, seed=0)
    hf.generate_detailed(ds[:4], actions=acts[:4], max_new_tokens=4)  # warm-up
    t_hf, g_hf = timed(lambda: hf.generate_detailed(ds, actions=acts, max_new_tokens=new_tokens,
                                                    ignore_eos=True), repeats)
    t_state_hf, _ = timed(lambda: hf.state(ds, batch_size=n), repeats)
    greedy_hf = hf.generate_detailed(ds, actions=acts, max_new_tokens=new_tokens)
    roll_hf = rollout_run(hf, rollout_episodes, new_tokens) if rollout_episodes else None

    # 1b. vLLM backend (its own copy of the weights, plus the transformers one for states)
    t0 = time.perf_counter()
    kw = {"enforce_eager": eager, "max_model_len": 2048}
    vlm = VLLMSteeredLM.from_pretrained("default", device="cpu", dtype="float32", engine_kwargs=kw)
    extra["vllm_startup_s"] = round(time.perf_counter() - t0, 1)
    vlm.generate_detailed(ds[:4], actions=acts[:4], max_new_tokens=4)  # warm-up
    vlm.engine.reset_prefix_cache()
    t_v, g_v = timed(lambda: vlm.generate_detailed(ds, actions=acts, max_new_tokens=new_tokens,
                                                   ignore_eos=True), repeats)
    greedy_v = vlm.generate_detailed(ds, actions=acts, max_new_tokens=new_tokens)
    same = sum(a == b for a, b in zip(greedy_hf.token_ids, greedy_v.token_ids))
    extra["greedy_replies_equal"] = f"{same}/{n}"
    rows += [
        {"run": "hf backend: generate (batch 32)", "seconds": t_hf, "tokens": g_hf.num_generated,
         "tokens/s": g_hf.num_generated / t_hf, "ratio": 1.0},
        {"run": "vllm backend: generate (batch 32)", "seconds": t_v, "tokens": g_v.num_generated,
         "tokens/s": g_v.num_generated / t_v, "ratio": (g_v.num_generated / t_v) / (g_hf.num_generated / t_hf)},
        {"run": "states from the transformers model (batch 32)", "seconds": t_state_hf,
         "tokens": n, "tokens/s": float("nan"), "ratio": float("nan")},
    ]

    if roll_hf is not None:  # 4. the rollout on each backend
        roll_v = rollout_run(vlm, rollout_episodes, new_tokens)
        hf_row, v_row = rollout_row("hf backend: rollout", *roll_hf), rollout_row("vllm backend: rollout", *roll_v)
        hf_row["ratio"], v_row["ratio"] = 1.0, v_row["tokens/s"] / hf_row["tokens/s"]
        same = sum([t.text for t in a.episode.turns] == [t.text for t in b.episode.turns]
                   for a, b in zip(roll_hf[0], roll_v[0]))
        extra["rollout"] = {"setting": "openup (test)", "episodes": rollout_episodes, "rounds": 3,
                            "batch": 32, "rows": [hf_row, v_row],
                            "identical_dialogues": f"{same}/{rollout_episodes}",
                            "vllm_vs_hf_tokens_per_s": v_row["ratio"],
                            "vllm_vs_hf_episodes_per_hour": v_row["episodes/hour"] / hf_row["episodes/hour"]}
        print(f"rollout: hf {hf_row['tokens/s']:.1f} tok/s {hf_row['episodes/hour']:.0f} ep/h; "
              f"vllm {v_row['tokens/s']:.1f} tok/s {v_row['episodes/hour']:.0f} ep/h "
              f"({v_row['ratio']:.2f}x); identical dialogues {same}/{rollout_episodes}")

    # 2. position of the action tokens vs vLLM's prefix cache
    sd = shared_system_dialogues(n)
    a1, a2 = actions(vlm, n, seed=1), actions(vlm, n, seed=2)
    cache_rows = []
    for pos in ("prefix", "infix", "suffix", None):
        vlm.engine.reset_prefix_cache()

        def call(a, pos=pos):
            _, ids, at, acts_ = vlm.prepare(sd, None if pos is None else a, pos or "prefix", 1)
            embeds = vlm.prompt_embeds(vlm.make_batch(ids, at, acts_))
            t = time.perf_counter()
            outs = vlm.generate_from_embeds(embeds, 1)
            return time.perf_counter() - t, outs, embeds

        call(a1)  # fills the cache (the turn before, with other actions)
        sec, outs, embeds = call(a2)
        prompt = sum(e.shape[0] for e in embeds)
        cached = sum(int(getattr(o, "num_cached_tokens", 0) or 0) for o in outs)
        cache_rows.append({"position": pos or "unsteered", "prompt tokens": prompt,
                           "cached tokens": cached, "cached share": cached / prompt,
                           "prefill seconds": sec})
    base = next(r["prefill seconds"] for r in cache_rows if r["position"] == "prefix")
    for r in cache_rows:
        r["time vs prefix"] = r["prefill seconds"] / base
    extra["prefix_cache"] = cache_rows
    extra["block_size"] = vlm.engine.llm_engine.vllm_config.cache_config.block_size

    # 3. optional: states from vLLM itself (a second engine, in pooling mode)
    if vllm_states:
        extra["vllm_states"] = vllm_state_bench(vlm, ds, repeats, t_state_hf)
    path = report("vllm" if eager else "vllm-compile", rows, extra)
    from rich.console import Console
    from rich.table import Table

    table = Table(title="action position vs vLLM prefix cache (second call, new actions)")
    for c in cache_rows[0]:
        table.add_column(c)
    for r in cache_rows:
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()])
    Console().print(table)
    print(f"greedy replies equal: {extra['greedy_replies_equal']}; wrote {path}")
    return extra


def vllm_state_bench(vlm, ds, repeats: int, t_hf: float) -> dict:
    """Final hidden state of the last prompt token from a pooling-mode vLLM engine."""
    import torch
    from vllm import LLM

    try:
        t0 = time.perf_counter()
        pool = LLM(model=vlm.engine.llm_engine.model_config.model, runner="pooling",
                   dtype="float32", enforce_eager=True, max_model_len=2048,
                   pooler_config={"seq_pooling_type": "LAST", "use_activation": False})
        startup = time.perf_counter() - t0
        ids = [vlm.encode(d) for d in ds]
        prompts = [{"prompt_token_ids": x} for x in ids]
        pool.embed(prompts[:2], use_tqdm=False)
        sec, outs = timed(lambda: pool.embed(prompts, use_tqdm=False), repeats)
        got = torch.stack([torch.as_tensor(o.outputs.embedding) for o in outs]).float()
        ref = vlm.state(ds)
        return {"startup_s": round(startup, 1), "seconds": sec, "hf_seconds": t_hf,
                "max_abs_diff_vs_hf": float((got - ref).abs().max())}
    except Exception as exc:  # noqa: BLE001  (report it; the other numbers still count)
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--vllm-states", action="store_true")
    ap.add_argument("--compile", action="store_true", help="let vLLM compile (slow start on CPU)")
    ap.add_argument("--rollout-episodes", type=int, default=32, help="0: skip the rollout part")
    a = ap.parse_args()
    main(a.n, a.new_tokens, a.repeats, a.vllm_states, eager=not a.compile,
         rollout_episodes=a.rollout_episodes)
