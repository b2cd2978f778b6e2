"""`dat quickstart --tiny`: the whole pipeline end to end on the default model, in minutes."""

import json
import subprocess
import sys


def test_quickstart_tiny(tmp_path):
    out = tmp_path / "qs"
    p = subprocess.run([sys.executable, "-m", "dat.cli", "quickstart", "--tiny", "--out", str(out)],
                       capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for f in ("corpus/meta.json", "self-clone/config.json", "self-clone/up_mapping/config.json",
              "explore/meta.json", "dat/config.json", "report/results.json", "report/results.md",
              "report/samples.html", "report/reward.png"):
        assert (out / f).is_file(), f
    results = json.loads((out / "report" / "results.json").read_text())
    text = json.dumps(results)
    for agent in ("unsteered", "self-clone", "DAT"):
        assert agent in text
    assert "report:" in p.stdout and "results.md" in p.stdout
    # running it again resumes every step instead of starting over
    p2 = subprocess.run([sys.executable, "-m", "dat.cli", "quickstart", "--tiny", "--out", str(out)],
                        capture_output=True, text=True, timeout=1500)
    assert p2.returncode == 0, p2.stdout[-3000:] + p2.stderr[-3000:]
