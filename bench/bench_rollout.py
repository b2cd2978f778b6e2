"""Rollout throughput: lock-step batch 32 vs batch 1 (taboo, 3 rounds, 48 new tokens, greedy).

Both runs use the same model, setting and episode ids in one process. Batch 1 runs fewer
episodes (its per-episode cost does not depend on how many), and rates are per episode.
Run: python bench/bench_rollout.py [--episodes 32] [--single 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402

from dat import SteeredLM, UpMapping  # noqa: E402
from dat.envs import make  # noqa: E402
from dat.rollout import Rollout, RolloutConfig, episode_jobs  # noqa: E402


def measure(lm, setting, jobs, batch, up=None, new_tokens=48):
    cfg = RolloutConfig(batch_size=batch, rounds=3, max_new_tokens=new_tokens, seed=0)
    r = Rollout(lm, setting, up_mapping=up, config=cfg)
    t = time.perf_counter()
    out = r.run(jobs)
    dt = time.perf_counter() - t
    return {"batch": batch, "episodes": len(out), "seconds": dt,
            "episodes/hour": 3600 * len(out) / dt, "generated tokens/s": r.generated_tokens / dt}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--episodes", type=int, default=32)
    ap.add_argument("--single", type=int, default=4, help="episodes run at batch 1")
    ap.add_argument("--steered", action="store_true", help="random PCA actions (default: unsteered)")
    args = ap.parse_args(argv)
    lm = SteeredLM.from_pretrained("default", device="cpu")
    setting = make("taboo")
    up = UpMapping.from_embedding_pca(lm, 64, 2) if args.steered else None
    jobs = episode_jobs(setting, args.episodes, "train", seed=0)
    measure(lm, setting, jobs[:2], 2, up, new_tokens=4)  # warm-up: judge load, caches
    big = measure(lm, setting, jobs, args.episodes, up)
    one = measure(lm, setting, jobs[:args.single], 1, up)
    ratio = big["episodes/hour"] / one["episodes/hour"]
    report("rollout", [one, big], {"speedup_batch_vs_single": ratio, "target": ">= 8x",
                                   "setting": "taboo", "rounds": 3, "new_tokens": 48})
    print(f"batch {args.episodes} vs batch 1: {ratio:.1f}x episodes/hour")


if __name__ == "__main__":
    main()
