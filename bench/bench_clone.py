"""Benchmark: self-cloning throughput (dat.clone) on the embedded default model.

Builds a small self-clone corpus the way ``dat collect`` does without a planner (the unsteered
default model plays the ``taboo`` game against itself, greedy, no judge needed), or reads one
(``--corpus DIR``, a buffer folder written by ``dat collect``). Then:

1. **Throughput**: for each micro-batch size, a few optimiser steps of ``dat.clone.train``
   (forward and backward through the frozen LM into the action tokens, AdamW on planner +
   up-mapping, epoch checkpoint included; states are computed before the clock starts).
   Reported: *target tokens trained per second* (the utterance tokens whose NLL is
   minimised) and all tokens per second (prompt + action tokens + target).
2. With ``--full``: a complete self-clone on the corpus (held-out episodes, default
   hyper-parameters unless given) with the fidelity report: loss per epoch, NLL ratio of the
   held-out utterances (steered / unsteered) and greedy exact-match share, for the clone and
   for the PCA up-mapping with a random planner.

    python bench/bench_clone.py [--episodes 12] [--batch-sizes 4,8] [--steps 2] [--full]
                                [--save-corpus c.jsonl | --corpus c.jsonl|DIR] [--threads 1]

Prints a table and writes ``bench/results/clone.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, report

from dat import SteeredLM
from dat import clone as dc
from dat import clone_data as cdata
from dat.envs.taboo import Taboo
from dat.episode import Reward
from dat.rollout import Rollout, RolloutConfig, episode_jobs


class _NoJudgeTaboo(Taboo):
    """The taboo setting with a constant reward: a corpus needs the dialogues only."""

    def reward(self, episodes, round_index):
        return [Reward(0.0) for _ in episodes]


def make_corpus(lm, episodes: int, rounds: int, max_new_tokens: int, batch: int, seed: int = 0
                ) -> tuple[list[dict], float]:
    """Unsteered greedy taboo dialogues as dialogue records (as in a `dat collect` corpus)."""
    setting = _NoJudgeTaboo(rounds=rounds)
    cfg = RolloutConfig(batch_size=batch, rounds=rounds, max_new_tokens=max_new_tokens, seed=seed)
    t = time.perf_counter()
    done = Rollout(lm, setting, config=cfg).run(episode_jobs(setting, episodes, "train", seed))
    seconds = time.perf_counter() - t
    records = [{"episode_id": r.episode.episode_id, "scenario_id": r.episode.scenario.id,
                "episode": dataclasses.asdict(r.episode)} for r in done]
    return records, seconds


def read_corpus(path: str) -> list[cdata.CloneExample]:
    """A buffer folder from `dat collect`, or a JSON-lines file of dialogue records."""
    p = Path(path)
    if p.is_dir():
        return cdata.load_corpus(p)[0]
    with p.open(encoding="utf-8") as f:
        return cdata.corpus_examples([json.loads(line) for line in f if line.strip()], str(p))


def prompt_tokens(lm, examples, n_tokens: int) -> int:
    return sum(len(lm.encode(e.prompt)) + n_tokens for e in examples)


def fidelity_table(fid: dict, res) -> None:
    from rich.console import Console
    from rich.table import Table

    losses = " -> ".join(f"{x:.3f}" for x in res.epoch_losses)
    table = Table(title=f"self-clone fidelity on held-out dialogues (train loss by epoch: "
                        f"{losses})")
    for c in ("agent", "NLL unsteered", "NLL steered", "ratio", "<= 1.05", "exact match",
              "held-out utterances"):
        table.add_column(c)
    for name in ("clone", "pca_random_planner"):
        f = fid[name]
        table.add_row(name, f"{f['nll_unsteered']:.4f}", f"{f['nll_steered']:.4f}",
                      f"{f['nll_ratio']:.4f}", str(f["nll_within_5pct"]),
                      f"{round(f['exact_match'] * f['generated'])}/{f['generated']}",
                      str(f["examples"]))
    Console().print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=None,
                   help="a buffer folder from `dat collect`, or a .jsonl of dialogue records "
                        "(--save-corpus); default: collect one now")
    p.add_argument("--save-corpus", default=None, help="write the collected records (.jsonl)")
    p.add_argument("--episodes", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-sizes", default="4,8")
    p.add_argument("--steps", type=int, default=2, help="optimiser steps timed per batch size")
    p.add_argument("--action-dim", type=int, default=64)
    p.add_argument("--full", action="store_true", help="also a complete clone + fidelity report")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=None, help="planner lr (default: CloneConfig's)")
    p.add_argument("--up-lr", type=float, default=None, help="up-mapping lr")
    p.add_argument("--batch", type=int, default=8, help="micro-batch of the --full run")
    p.add_argument("--eval-fraction", type=float, default=0.25)
    p.add_argument("--fidelity-generate", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="clone", help="results name (bench/results/<out>.json)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t = time.perf_counter()
    lm = SteeredLM.from_pretrained("default", device=args.device)
    load_s = time.perf_counter() - t
    if args.corpus:
        examples = read_corpus(args.corpus)
        corpus_s, source = 0.0, args.corpus
    else:
        records, corpus_s = make_corpus(lm, args.episodes, args.rounds, args.max_new_tokens,
                                        batch=args.episodes)
        if args.save_corpus:
            Path(args.save_corpus).write_text(
                "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        examples = cdata.corpus_examples(records, source="bench corpus")
        source = f"taboo, {args.episodes} unsteered episodes x {args.rounds} rounds"
    tokens = cdata.target_tokens(lm, examples)
    print(f"corpus: {len(examples)} utterances, mean {sum(tokens) / len(tokens):.1f} target "
          f"tokens, mean prompt {prompt_tokens(lm, examples, 0) / len(examples):.0f} tokens "
          f"({corpus_s:.0f} s to collect)", flush=True)

    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-clone-"))
    for bs in [int(x) for x in args.batch_sizes.split(",")]:
        n = min(len(examples), bs * args.steps)
        sub = examples[:n]
        cfg = dc.CloneConfig(action_dim=args.action_dim, epochs=1, batch_size=bs,
                             fidelity=False, progress=False, resume=False)
        res = dc.train(lm, sub, work / f"bs{bs}", cfg, source=source)
        all_tokens = sum(cdata.target_tokens(lm, sub)) + prompt_tokens(lm, sub, cfg.n_tokens)
        rows.append({"batch": bs, "steps": res.steps, "examples": n,
                     "target_tokens": res.target_tokens, "seconds": round(res.seconds, 2),
                     "target_tok_per_s": round(res.tokens_per_second, 2),
                     "all_tok_per_s": round(all_tokens / res.seconds, 1)})
        print(rows[-1], flush=True)

    extra = {"model": lm.name, "device": str(lm.device), "corpus": source,
             "utterances": len(examples), "mean_target_tokens": sum(tokens) / len(tokens),
             "load_seconds": round(load_s, 1), "corpus_seconds": round(corpus_s, 1)}
    if args.full:
        train_ex, eval_ex = cdata.split_examples(examples, args.eval_fraction, seed=0)
        cfg = dc.CloneConfig(action_dim=args.action_dim, epochs=args.epochs,
                             batch_size=args.batch, fidelity_generate=args.fidelity_generate,
                             fidelity_max_new_tokens=args.max_new_tokens, resume=False)
        if args.lr is not None:
            cfg.lr = args.lr
        if args.up_lr is not None:
            cfg.up_mapping_lr = args.up_lr
        t = time.perf_counter()
        res = dc.train(lm, train_ex, work / "full", cfg, eval_examples=eval_ex, source=source)
        fid = res.fidelity
        keep = ("nll_unsteered", "nll_steered", "nll_ratio", "nll_within_5pct", "exact_match",
                "unsteered_matches_corpus", "steered_matches_corpus", "generated")
        extra["full"] = {
            "train_examples": res.n_train, "eval_examples": res.n_eval,
            "first_step_loss": res.first_step_loss,
            "epoch_losses": res.epoch_losses, "train_seconds": round(res.seconds, 1),
            "total_seconds": round(time.perf_counter() - t, 1),
            "target_tok_per_s": round(res.tokens_per_second or 0.0, 2),
            "fidelity": {k: {x: fid[k][x] for x in keep} for k in ("clone", "pca_random_planner")},
            "config": dataclasses.asdict(cfg),
        }
        print(json.dumps(extra["full"], indent=2, default=str), flush=True)
        fidelity_table(fid, res)
    extra["machine"] = machine()
    path = report(args.out, rows, extra)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
