"""Rollout throughput, all in one run on one machine (taboo, 3 rounds, 48 new tokens, greedy,
unsteered, default model):

* the reference loop (``reference_loop.py``: batch 1, every prompt re-encoded in full);
* our engine at batch 1 and at batch 32 (and ``--also`` larger batches);
* pure batched generation of the same model and batch (``generate_detailed`` on the 32
  first prompts, 48 tokens each, no end-of-turn stop): how much of the engine's time is not
  generation;
* the machine's ceiling: forward-pass tokens/s of the same model on one large batch;
* peak resident memory (RSS) of the process during the batch-32 rollout.

Batch-1 runs use fewer episodes (``--single``); rates are per episode and per second.
Run: python bench/bench_rollout.py [--episodes 32] [--single 4] [--also 64]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402
from reference_loop import reference_rollout  # noqa: E402

from dat import SteeredLM  # noqa: E402
from dat.envs import make  # noqa: E402
from dat.rollout import Rollout, RolloutConfig, episode_jobs  # noqa: E402

ROUNDS, NEW_TOKENS = 3, 48


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakRSS:
    """Samples the process's resident memory every 50 ms while active."""

    def __enter__(self):
        self.peak, self._stop = rss_mib(), threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def row(name, batch, episodes, seconds, tokens):
    return {"run": name, "batch": batch, "episodes": episodes, "seconds": round(seconds, 1),
            "episodes/hour": 3600 * episodes / seconds, "generated tokens/s": tokens / seconds}


def engine(lm, setting, jobs, batch, **kw):
    cfg = RolloutConfig(batch_size=batch, rounds=ROUNDS, max_new_tokens=NEW_TOKENS, seed=0, **kw)
    r = Rollout(lm, setting, config=cfg)
    t = time.perf_counter()
    out = r.run(jobs)
    return out, time.perf_counter() - t, r.generated_tokens


def pure_generation(lm, setting, jobs) -> float:
    """Generated tokens/s of one batched generation of the episodes' first steered prompts
    (the same model and batch as the rollout, with no states, judges or partner turns)."""
    from dat.episode import Turn

    views = []
    for eid, scn in jobs:
        ep = setting.new_episode(eid, scn)
        opening = setting.opening(scn)
        if opening.text is not None:
            ep.turns.append(Turn(opening.speaker, opening.text))
        views.append(ep.view("steered"))
    lm.generate(views[:2], max_new_tokens=4)  # warm-up
    t = time.perf_counter()
    out = lm.generate_detailed(views, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    return out.num_generated / (time.perf_counter() - t)


@torch.no_grad()
def ceiling(lm, batch=32, length=256, repeats=2) -> float:
    """Tokens/s of one forward pass over a full batch (no padding, no decoding)."""
    x = torch.randint(1000, 20000, (batch, length), generator=torch.Generator().manual_seed(0))
    lm.model(input_ids=x, logits_to_keep=1)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        lm.model(input_ids=x, logits_to_keep=1)
        best = min(best, time.perf_counter() - t)
    return batch * length / best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--episodes", type=int, default=32)
    ap.add_argument("--single", type=int, default=4, help="episodes run at batch 1")
    ap.add_argument("--also", type=int, nargs="*", default=[], help="more batch sizes to run")
    args = ap.parse_args(argv)
    lm = SteeredLM.from_pretrained("default", device="cpu")
    setting = make("taboo")
    jobs = episode_jobs(setting, max([args.episodes, *args.also]), "train", seed=0)
    base_rss = rss_mib()
    Rollout(lm, setting, config=RolloutConfig(batch_size=2, rounds=1, max_new_tokens=4)).run(jobs[:2])  # warm-up

    rows = []
    t = time.perf_counter()
    ref_eps, ref_tokens = reference_rollout(lm, setting, jobs[:args.single], ROUNDS, NEW_TOKENS)
    rows.append(row("reference loop", 1, len(ref_eps), time.perf_counter() - t, ref_tokens))
    single, dt, n = engine(lm, setting, jobs[:args.single], 1)
    rows.append(row("dat engine", 1, len(single), dt, n))
    with PeakRSS() as mem:
        big, dt, n = engine(lm, setting, jobs[:args.episodes], args.episodes)
    rows.append(row("dat engine", args.episodes, len(big), dt, n))
    for b in args.also:
        out, dt, n = engine(lm, setting, jobs[:b], b)
        rows.append(row("dat engine", b, len(out), dt, n))
    gen_rate = pure_generation(lm, setting, jobs[:args.episodes])
    rows.append({"run": f"pure batched generation, {args.episodes} x {NEW_TOKENS} tokens",
                 "batch": args.episodes, "episodes": 0, "seconds": 0.0, "episodes/hour": 0.0,
                 "generated tokens/s": gen_rate})
    ceil = ceiling(lm)
    rows.append({"run": "ceiling: one forward pass, 32 x 256 tokens", "batch": 32, "episodes": 0,
                 "seconds": 0.0, "episodes/hour": 0.0, "generated tokens/s": ceil})

    # the engine gives the same dialogues as the reference loop (greedy)
    same = sum([t.text for t in r.turns] == [t.text for t in s.episode.turns]
               for r, s in zip(ref_eps, sorted(single, key=lambda e: e.episode.episode_id)))
    ref_rate, big_rate = rows[0]["generated tokens/s"], rows[2]["generated tokens/s"]
    summary = {
        "batch_vs_single_episodes_per_hour": rows[2]["episodes/hour"] / rows[1]["episodes/hour"],
        # per generated token: the batch-1 run has fewer episodes, whose lengths differ
        "batch_vs_single_tokens_per_s": rows[2]["generated tokens/s"] / rows[1]["generated tokens/s"],
        "engine_vs_reference_tokens_per_s": big_rate / ref_rate,
        "engine_vs_ceiling": big_rate / ceil,
        "engine_vs_pure_generation": big_rate / gen_rate,
        "best_batch_vs_reference": max(r["generated tokens/s"] for r in rows[2:-2]) / ref_rate,
        "best_batch_vs_ceiling": max(r["generated tokens/s"] for r in rows[2:-2]) / ceil,
        "peak_rss_mib_batch": mem.peak, "rss_mib_model_loaded": base_rss,
        "same_dialogues_as_reference": f"{same}/{len(ref_eps)}",
        "targets": {"batch_vs_single": ">= 8x", "engine_vs_reference": ">= 10x", "engine_vs_ceiling": ">= 0.5"},
        "setting": "taboo", "rounds": ROUNDS, "new_tokens": NEW_TOKENS,
    }
    report("rollout", rows, summary)
    for k, v in summary.items():
        if k != "targets":
            print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")


if __name__ == "__main__":
    main()
