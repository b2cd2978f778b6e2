"""--precision fast vs exact, side by side in one run (default setting ``openup``, its held-out
test partners, 3 rounds, 48 new tokens, greedy, batch 32, default model):

* speed: rollout generated tokens/s and episodes/h of each precision, the median of
  ``--repeats`` timed runs in which the precisions take turns (the ratio is the median of
  the per-repeat ratios);
* same behaviour: the paired difference of episode rewards (fast - exact, same episode ids
  and scenarios) with its 95 % bootstrap CI, and the share of identical greedy dialogues;
* same language: perplexity of each precision's steered replies under the *exact* model.

The steered agent is unsteered by default, or ``--agent DIR`` (a trained planner).
``--emulate-avx2`` measures what ``fast`` does on a CPU without native bf16: it reruns itself
with ATen and oneDNN kernels limited to AVX2 (``ATEN_CPU_CAPABILITY=avx2``,
``ONEDNN_MAX_CPU_ISA=AVX2``) and times the fallback ``fast`` picks there (int8 linear
layers). FBGEMM, which runs the int8 products, picks its own kernels, so on an AVX-512 CPU
this is an approximation of an AVX2-only machine, labelled as such.
Run: python bench/bench_precision.py [--episodes 64] [--agent runs/quickstart/dat-residual]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402

from dat.agent import load_agent  # noqa: E402
from dat.envs import make  # noqa: E402
from dat.precision import BF16_FLAGS, choose, cpu_flags  # noqa: E402
from dat.quality import perplexity  # noqa: E402
from dat.rollout import Rollout, RolloutConfig, episode_jobs  # noqa: E402
from dat.stats import paired_difference  # noqa: E402
from dat.steer import SteeredLM  # noqa: E402

ROUNDS, NEW_TOKENS, BATCH = 3, 48, 32


def run(lm, setting, jobs, agent_dir, batch=BATCH):
    agent = load_agent(agent_dir, lm) if agent_dir else None
    cfg = RolloutConfig(batch_size=batch, rounds=ROUNDS, max_new_tokens=NEW_TOKENS, seed=0)
    Rollout(lm, setting, agent=agent, config=RolloutConfig(batch_size=2, rounds=1,
                                                           max_new_tokens=4)).run(jobs[:2])
    r = Rollout(lm, setting, agent=agent, config=cfg)
    t = time.perf_counter()
    out = sorted(r.run(jobs), key=lambda e: e.episode.episode_id)
    return out, time.perf_counter() - t, r.generated_tokens


def steered_turns(runs):
    prompts, texts = [], []
    for r in runs:
        ep = r.episode
        for k, t in enumerate(ep.turns):
            if t.speaker == "steered" and t.text.strip():
                prompts.append(ep.view("steered", upto=k))
                texts.append(t.text)
    return prompts, texts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--episodes", type=int, default=64)
    ap.add_argument("--agent", default=None, help="planner folder (default: unsteered)")
    ap.add_argument("--also", nargs="*", default=[], choices=["bf16", "int8"],
                    help="also time these forced precisions")
    ap.add_argument("--emulate-avx2", action="store_true",
                    help="limit ATen/oneDNN kernels to AVX2 and time the fallback fast picks")
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--repeats", type=int, default=2,
                    help="timed runs per precision, taking turns (the median is reported)")
    args = ap.parse_args(argv)
    if args.emulate_avx2 and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
        env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)  # before torch picks kernels
    no_bf16 = cpu_flags() - set(BF16_FLAGS)
    fast = (choose("fast", torch.device("cpu"), no_bf16).int8_linear and "int8") \
        if args.emulate_avx2 else "fast"
    setting = make("openup")
    jobs = episode_jobs(setting, args.episodes, "test", seed=0)
    exact = SteeredLM.from_pretrained("default", device="cpu")
    lms = {name: exact if name == "exact" else SteeredLM.from_pretrained(
        "default", device="cpu", precision=fast if name == "fast" else name)
        for name in ["exact", "fast", *args.also]}
    # the precisions take turns, repeat after repeat: a shared machine's load drifts over minutes
    runs, timings, reproducible = {}, {name: [] for name in lms}, True
    for _ in range(args.repeats):
        for name, lm in lms.items():
            out, dt, tokens = run(lm, setting, jobs, args.agent, args.batch)
            timings[name].append((dt, tokens))
            texts = [[t.text for t in r.episode.turns] for r in out]
            reproducible &= runs.setdefault(name, (out, texts))[1] == texts
    rows = []
    for name, lm in lms.items():
        out = runs[name][0]
        dt = statistics.median(d for d, _ in timings[name])
        prompts, texts = steered_turns(out)
        ppl = perplexity(exact, prompts, texts)["perplexity"]
        rewards = [r.total_reward for r in out if r.total_reward is not None]
        rows.append({"precision": name, "chosen": lm.precision.describe(), "episodes": len(out),
                     "seconds": round(dt, 1), "episodes/hour": round(3600 * len(out) / dt),
                     "generated tokens/s": round(statistics.median(n / d for d, n in timings[name]), 1),
                     "mean reward": round(sum(rewards) / len(rewards), 4),
                     "perplexity under exact": round(ppl, 3)})
    runs = {name: out for name, (out, _) in runs.items()}
    pair_ratios = [round((nf / df) / (ne / de), 3)
                   for (de, ne), (df, nf) in zip(timings["exact"], timings["fast"])]
    by_id = {n: {r.episode.episode_id: r for r in runs[n]} for n in runs}
    others = {n: {"tokens_per_s_vs_exact": r["generated tokens/s"] / rows[0]["generated tokens/s"],
                  "reward_diff_vs_exact": paired_difference(
                      {i: e.total_reward for i, e in by_id[n].items()},
                      {i: e.total_reward for i, e in by_id["exact"].items()},
                      groups={i: e.episode.scenario.id for i, e in by_id["exact"].items()}),
                  "perplexity_ratio_vs_exact": r["perplexity under exact"]
                  / rows[0]["perplexity under exact"]}
              for n, r in zip(runs, rows) if n not in ("exact", "fast")}
    diff = paired_difference({i: r.total_reward for i, r in by_id["fast"].items()},
                             {i: r.total_reward for i, r in by_id["exact"].items()},
                             groups={i: r.episode.scenario.id for i, r in by_id["exact"].items()})
    same = sum([t.text for t in by_id["fast"][i].episode.turns]
               == [t.text for t in by_id["exact"][i].episode.turns] for i in by_id["exact"])
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx", "avx2")))
    summary = {
        "fast_vs_exact_tokens_per_s": statistics.median(pair_ratios),
        "fast_vs_exact_tokens_per_s_each_repeat": pair_ratios,
        "fast_vs_exact_episodes_per_hour": statistics.median(
            de / df for (de, _), (df, _) in zip(timings["exact"], timings["fast"])),
        "repeats": args.repeats,
        "repeats_gave_the_same_dialogues": reproducible,
        "reward_diff_fast_minus_exact": diff,
        "exact_mean_within_ci": (diff["ci"][0] <= 0.0 <= diff["ci"][1]) if diff.get("ci") else None,
        "identical_greedy_dialogues": f"{same}/{len(by_id['exact'])}",
        "perplexity_ratio_fast_vs_exact": rows[1]["perplexity under exact"]
        / rows[0]["perplexity under exact"],
        "forced_precisions": others,
        "agent": args.agent or "unsteered", "setting": "openup (test)", "batch": args.batch,
        "rounds": ROUNDS, "new_tokens": NEW_TOKENS, "cpu_flags": flags,
        "emulated_avx2": (f"ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 on a CPU with "
                          f"{', '.join(flags)}; fast = the no-bf16 fallback ({fast})")
        if args.emulate_avx2 else None,
        "torch_threads": torch.get_num_threads(),
        "targets": {"fast_vs_exact_tokens_per_s": ">= 1.8 on a CPU with native bf16"},
    }
    name = "precision" + ("-avx2" if args.emulate_avx2 else "") + \
        ("" if args.batch == BATCH else f"-batch{args.batch}")
    report(name, rows, summary)


if __name__ == "__main__":
    main()
