"""Buffer size: on-disk bytes per transition of real buffers vs the float32 reference layout.

Default model, ``taboo``, 16 episodes x 3 rounds x 16 new tokens, greedy, batch 16, collected
with ``dat.collect.collect`` twice per kind, once per layout:

* ``corpus``: unsteered (d' = 0), as the self-clone corpus;
* ``steered``: random 64-d actions through the PCA up-mapping
  (``UpMapping.from_embedding_pca(lm, 64, 2)``), as an exploration buffer.

Layouts: without terminal states (the default: ``T`` state rows per episode) and with them
(``--terminal-states``, as buffers written before the option: ``T + 1`` rows). The reference
stores per transition float32 ``s`` and ``s'`` (hidden * 4 bytes each), the float32 action
(d' * 4), reward (4) and a done byte (1). Bytes are the Parquet transitions files (what the
reference stores) and, separately, with the dialogues JSONL files (the full text, which the
reference does not keep). A shard also has a fixed cost (the Parquet footer: schema, column
metadata); ``ratio excl. footer`` leaves it out, the ratio of large shards.
Run: python bench/bench_buffer.py [--episodes 16] [--rounds 3] [--new-tokens 16] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402

from dat import SteeredLM  # noqa: E402
from dat.buffer import Buffer  # noqa: E402
from dat.collect import CollectConfig, collect  # noqa: E402

TARGET = 4.0


def reference_bytes(hidden: int, action_dim: int) -> int:
    """float32 s and s', float32 action and reward, one byte for done."""
    return hidden * 4 + hidden * 4 + action_dim * 4 + 4 + 1


def run(lm, out: Path, kind: str, terminal_states: bool, args) -> tuple[dict, Buffer]:
    steered = {"up_mapping": "pca", "action_dim": 64, "n_tokens": 2} if kind == "steered" else {}
    cfg = CollectConfig(out=str(out), episodes=args.episodes, rounds=args.rounds,
                        max_new_tokens=args.new_tokens, batch_size=args.batch, progress=False,
                        terminal_states=terminal_states, **steered)
    t = time.perf_counter()
    collect(cfg, lm=lm)
    seconds = time.perf_counter() - t
    b = Buffer(out)
    files = sorted(out.glob("transitions-*.parquet"))
    shards = sum(p.stat().st_size for p in files)
    footer = sum(pq.read_metadata(p).serialized_size + 12 for p in files)  # + length, magics
    dialogues = sum(p.stat().st_size for p in out.glob("dialogues-*.jsonl"))
    n = b.n_transitions
    ref = reference_bytes(b.hidden_size, b.action_dim)
    per, per_all = shards / n, (shards + dialogues) / n
    return {"buffer": kind, "layout": "with s_T (old)" if terminal_states else "no s_T (default)",
            "d'": b.action_dim, "episodes": len(b), "transitions": n,
            "state rows": n + (len(b) if terminal_states else 0),
            "shards": len(files), "footer bytes/shard": footer / len(files),
            "bytes/transition": per, "ref bytes/transition": ref, "ratio": ref / per,
            "ratio excl. footer": ref * n / (shards - footer),
            "bytes/transition incl. dialogues": per_all, "ratio incl. dialogues": ref / per_all,
            "collect seconds": seconds}, b


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--keep", default=None, help="write the buffers here and keep them "
                                                  "(default: a temporary folder)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    lm = SteeredLM.from_pretrained("default", device="cpu")
    rows, checks = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or scratch
        for kind in ("corpus", "steered"):
            new, b_new = run(lm, Path(tmp) / f"{kind}-new", kind, False, args)
            old, b_old = run(lm, Path(tmp) / f"{kind}-old", kind, True, args)
            rows += [new, old]
            # same dialogues either way; the default layout holds the same s_0 .. s_{T-1}
            x_new, x_old = b_new.tensors(drop_failed=False), b_old.tensors(drop_failed=False)
            checks[kind] = {
                "same_dialogues": [e["episode"]["turns"] for e in b_new.episodes()]
                == [e["episode"]["turns"] for e in b_old.episodes()],
                "max_state_diff": float((x_new["states"] - x_old["states"]).abs().max()),
                "size_vs_old_layout": new["bytes/transition"] / old["bytes/transition"],
            }
    default = [r for r in rows if r["layout"].startswith("no s_T")]
    summary = {
        "target": f">= {TARGET:g}x smaller than the float32 reference per transition "
                  "(transitions files)",
        "target_met": all(r["ratio"] >= TARGET for r in default),
        "min_ratio_default_layout": min(r["ratio"] for r in default),
        "min_ratio_default_layout_excl_footer": min(r["ratio excl. footer"] for r in default),
        "checks": checks, "model": lm.name, "hidden_size": lm.hidden_size, "setting": "taboo",
        "episodes": args.episodes, "rounds": args.rounds, "new_tokens": args.new_tokens,
        "batch": args.batch,
    }
    os.environ.setdefault("COLUMNS", "240")  # 15 columns: rich would cut them at 80
    report("buffer", rows, summary)
    for k, v in summary.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    return summary


if __name__ == "__main__":
    main()
