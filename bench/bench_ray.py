"""Distributed collection with Ray: 1 worker vs K workers (default 2) on this machine, the
same episodes (taboo, greedy, unsteered, default model), and the single-process
``dat collect`` as the baseline without Ray.

CPU-only, each worker asks Ray for half a CPU and uses ``max(1, CPUs // K)`` torch threads:
on a 2-core machine that is 1 worker with 2 threads vs 2 workers with 1 thread each, the
honest comparison (the same cores, split two ways). Each Ray run starts its own local Ray
instance; its workers are warmed up first (model loaded, a 1-episode chunk run), so the
timed part is the steady state: episodes/hour and generated tokens/s of the collection
itself. Start-up (Ray, then loading the model in every worker) is reported separately.
All runs must give the same dialogues (greedy decoding): the bench checks it.

Run: python bench/bench_ray.py [--episodes 32] [--batch-size 16] [--rounds 2] [--workers 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402

from dat.buffer import Buffer  # noqa: E402
from dat.collect import CollectConfig, collect  # noqa: E402


def dialogues(out: Path) -> dict[int, list[str]]:
    return {e["episode_id"]: [t["text"] for t in e["episode"]["turns"]] for e in Buffer(out).episodes()}


def row(name, workers, threads, episodes, seconds, tokens, startup=None):
    return {"run": name, "workers": workers, "threads/worker": threads, "episodes": episodes,
            "seconds": round(seconds, 1), "episodes/hour": 3600 * episodes / seconds,
            "generated tokens/s": tokens / seconds,
            "start-up s": round(startup, 1) if startup is not None else "-"}


def ray_run(k: int, cfg: CollectConfig, root: Path) -> tuple[dict, dict]:
    from dat.distributed import RayConfig, RayPool, collect_ray

    t = time.perf_counter()
    with RayPool(RayConfig(num_workers=k), device="cpu", progress=False) as pool:
        # warm-up: every worker up, then each loads the model and runs one episode of its own
        while len(pool.workers) < k:
            pool.call("info")
        warm = CollectConfig(**{**cfg.__dict__, "out": str(root / f"warm-{k}"), "episodes": k})
        pool.config.chunk_size = 1
        collect_ray(warm, pool=pool)
        pool.config.chunk_size = None
        startup = time.perf_counter() - t
        threads = pool.threads
        t = time.perf_counter()
        s = collect_ray(cfg, pool=pool)
        dt = time.perf_counter() - t
    return row(f"Ray, {k} worker{'s' if k > 1 else ''}", k, threads, s["episodes_run"], dt,
               s["generated_tokens"], startup), s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--episodes", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-baseline", action="store_true", help="skip the single-process run")
    args = ap.parse_args(argv)
    try:
        import ray  # noqa: F401
    except ImportError:
        print('bench_ray: ray is not installed (pip install "dat[ray]"); skipped.')
        return
    import torch

    root = Path(tempfile.mkdtemp(prefix="dat-bench-ray-"))
    base = {"env": "taboo", "episodes": args.episodes, "batch_size": args.batch_size,
            "rounds": args.rounds, "max_new_tokens": args.max_new_tokens, "device": "cpu",
            "progress": False}
    rows, outs = [], {}
    try:
        if not args.no_baseline:
            from dat import SteeredLM

            t = time.perf_counter()
            lm = SteeredLM.from_pretrained("default", device="cpu")
            collect(CollectConfig(out=str(root / "warm-single"), **{**base, "episodes": 1}), lm=lm)
            startup = time.perf_counter() - t
            outs["single"] = root / "single"
            t = time.perf_counter()
            s = collect(CollectConfig(out=str(outs["single"]), **base), lm=lm)
            rows.append(row("single process (no Ray)", 1, torch.get_num_threads(),
                            s["episodes_run"], time.perf_counter() - t, s["generated_tokens"], startup))
            del lm
        for k in sorted({1, args.workers}):
            outs[k] = root / f"ray-{k}"
            r, _ = ray_run(k, CollectConfig(out=str(outs[k]), **base), root)
            rows.append(r)
        ref = dialogues(next(iter(outs.values())))
        same = {str(name): sum(dialogues(o)[i] == ref[i] for i in ref) for name, o in outs.items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)

    one = next(r for r in rows if r["run"] == "Ray, 1 worker")
    many = rows[-1]
    summary = {
        "workers_vs_1_worker_tokens_per_s": many["generated tokens/s"] / one["generated tokens/s"],
        "workers_vs_1_worker_episodes_per_hour": many["episodes/hour"] / one["episodes/hour"],
        "same_dialogues": {k: f"{v}/{len(ref)}" for k, v in same.items()},
        "setting": "taboo", "episodes": args.episodes, "batch_size": args.batch_size,
        "rounds": args.rounds, "new_tokens": args.max_new_tokens, "workers": args.workers,
        "note": "CPU-only: each worker takes num_cpus=0.5 and max(1, CPUs // workers) torch "
                "threads; timed after warm-up (start-up reported separately).",
    }
    if rows[0]["run"].startswith("single"):
        summary["ray_1_worker_vs_single_process_tokens_per_s"] = (
            one["generated tokens/s"] / rows[0]["generated tokens/s"])
    report("ray", rows, summary)
    for k, v in summary.items():
        print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")


if __name__ == "__main__":
    main()
