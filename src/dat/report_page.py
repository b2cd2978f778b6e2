"""Every report file of an evaluation, and ``report.html``: one self-contained page.

The page holds the results table, the plots (PNG data URIs), ASR or judge-dimension bars, a
sortable per-scenario table, the sample dialogues and the run's command, settings and
versions. It loads nothing from the network, and every piece of user text is escaped.
"""

from __future__ import annotations

import base64
import json
import platform
import shlex
import sys
from collections import defaultdict
from pathlib import Path

from dat.fileio import atomic_write_text
from dat.report import (
    SAMPLES_CSS,
    escape_html,
    format_markdown,
    format_samples_html,
    interval_text,
    main_table,
    mean_se_text,
    percent_text,
    plot_dimensions,
    plot_reward,
    plot_reward_by_round,
    samples_table,
)

PAGE_CSS = SAMPLES_CSS + """
h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table.results td,table.results th,table.scen td,table.scen th{text-align:right}
table.results td:first-child,table.scen td:first-child{text-align:left}
table.scen th{cursor:pointer;user-select:none}
.bar{display:inline-block;height:.8em;background:#4C72B0;vertical-align:middle;margin-right:.4em}
.bar.asr{background:#C44E52}
img{max-width:100%;height:auto;border:1px solid #eee}
code,pre{background:#f6f6f6;padding:.1em .3em;white-space:pre-wrap;word-break:break-all}
"""

# Sorts a table by the clicked column (numbers numerically, dashes last). Inline: no network.
SORT_SCRIPT = """
document.querySelectorAll('table.scen th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var down = th.dataset.dir !== 'down';
    th.dataset.dir = down ? 'down' : 'up';
    function key(r) {
      var t = r.cells[col].textContent.trim(), v = parseFloat(t);
      return isNaN(v) ? t : v;
    }
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (typeof x !== typeof y) { return typeof x === 'number' ? -1 : 1; }
      return (x < y ? -1 : x > y ? 1 : 0) * (down ? -1 : 1);
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def _table(head: list[str], rows: list[list[str]], css: str) -> str:
    """An HTML table of text cells (escaped here)."""
    th = "".join(f"<th>{escape_html(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{escape_html(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table class='{css}'><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _bar(share: float, css: str = "") -> str:
    width = max(0.0, min(1.0, share)) * 12
    return f"<span class='bar {css}' style='width:{width:.2f}em'></span>"


def _embedded_plots(results: dict, out_dir: Path) -> str:
    """Each PNG of the report as an ``<img>`` with a data URI."""
    parts = []
    for name in results.get("files", []):
        path = out_dir / name
        if name.endswith(".png") and path.is_file():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            parts.append(f"<figure><img alt='{escape_html(name)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption class='meta'>{escape_html(name)}</figcaption></figure>")
    return "".join(parts)


def _asr_bars(results: dict) -> str:
    """Red teaming: attack success rate per agent as bars (empty for other settings)."""
    rows = []
    for name, a in results["agents"].items():
        asr = a.get("asr")
        if asr:
            text = f"{percent_text(asr['rate'])} {interval_text(asr.get('ci'), pct=True)}"
            rows.append(f"<tr><td>{escape_html(name)}</td><td>{_bar(asr['rate'], 'asr')}"
                        f"{escape_html(text)}</td></tr>")
    if not rows:
        return ""
    return ("<h2>Attack success rate</h2><table class='results'><thead><tr><th>agent</th>"
            f"<th>ASR [CI]</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _dimension_bars(results: dict) -> str:
    """Social: each judge dimension's mean per agent, a bar scaled to the dimension's range."""
    from dat.judges import SOTOPIA_DIMENSIONS

    n = len(SOTOPIA_DIMENSIONS)
    overall = tuple(sum(r[k] for r in SOTOPIA_DIMENSIONS.values()) / n for k in (0, 1))
    ranges = {**SOTOPIA_DIMENSIONS, "overall": overall}
    parts = []
    for side in ("steered", "partner"):
        per_agent = {n: (a.get("dimensions") or {}).get(side) or {}
                     for n, a in results["agents"].items()}
        dims = list(dict.fromkeys(d for v in per_agent.values() for d in v))
        if not dims:
            continue
        head = "".join(f"<th>{escape_html(n)}</th>" for n in per_agent)
        rows = []
        for d in dims:
            lo, hi = ranges.get(d, (0.0, 1.0))
            cells = []
            for stats in per_agent.values():
                s = stats.get(d)
                if not s or s.get("mean") is None:
                    cells.append("<td>–</td>")
                    continue
                cells.append(f"<td>{_bar((s['mean'] - lo) / (hi - lo))}"
                             f"{escape_html(mean_se_text(s, 2))}</td>")
            rows.append(f"<tr><td>{escape_html(d)} ({lo:.3g}..{hi:.3g})</td>{''.join(cells)}</tr>")
        parts.append(f"<h2>Judge dimensions: {escape_html(side)} agent</h2><table class='results'>"
                     f"<thead><tr><th>dimension</th>{head}</tr></thead>"
                     f"<tbody>{''.join(rows)}</tbody></table>")
    return "".join(parts)


def _per_scenario_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Mean episode reward per scenario (rows) and agent (columns)."""
    names = list(results["agents"])
    means: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    episodes: dict[str, int] = defaultdict(int)
    for name in names:
        for row in results["agents"][name].get("per_episode", []):
            if name == names[0]:  # every agent runs the same episodes
                episodes[row["scenario_id"]] += 1
            if not row.get("judge_failed") and row.get("total_reward") is not None:
                means[row["scenario_id"]][name].append(row["total_reward"])
    order = list(dict.fromkeys(results.get("scenario_ids", [])))
    order += [s for s in means if s not in order]
    rows = []
    for sid in order:
        cells = [sid, str(episodes[sid])]
        for n in names:
            vals = means[sid][n]
            cells.append(f"{sum(vals) / len(vals):.3f}" if vals else "–")
        rows.append(cells)
    return ["scenario", "episodes"] + names, rows


def _cli_command() -> str | None:
    """The ``dat ...`` command line of this process, None when dat runs as a library."""
    exe = Path(sys.argv[0]).name if sys.argv else ""
    if exe != "dat" and not sys.argv[0].endswith(("dat/cli.py", "dat/__main__.py")):
        return None
    return " ".join(shlex.quote(a) for a in ["dat", *sys.argv[1:]])


def _run_details(results: dict, command: str | None) -> str:
    """The command, the settings and the versions that produced the results."""
    import torch
    import transformers

    from dat.version import __version__

    cfg = results.get("rollout", {})
    items = [("command", command or "(library call)"), ("setting", results.get("setting")),
             ("split", results.get("split")), ("model", results.get("model")),
             ("partner", results.get("partner")), ("episodes per agent", results.get("episodes")),
             ("seed", results.get("seed")), ("baseline", results.get("baseline")),
             ("bootstrap resamples", results.get("n_bootstrap")),
             ("rollout", ", ".join(f"{k}={v}" for k, v in cfg.items())),
             ("versions", (f"dat {__version__}, python {platform.python_version()}, torch "
                           f"{torch.__version__}, transformers {transformers.__version__}, "
                           f"{platform.platform()}"))]
    rows = "".join(f"<tr><th>{escape_html(k)}</th><td><code>{escape_html(v)}</code></td></tr>"
                   for k, v in items)
    agents = "".join(f"<tr><th>{escape_html(n)}</th><td><code>{escape_html(json.dumps(a.get('spec')))}"
                     "</code></td></tr>" for n, a in results["agents"].items())
    return f"<table class='meta'>{rows}{agents}</table>"


def format_report_page(results: dict, runs: dict, out_dir: str | Path, samples: int = 8,
                       command: str | None = None) -> str:
    """``report.html`` as a string (the plots are read from ``out_dir``)."""
    out = Path(out_dir)
    level = round(100 * results.get("ci_level", 0.95))
    title = f"dat evaluation: {results['setting']} ({results['split']} split)"
    ids, dialogues = samples_table(results, runs, samples)
    scen_head, scen_rows = _per_scenario_rows(results)
    summary = (f"{results['episodes']} episodes per agent, paired (same scenarios, episode ids "
               f"and seed {results['seed']}). Reward: mean ± SE with a {level} % bootstrap CI; "
               f"Δ: paired difference to {results.get('baseline')} with its CI.")
    return "\n".join([
        "<!DOCTYPE html>", "<html lang='en'>",
        (f"<head><meta charset='utf-8'><title>{escape_html(title)}</title>"
         f"<style>{PAGE_CSS}</style></head>"),
        f"<body><h1>{escape_html(title)}</h1><p class='meta'>{escape_html(summary)}</p>",
        "<h2>Results</h2>", _table(*main_table(results), "results"),
        _asr_bars(results), _dimension_bars(results),
        "<h2>Plots</h2>", _embedded_plots(results, out) or "<p class='meta'>(no plots)</p>",
        "<h2>Per scenario</h2><p class='meta'>Mean episode reward; click a column to sort.</p>",
        _table(scen_head, scen_rows, "scen"),
        (f"<h2>Sample dialogues</h2><p class='meta'>{len(ids)} of {results['episodes']} "
         f"episodes.</p>"), dialogues,
        "<h2>How this was made</h2>", _run_details(results, command),
        f"<script>{SORT_SCRIPT}</script>", "</body></html>", ""])


def write_report(results: dict, runs: dict, out_dir: str | Path, samples: int = 8,
                 plots: bool = True) -> list[str]:
    """Write ``results.md``, the plots, ``samples.html`` and ``report.html`` into ``out_dir``
    (atomically). Returns the file names written, ``results.json`` (written by the caller)
    included."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = ["results.json", "results.md", "report.html", "samples.html"]
    if plots:
        plot_reward(results, out / "reward.png")
        files.append("reward.png")
        if any(a.get("reward_by_round") for a in results["agents"].values()):
            plot_reward_by_round(results, out / "reward_by_round.png")
            files.append("reward_by_round.png")
        if any(a.get("dimensions") for a in results["agents"].values()):
            plot_dimensions(results, out / "dimensions.png")
            files.append("dimensions.png")
    files.append("episodes/")
    results = {**results, "files": files}
    atomic_write_text(out / "samples.html", format_samples_html(results, runs, samples))
    atomic_write_text(out / "results.md", format_markdown(results))
    atomic_write_text(out / "report.html",
                      format_report_page(results, runs, out, samples, _cli_command()))
    return files
