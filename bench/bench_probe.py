"""Which action space moves the default setting? `dat probe` over action kinds, layers,
scales and residual positions, on the default model and `taboo` (train topics).

Each row: K = 8 random PCA directions x 17 train topics, 1 round (the first steered utterance
and the partner's reply), 32 new tokens, greedy, next to the unsteered episode of each topic.
Text reliability: split-half cosine of each direction's mean MiniLM shift; reward
reliability: split-half r of the per-direction reward effects (see src/dat/probe.py).

Run: python bench/bench_probe.py [--quick]   (about 2 minutes a row on a 2-core CPU)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402

from dat import SteeredLM  # noqa: E402
from dat.agent import ActionSpace  # noqa: E402
from dat.envs import make  # noqa: E402
from dat.probe import ProbeConfig, probe  # noqa: E402

SPACES = [
    ("tokens prefix (median embedding norm)", ActionSpace(kind="tokens", position="prefix")),
    ("residual L15 0.10x reply", ActionSpace(kind="residual", layer=15, scale=0.10)),
    ("residual L15 0.15x reply", ActionSpace(kind="residual", layer=15, scale=0.15)),
    ("residual L15 0.20x reply", ActionSpace(kind="residual", layer=15, scale=0.20)),
    ("residual L15 0.15x all", ActionSpace(kind="residual", layer=15, scale=0.15,
                                          residual_positions="all")),
    ("residual L15 0.15x all, random basis", ActionSpace(kind="residual", layer=15, scale=0.15,
                                                        residual_positions="all", basis="random")),
    ("residual L15 0.15x reply, random basis", ActionSpace(kind="residual", layer=15, scale=0.15,
                                                          basis="random")),
    ("residual L10 0.15x reply", ActionSpace(kind="residual", layer=10, scale=0.15)),
    ("residual L20 0.15x reply", ActionSpace(kind="residual", layer=20, scale=0.15)),
]


def main(quick: bool = False) -> None:
    lm = SteeredLM.from_pretrained("default", device="cpu")
    setting = make("taboo")
    cfg = ProbeConfig(directions=8, scenarios=16, rounds=1, max_new_tokens=32)
    rows, full = [], {}
    for name, space in SPACES[:3] if quick else SPACES:
        t = time.perf_counter()
        res = probe(lm, setting, space, cfg)
        full[name] = res
        rows.append({"action space": name,
                     "text reliability": res["text"]["reliability"],
                     "centred": res["text"]["reliability_centred"],
                     "effect size": res["text"]["effect_size"],
                     "unchanged": res["text"]["unchanged_share"],
                     "reward split-half r": res["reward"]["split_half_r"],
                     "mean effect": res["reward"]["mean_effect"],
                     "best direction": res["reward"]["best"]["mean"],
                     "unsteered": res["reward"]["unsteered_mean"],
                     "seconds": round(time.perf_counter() - t, 1)})
    report("probe", rows, {"config": cfg.__dict__, "runs": full})


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
