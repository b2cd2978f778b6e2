"""Benchmark: one epoch of TD3+BC (dat.td3bc) over synthetic transitions on the CPU.

Default: 30,000 transitions, hidden size 576 (SmolLM2-135M), d' = 64, batch 1024, the
The paper's hyper-parameters, CSV + TensorBoard logging and the final checkpoint/save included.
Target: one epoch in under 5 minutes on 2 CPU cores.

    python bench/bench_td3bc.py [--transitions 30000] [--hidden 576] [--epochs 1] [--device cpu]

Prints a table and writes ``bench/results/td3bc.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dat.td3bc import TD3BCConfig, train
from dat.transitions import TransitionDataset


def synthetic(n: int, hidden: int, action_dim: int, act_norm: float, steps_per_episode: int = 3,
              seed: int = 0) -> TransitionDataset:
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(n, hidden, generator=g) * 2 + 0.5
    next_states = torch.randn(n, hidden, generator=g) * 2 + 0.5
    actions = torch.randn(n, action_dim, generator=g)
    actions = actions * (act_norm / actions.norm(dim=-1, keepdim=True))
    rewards = torch.rand(n, generator=g) * 10
    dones = ((torch.arange(n) % steps_per_episode) == steps_per_episode - 1).float()
    return TransitionDataset(states, actions, rewards, next_states, dones, source="synthetic")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transitions", type=int, default=30_000)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--action-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "td3bc.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t_all = time.perf_counter()
    data = synthetic(args.transitions, args.hidden, args.action_dim, act_norm=1.0)
    t_data = time.perf_counter() - t_all
    work = Path(tempfile.mkdtemp(prefix="bench-td3bc-"))
    try:
        cfg = TD3BCConfig(batch_size=args.batch, epochs=args.epochs, device=args.device,
                          act_norm=1.0, progress=True)
        t0 = time.perf_counter()
        res = train(data, work / "run", cfg)
        t_train = time.perf_counter() - t0  # incl. init, logging, final checkpoint and save
        ckpt_mb = sum(f.stat().st_size for f in (work / "run").rglob("*") if f.is_file()) / 2**20
    finally:
        shutil.rmtree(work, ignore_errors=True)
    t_total = time.perf_counter() - t_all

    row = {
        "transitions": args.transitions, "hidden_size": args.hidden, "action_dim": args.action_dim,
        "batch_size": args.batch, "epochs": args.epochs, "updates": res.steps,
        "actor_updates": res.steps // cfg.policy_freq,
        "loop_seconds": round(res.seconds, 2),
        "updates_per_second": round(res.steps / res.seconds, 2),
        "transitions_per_second": round(res.steps * args.batch / res.seconds, 1),
        "train_seconds": round(t_train, 2), "total_seconds": round(t_total, 2),
        "data_seconds": round(t_data, 2), "output_mb": round(ckpt_mb, 1),
        "target_seconds": 300, "meets_target": t_total < 300,
        "final_critic_loss": res.metrics.get("critic_loss"),
    }
    env = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "machine": platform.machine(),
           "processor": platform.processor() or platform.machine(),
           "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}

    width = max(len(k) for k in row)
    print(f"\nTD3+BC, one run ({env['device']}, {env['threads']} threads, torch {env['torch']})")
    print(f"{'metric':<{width}}  value")
    print(f"{'-' * width}  {'-' * 12}")
    for k, v in row.items():
        print(f"{k:<{width}}  {v}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "td3bc_epoch", "result": row, "environment": env},
                              indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
