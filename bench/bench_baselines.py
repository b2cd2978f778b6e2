"""GCG steps per second and PAIR iterations per second, default model, CPU.

* GCG (nanogcg through ``dat.baselines.gcg``): one behaviour of tests/data/behaviors_benign.csv,
  ``--steps`` steps at ``--search-width`` candidates and ``--topk``; the rate excludes the
  one-time set-up (nanogcg's token filter) and counts the steps of the optimisation proper.
* PAIR (``dat.baselines.pair``): ``--streams`` streams, the default model as attacker and
  defender, the default yes/no judge, ``--iterations`` iterations on one behaviour. The
  default model (135M) writes no JSON, so every stream of every iteration is a parse failure
  after ``max_attempts`` (3) attacker calls: that is what an iteration costs with it. A
  second row times what an iteration costs when every attacker answer parses: one attacker
  call, one defender call and one judge call, batched over the streams, the same lengths.

Run: python bench/bench_baselines.py [--steps 4] [--search-width 64] [--topk 64]
     [--streams 3] [--iterations 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report

from dat import SteeredLM
from dat.baselines.gcg import GCGSettings, run_gcg
from dat.baselines.pair import ATTACKER_SYSTEM, INIT_MESSAGE, PAIRSettings, run_pair
from dat.collect import make_setting

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "behaviors_benign.csv"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--search-width", type=int, default=64)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--streams", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=1)
    args = ap.parse_args()

    lm = SteeredLM.from_pretrained("default", device="cpu")
    setting = make_setting("redteam", str(DATA), None, lm)
    scn = setting.scenarios("all")[0]
    rows = []

    gcg = GCGSettings(steps=args.steps, search_width=args.search_width, topk=args.topk)
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        made = run_gcg(lm, setting, out, gcg, split="all", limit=1, progress=False)
        total = time.perf_counter() - t
    d = made.details["behaviors"][scn.id]
    rows.append({"method": "GCG", "settings": f"{args.steps} steps, width {args.search_width}, "
                                              f"top-k {args.topk}",
                 "unit": "step", "units": d["steps_run"], "seconds": round(d["seconds"], 2),
                 "per second": d["steps_run"] / d["seconds"],
                 "seconds per unit": d["seconds"] / d["steps_run"],
                 "fwd per unit": made.compute["forward_passes"] / d["steps_run"],
                 "note": f"loss {d['first_loss']:.3f} -> {d['best_loss']:.3f}; "
                         f"{total - d['seconds']:.1f} s set-up"})

    pair = PAIRSettings(streams=args.streams, iterations=args.iterations)
    with tempfile.TemporaryDirectory() as out:
        made = run_pair(lm, setting, out, pair, split="all", limit=1, progress=False)
    d = made.details["behaviors"][scn.id]
    rows.append({"method": "PAIR (attacker output unparsable)",
                 "settings": f"{args.streams} streams, {pair.max_attempts} attempts, "
                             f"{pair.attacker_max_tokens}/{pair.defender_max_tokens} tokens",
                 "unit": "iteration", "units": d["iterations_run"], "seconds": d["seconds"],
                 "per second": d["iterations_run"] / d["seconds"],
                 "seconds per unit": d["seconds"] / d["iterations_run"],
                 "fwd per unit": None,
                 "note": f"{d['attacker_calls']} attacker calls, {d['parse_failures']} parse "
                         f"failures, {d['judge_calls']} judge calls"})

    # one iteration where every answer parses: attacker, defender and judge, batched
    from dat.baselines.gcg import fallback_target
    from dat.judges import YesNoRequest

    goal = scn.data["behavior"]
    target = fallback_target(goal)
    attacker_view = [{"role": "system", "content": ATTACKER_SYSTEM.format(goal=goal, target=target)},
                     {"role": "user", "content": INIT_MESSAGE.format(goal=goal, target=target)}]
    _, defender_system = setting.system_prompts(scn)
    t = time.perf_counter()
    texts = lm.generate([attacker_view] * args.streams, None, max_new_tokens=pair.attacker_max_tokens,
                        temperature=pair.attacker_temperature, seed=0)
    t_att = time.perf_counter() - t
    t = time.perf_counter()
    replies = lm.generate([[{"role": "system", "content": defender_system},
                            {"role": "assistant", "content": setting.greeting},
                            {"role": "user", "content": x[:600] or goal}] for x in texts], None,
                          max_new_tokens=pair.defender_max_tokens, temperature=0.0, seed=0)
    t_def = time.perf_counter() - t
    t = time.perf_counter()
    setting.judge_model.score([YesNoRequest(goal, r) for r in replies])
    t_judge = time.perf_counter() - t
    per = t_att + t_def + t_judge
    rows.append({"method": "PAIR (every answer parses)", "settings": rows[-1]["settings"],
                 "unit": "iteration", "units": 1, "seconds": round(per, 2),
                 "per second": 1 / per, "seconds per unit": per, "fwd per unit": None,
                 "note": f"attacker {t_att:.1f} s + defender {t_def:.1f} s + judge {t_judge:.2f} s"})
    report("baselines", rows, {"gcg": vars(gcg), "pair": vars(pair), "behavior": scn.id})


if __name__ == "__main__":
    main()
