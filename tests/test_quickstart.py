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
              "explore-residual/meta.json", "explore-residual/up_mapping/config.json",
              "dat-residual/config.json", "explore-tokens/meta.json", "dat-tokens/config.json",
              "dat-residual-per-scenario/scenarios.json", "report-per-scenario/results.json",
              "report/results.json", "report/results.md", "report/samples.html", "report/report.html",
              "report/reward.png"):
        assert (out / f).is_file(), f
    results = json.loads((out / "report" / "results.json").read_text())
    assert (results["setting"], results["split"]) == ("openup", "test")  # held-out partners
    assert set(results["agents"]) == {"unsteered", "DAT", "DAT (1 iteration)",
                                      "DAT, prefix tokens (paper)", "self-clone"}
    assert (out / "dat-residual-it2" / "config.json").is_file()  # iterated DAT
    it2 = json.loads((out / "explore-residual-it2" / "meta.json").read_text())
    assert it2["settings"]["explore_directions"] == 4  # held perturbations around the planner
    kinds = {json.loads((out / d / "up_mapping" / "config.json").read_text())["target"]
             for d in ("dat-residual", "dat-tokens", "self-clone")}
    assert kinds == {"residual", "tokens"}
    assert json.loads((out / "self-clone/up_mapping/config.json").read_text())["target"] == "residual"
    per = json.loads((out / "report-per-scenario" / "results.json").read_text())
    assert per["agents"]["DAT per scenario"]["split_check"]["status"] == "per-scenario"
    assert "report:" in p.stdout and "results.md" in p.stdout
    assert p.stdout.rstrip().splitlines()[-1].startswith("report: ")  # ends with report.html's path
    assert "report.html" in p.stdout.rstrip().splitlines()[-1]
    assert "does DAT beat the unsteered agent" in p.stdout
    # running it again resumes every step instead of starting over
    p2 = subprocess.run([sys.executable, "-m", "dat.cli", "quickstart", "--tiny", "--out", str(out)],
                        capture_output=True, text=True, timeout=1500)
    assert p2.returncode == 0, p2.stdout[-3000:] + p2.stderr[-3000:]
