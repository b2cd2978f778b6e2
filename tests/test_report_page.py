"""report.html from a tiny evaluation: it parses, embeds every plot, loads nothing from the
network, escapes user text; rendered by headless Chromium where it is installed."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess

import html5lib
import pytest

from dat.agentspec import AgentSpec
from dat.envs.base import Setting
from dat.episode import Opening, Reward, Scenario
from dat.evaluate import evaluate
from dat.planner import UpMapping
from dat.rollout import RolloutConfig

EVIL = "<script>alert('owned')</script>"


class _Hostile(Setting):
    """Two scenarios whose ids and opener are markup; per-dimension rewards at the end."""

    name = "hostile"
    rounds = 2
    reward_timing = "end"

    def __init__(self):
        self.all_scenarios = [Scenario(f"s{k}-{EVIL}", {"split": "train", "note": EVIL})
                              for k in range(2)]

    def system_prompts(self, scenario):
        return f"Steer {EVIL}", "You are the partner."

    def opening(self, scenario):
        return Opening("partner", f"Hello {EVIL}")

    def reward(self, episodes, round_index):
        return [Reward(float(ep.episode_id % 3), {"steered": {"goal": 4.0, "overall": 1.0},
                                                   "partner": {"goal": 6.0, "overall": 2.0}})
                for ep in episodes]


@pytest.fixture(scope="module")
def report(tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    agents = {"unsteered": None, "random": AgentSpec.random(UpMapping.learned(tiny_lm, action_dim=4))}
    evaluate(tiny_lm, _Hostile(), agents, episodes=4, split="train",
             config=RolloutConfig(max_new_tokens=6, batch_size=4), out_dir=out, n_bootstrap=200,
             samples=4)
    return out, (out / "report.html").read_text(encoding="utf-8")


def test_report_parses_as_valid_html(report):
    _, page = report
    parser = html5lib.HTMLParser(strict=True)  # raises on any parse error
    doc = parser.parse(page)
    assert doc.find(".//{http://www.w3.org/1999/xhtml}title") is not None


def test_report_embeds_every_plot(report):
    out, page = report
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} >= {"reward.png", "dimensions.png"}
    uris = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert sorted(base64.b64decode(u) for u in uris) == sorted(p.read_bytes() for p in pngs)


def test_report_has_no_external_url(report):
    _, page = report
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", page, re.IGNORECASE)
    assert not re.search(r"<(?:link|iframe|object|embed)\b", page)
    assert not re.search(r"<script[^>]*\bsrc=", page)


def test_report_escapes_user_text(report):
    _, page = report
    assert page.count("<script>") == 1  # only the page's own inline sorter
    assert "&lt;script&gt;alert(&#x27;owned&#x27;)&lt;/script&gt;" in page
    for section in ("Results", "Judge dimensions: steered agent", "Plots", "Per scenario",
                    "Sample dialogues", "How this was made"):
        assert f"<h2>{section}</h2>" in page


def test_report_renders_in_headless_chromium(report, tmp_path):
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome")
                    if shutil.which(b)), None)
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium): the page is not "
                    "rendered here")
    from PIL import Image, ImageStat

    out, _ = report
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                    "--window-size=1280,1600", f"--screenshot={shot}",
                    (out / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    image = Image.open(shot).convert("L")
    assert image.size == (1280, 1600)
    assert ImageStat.Stat(image).stddev[0] > 10  # text, tables and plots: not a blank page
