"""Throughput of `dat serve` at 1, 8 and 32 concurrent clients (closed loop), with continuous
batching (with and without the shared-prefix cache) and with the old static batching side by
side, and the latency of a short request while 32 clients load the server.

Starts a server with the default model on a free loopback port for each batching mode (or
uses ``--url``), then for each concurrency level runs that many client threads, each sending
``--requests`` greedy chat completions one after another (distinct prompts, ``--max-tokens``
new tokens). Reports requests/s, generated tokens/s, latency percentiles and the mean batch
size the server reported. Then, while the largest level loads the server again, one more
client sends short requests (``--probe-tokens`` new tokens) one after another: their p50 and
p95 latency is what a newcomer waits under load. Prints a table per mode and writes JSON
(default ``bench/results/serve.json``).

    python bench/bench_serve.py                         # plain model, all three modes
    python bench/bench_serve.py --batching continuous   # one mode only
    python bench/bench_serve.py --steered               # with a random planner + PCA up-mapping
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

TOPICS = ["the sea", "a busy market", "winter mornings", "old libraries", "trains", "gardening",
          "mountains", "a small bakery", "thunderstorms", "chess", "the moon", "city parks",
          "bicycles", "lighthouses", "rivers", "autumn", "deserts", "museums", "coffee", "owls",
          "jazz", "forests", "bridges", "islands", "kites", "volcanoes", "snow", "festivals",
          "castles", "bees", "clocks", "harbours"]


NO_PREFIX = "-noprefix"  # mode suffix: continuous batching with the prefix cache off


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_random_agent(directory: str) -> str:
    from dat.agent import Agent
    from dat.planner import Planner, UpMapping
    from dat.steer import SteeredLM

    lm = SteeredLM.from_pretrained("default")
    return str(Agent(UpMapping.from_embedding_pca(lm, 64, 2), Planner.for_model(lm)).save(directory))


def start_server(args, planner: str | None, log_path: str, batching: str):
    port = free_port()
    options = {"model": args.model, "planner": planner, "port": port, "max_batch": args.max_batch,
               "max_wait_ms": args.max_wait_ms, "threads": args.threads, "log_level": "warning",
               "batching": batching.removesuffix(NO_PREFIX),
               "prefix_cache": not batching.endswith(NO_PREFIX)}
    code = "import json, sys; from dat.serve import serve_command; serve_command(**json.loads(sys.argv[1]))"
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(options)], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"dat serve exited:\n{Path(log_path).read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("dat serve did not start within 300 s")


def stop_server(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system, all threads) a process has used so far; Linux only."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def run_level(url: str, model: str, clients: int, per_client: int, max_tokens: int,
              server_pid: int | None = None) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(c: int) -> None:
        with httpx.Client(timeout=600) as http:
            barrier.wait()
            for k in range(per_client):
                topic = TOPICS[(c * per_client + k) % len(TOPICS)]
                body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
                        "messages": [{"role": "user", "content": f"Write a detailed paragraph about {topic}."}]}
                t0 = time.perf_counter()
                r = http.post(url + "/v1/chat/completions", json=body)
                r.raise_for_status()
                data = r.json()
                with lock:
                    results.append({"latency": time.perf_counter() - t0,
                                    "tokens": data["usage"]["completion_tokens"],
                                    "batch": data["dat"]["batch_size"]})

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    cpu0 = cpu_seconds(server_pid)
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu1 = cpu_seconds(server_pid)
    cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    lat = sorted(r["latency"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "wall_s": round(wall, 2),
            "requests_per_s": round(len(results) / wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "generated_tokens": tokens, "latency_p50_s": round(statistics.median(lat), 2),
            "latency_p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 2),
            "mean_batch": round(statistics.mean(r["batch"] for r in results), 2),
            "server_cpu_s": None if cpu is None else round(cpu, 2),
            "tokens_per_server_cpu_s": None if not cpu else round(tokens / cpu, 2)}


def probe_under_load(url: str, model: str, clients: int, per_client: int, max_tokens: int,
                     probe_tokens: int) -> dict:
    """Latency of short requests sent one after another while ``clients`` closed-loop clients
    load the server; only probes that finished while the load was running count."""
    stop = threading.Event()
    lat: list[float] = []

    def probe() -> None:
        with httpx.Client(timeout=600) as http:
            k = 0
            while not stop.is_set():
                body = {"model": model, "max_tokens": probe_tokens, "temperature": 0,
                        "messages": [{"role": "user", "content": f"Name a colour ({k})."}]}
                t0 = time.perf_counter()
                http.post(url + "/v1/chat/completions", json=body).raise_for_status()
                if not stop.is_set():
                    lat.append(time.perf_counter() - t0)
                k += 1

    thread = threading.Thread(target=probe)

    def start_probe_once_loaded() -> None:
        time.sleep(1.0)  # let the clients fill the batch first
        thread.start()

    starter = threading.Thread(target=start_probe_once_loaded)
    starter.start()
    load = run_level(url, model, clients, per_client, max_tokens)
    stop.set()
    starter.join()
    thread.join()
    lat.sort()
    q = (lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))], 2)) if lat else (lambda p: None)
    return {"clients": clients, "probe_max_tokens": probe_tokens, "probes": len(lat),
            "probe_latency_p50_s": round(statistics.median(lat), 2) if lat else None,
            "probe_latency_p95_s": q(0.95), "probe_latencies_s": [round(x, 2) for x in lat],
            "load_tokens_per_s": load["tokens_per_s"]}


def bench_mode(args, url: str, pid: int | None, levels, per) -> dict:
    run_level(url, args.served_model, 1, 1, 4)  # warm-up
    rows = []
    for clients, n in zip(levels, per):
        row = run_level(url, args.served_model, clients, n, args.max_tokens, pid)
        rows.append(row)
        print(f"  {clients:>3} clients: {row['requests_per_s']:.3f} req/s, "
              f"{row['tokens_per_s']:.1f} tok/s", flush=True)
    base = rows[0]
    for r in rows:
        r["speedup_tokens"] = round(r["tokens_per_s"] / base["tokens_per_s"], 2)
        r["speedup_requests"] = round(r["requests_per_s"] / base["requests_per_s"], 2)
        if r["tokens_per_server_cpu_s"] and base["tokens_per_server_cpu_s"]:
            r["speedup_tokens_per_cpu_s"] = round(
                r["tokens_per_server_cpu_s"] / base["tokens_per_server_cpu_s"], 2)
    probe = probe_under_load(url, args.served_model, max(levels), args.load_requests,
                             args.max_tokens, args.probe_tokens)
    print(f"  short request ({args.probe_tokens} tokens) under {max(levels)} clients: "
          f"p50 {probe['probe_latency_p50_s']} s, p95 {probe['probe_latency_p95_s']} s "
          f"({probe['probes']} probes)", flush=True)
    health = httpx.get(url + "/health", timeout=10).json()
    return {"levels": rows, "probe": probe, "health_at_end": health}


def cpu_info() -> dict:
    """CPU model and the vector / matrix flags that matter for the kernels (Linux)."""
    info = {"model": platform.processor() or None, "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not info["flags"]:
            info["model"] = value.strip()
        if key.strip() == "flags":
            wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16",
                      "amx_int8", "amx_tile")
            info["flags"] = [f for f in wanted if f in value.split()]
            break
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="benchmark a running server instead of starting one")
    ap.add_argument("--model", default="default")
    ap.add_argument("--served-model", default="dat")
    ap.add_argument("--steered", action="store_true", help="serve a random planner (PCA up-mapping)")
    ap.add_argument("--batching", default="continuous,continuous-noprefix,static",
                    help="modes to start servers with, in this order (ignored with --url); "
                         "continuous-noprefix: continuous with the shared-prefix cache off")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", default="4,2,2", help="requests per client, per level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--probe-tokens", type=int, default=8, help="new tokens of the short request")
    ap.add_argument("--load-requests", type=int, default=3,
                    help="requests per client of the load under which the short request is timed")
    ap.add_argument("--max-batch", type=int, default=64,
                    help="server max_batch: above the largest level, so the short request finds a free row")
    ap.add_argument("--max-wait-ms", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the server (1 avoids oversubscription on a busy CPU)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.json"))
    args = ap.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    per = [int(x) for x in args.requests.split(",")]
    if len(per) == 1:
        per = per * len(levels)
    modes = ["url"] if args.url else [m.strip() for m in args.batching.split(",") if m.strip()]

    results, health = {}, {}
    tmp = tempfile.mkdtemp(prefix="dat-bench-serve-")
    try:
        planner = make_random_agent(os.path.join(tmp, "agent")) if args.steered and not args.url else None
        for mode in modes:
            proc = None
            try:
                if args.url:
                    url = args.url.rstrip("/").removesuffix("/v1")
                else:
                    proc, url = start_server(args, planner, os.path.join(tmp, f"serve-{mode}.log"), mode)
                health = httpx.get(url + "/health", timeout=10).json()
                print(f"{mode} batching (server says: {health.get('batching')}, prefix cache "
                      f"{health.get('prefix_cache')})", flush=True)
                results[mode] = bench_mode(args, url, proc.pid if proc is not None else None, levels, per)
            finally:
                if proc is not None:
                    stop_server(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    head = f"{'clients':>7} {'requests':>8} {'wall s':>7} {'req/s':>7} {'tok/s':>7} {'p50 s':>6} " \
           f"{'p95 s':>6} {'batch':>5} {'x tok/s':>7} {'tok/cpu-s':>9} {'x':>5}"
    for mode, res in results.items():
        print(f"\n{mode} batching")
        print(head)
        for r in res["levels"]:
            print(f"{r['clients']:>7} {r['requests']:>8} {r['wall_s']:>7.1f} {r['requests_per_s']:>7.3f} "
                  f"{r['tokens_per_s']:>7.1f} {r['latency_p50_s']:>6.1f} {r['latency_p95_s']:>6.1f} "
                  f"{r['mean_batch']:>5.1f} {r['speedup_tokens']:>7.2f} "
                  f"{r['tokens_per_server_cpu_s'] or float('nan'):>9.1f} "
                  f"{r.get('speedup_tokens_per_cpu_s') or float('nan'):>5.2f}")
        p = res["probe"]
        print(f"short request ({p['probe_max_tokens']} tokens) while {p['clients']} clients load the "
              f"server: p50 {p['probe_latency_p50_s']} s, p95 {p['probe_latency_p95_s']} s "
              f"over {p['probes']} requests (load: {p['load_tokens_per_s']} tok/s)")
        h = res["health_at_end"]
        if h.get("prompt_tokens"):
            print(f"prompt tokens taken from the prefix cache: {h.get('prefix_cached_tokens', 0)} "
                  f"of {h['prompt_tokens']}")
    top = max(levels)

    def speedup(mode):
        rows = results.get(mode, {}).get("levels", [])
        return next((r["speedup_tokens"] for r in rows if r["clients"] == top), None)

    summary = {f"{m}_{top}_vs_{levels[0]}_tokens_per_s": speedup(m) for m in results}
    def at_top(mode):
        return next(r for r in results[mode]["levels"] if r["clients"] == top)

    for other in ("static", "continuous" + NO_PREFIX):
        if "continuous" in results and other in results:
            summary[f"continuous_vs_{other}_{top}_clients_tokens_per_s"] = round(
                at_top("continuous")["tokens_per_s"] / at_top(other)["tokens_per_s"], 2)
    print("\n" + ", ".join(f"{k}: {v}" for k, v in summary.items()))
    import torch

    out = {"benchmark": "dat serve throughput (closed-loop clients, greedy), continuous (with and "
                        "without the prefix cache) vs static batching",
           "command": "python bench/bench_serve.py " + " ".join(sys.argv[1:]),
           "model": health.get("model"), "planner": "random (PCA up-mapping)" if args.steered else None,
           "served_model": args.served_model, "max_tokens": args.max_tokens,
           "max_batch": health.get("max_batch"), "max_wait_ms": health.get("max_wait_ms"),
           "server_threads": args.threads or torch.get_num_threads(),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu": cpu_info(),
                       "torch": torch.__version__, "cuda": torch.cuda.is_available(),
                       "load_avg_1m_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
           "note": "tok/cpu-s divides by the CPU time the server process used during the level; "
                   "on a CPU shared with other jobs it is the fairer comparison between levels. "
                   "The short request's latency is measured in a separate phase (the largest level "
                   "again, with --load-requests per client), not during the throughput levels.",
           "modes": results, "summary": summary,
           "target": {f"clients_{top}_vs_{levels[0]}_tokens_per_s": ">= 8x (continuous)",
                      "met": (speedup("continuous") or 0) >= 8}}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = path.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(out, indent=2))
    os.replace(tmp_out, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
