"""Run every benchmark in this folder, one after the other (``make bench``).

Each prints its own table and writes ``bench/results/<name>.json``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_inject.py", "bench_rollout.py", "bench_buffer.py", "bench_td3bc.py", "bench_clone.py",
           "bench_serve.py", "bench_ray.py", "bench_baselines.py"]


def main() -> int:
    failed = []
    for name in SCRIPTS:
        print(f"\n=== {name} ===", flush=True)
        if subprocess.run([sys.executable, str(HERE / name)]).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
