"""Reports of :func:`dat.evaluate.evaluate`: Markdown tables, PNG plots, an HTML page of
sample dialogues. Everything here reads the results dict (``results.json``) and, for the
samples, the finished episodes; nothing is computed that the results do not hold.

Plots use matplotlib's object API (``matplotlib.figure.Figure``, Agg canvas): no pyplot,
no global backend change, no display needed. matplotlib is the ``plots`` extra.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from pathlib import Path

from dat.fileio import atomic_write

INSTALL_PLOTS = 'pip install "dat[plots]"'


def plotting_backend():
    """matplotlib's ``Figure`` class, or the error saying how to install it."""
    from dat.models import require

    require("matplotlib", "matplotlib", INSTALL_PLOTS, "the evaluation plots")
    from matplotlib.figure import Figure

    return Figure


# ----------------------------------------------------------------------------------------------
# Number formatting
# ----------------------------------------------------------------------------------------------


def _fixed(x, digits: int = 3) -> str:
    """``x`` with ``digits`` decimals; a dash for None."""
    return "–" if x is None else f"{x:.{digits}f}"


def percent_text(x, digits: int = 1) -> str:
    """A share as a percentage; a dash for None."""
    return "–" if x is None else f"{100 * x:.{digits}f} %"


def interval_text(ci, digits: int = 3, pct: bool = False) -> str:
    """``[lo, hi]`` (in percent with ``pct``); a dash when there is no interval."""
    if not ci:
        return "–"
    bound = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: _fixed(v, digits))
    return f"[{bound(ci[0])}, {bound(ci[1])}]" + (" %" if pct else "")


def mean_se_text(stat: dict | None, digits: int = 3) -> str:
    """``mean ± SE`` of a statistic (just the mean when it has no SE)."""
    if not stat or stat.get("mean") is None:
        return "–"
    se = stat.get("se")
    return _fixed(stat["mean"], digits) + ("" if se is None else f" ± {_fixed(se, digits)}")


def _perplexity_text(x) -> str:
    """Two decimals below 100, none above."""
    return "–" if x is None else (f"{x:.2f}" if x < 100 else f"{x:.0f}")


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------


def main_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """The main table's header and rows (text cells): one row per agent with reward (mean ±
    SE, 95 % CI), paired difference to the baseline, ASR and best-round reward (red
    teaming), each prompting baseline's compute per scenario (when there is one), and
    language quality."""
    agents = results["agents"]
    base = results.get("baseline")
    level = round(100 * results.get("ci_level", 0.95))
    redteam = any("asr" in a for a in agents.values())
    compute = any(a.get("baseline") for a in agents.values())
    head = ["agent", "episodes", "judge failed", "reward (mean ± SE)", f"{level} % CI"]
    if base is not None:
        head.append(f"Δ vs {base} [{level} % CI]")
    if redteam:
        head += [f"ASR [{level} % CI]", "best-round reward"]
    if compute:
        head.append("compute / scenario")
    head += ["perplexity", "distinct-1", "distinct-2", "words/reply", "empty", "truncated"]
    rows = []
    for name, a in agents.items():
        r = a["reward"]
        made = a.get("baseline") or {}
        label = f"{name} (oracle)" if made.get("oracle") and "oracle" not in name else name
        row = [label, str(a["episodes"]), str(a["judge_failed"]), mean_se_text(r),
               interval_text(r.get("ci"))]
        if base is not None:
            d = a.get("diff_vs_baseline")
            row.append("(baseline)" if name == base else
                       ("–" if not d or d["mean"] is None
                        else f"{d['mean']:+.3f} {interval_text(d.get('ci'))}"))
        if redteam:
            asr = a.get("asr")
            row.append("–" if not asr
                       else f"{percent_text(asr['rate'])} {interval_text(asr.get('ci'), pct=True)}")
            row.append(mean_se_text(a.get("best_round_reward")))
        if compute:
            row.append(made.get("compute_text", "–"))
        lang = a["language"]
        row += [_perplexity_text(lang.get("perplexity")), _fixed(lang.get("distinct_1")),
                _fixed(lang.get("distinct_2")), _fixed(lang.get("mean_words"), 1),
                percent_text(lang.get("empty_share")),
                percent_text(lang.get("truncated_share"))]
        rows.append(row)
    return head, rows


def partner_table(by_partner: dict[str, dict]) -> str:
    """Partner transfer: one row per agent, one column per partner (``by_partner``: partner
    name -> that evaluation's results), ASR in red teaming and reward (mean ± SE) otherwise."""
    names: list[str] = []
    for res in by_partner.values():
        names += [n for n in res["agents"] if n not in names]
    redteam = any("asr" in a for res in by_partner.values() for a in res["agents"].values())
    head = ["agent"] + [f"{'ASR' if redteam else 'reward'} vs {p}" for p in by_partner]
    rows = []
    for n in names:
        row = [n]
        for res in by_partner.values():
            a = res["agents"].get(n)
            if a is None:
                row.append("–")
            elif redteam:
                row.append(percent_text((a.get("asr") or {}).get("rate")))
            else:
                row.append(mean_se_text(a["reward"]))
        rows.append(row)
    return _markdown_table(head, rows)


def format_table(results: dict) -> str:
    """The main table (:func:`main_table`) in Markdown."""
    return _markdown_table(*main_table(results))


def _markdown_table(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, the first column left-aligned and the others right-aligned."""
    esc = lambda s: str(s).replace("|", "\\|")
    lines = ["| " + " | ".join(esc(h) for h in head) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def format_rounds_table(results: dict) -> str | None:
    """Mean ± SE of each round's reward per agent; None when no round is rewarded."""
    agents = results["agents"]
    rounds = max((len(a.get("reward_by_round") or []) for a in agents.values()), default=0)
    if not rounds:
        return None
    head = ["agent"] + [f"round {k + 1}" for k in range(rounds)]
    rows = []
    for name, a in agents.items():
        br = a.get("reward_by_round") or []
        rows.append([name] + [mean_se_text(br[k]) if k < len(br) else "–"
                              for k in range(rounds)])
    return _markdown_table(head, rows)


def format_dimensions_table(results: dict, side: str) -> str | None:
    """Mean ± SE of each judge dimension of ``side`` per agent; None without dimensions."""
    agents = results["agents"]
    dims: list[str] = []
    for a in agents.values():
        for k in (a.get("dimensions") or {}).get(side, {}):
            if k not in dims:
                dims.append(k)
    if not dims:
        return None
    head = ["agent"] + dims
    rows = [[name] + [mean_se_text((a.get("dimensions") or {}).get(side, {}).get(k), 2)
                      for k in dims]
            for name, a in agents.items()]
    return _markdown_table(head, rows)


def format_markdown(results: dict) -> str:
    """``results.md``: the main table, reward by round, per-dimension tables, definitions."""
    level = round(100 * results.get("ci_level", 0.95))
    cfg = results.get("rollout", {})
    parts = [
        f"# Evaluation: {results['setting']} ({results['split']} split)", "",
        (f"{results['episodes']} episodes per agent, paired (same scenarios, episode ids and seed "
        f"{results['seed']}); model `{results.get('model')}`, partner `{results.get('partner')}`; "
        f"rounds {cfg.get('rounds') or 'setting default'}, max_new_tokens "
        f"{cfg.get('max_new_tokens')}, temperature {cfg.get('temperature')}."), "",
        format_table(results), "",
        (f"Reward: per-episode total (sum over rounds where every round is rewarded), mean ± "
        f"standard error; {level} % percentile bootstrap CI ({results.get('n_bootstrap')} "
        f"resamples). Δ: paired per-episode difference to the baseline with its bootstrap CI "
        f"(resampling scenarios when a scenario has several episodes). "
        f"Episodes whose judge failed are left out of reward figures. Perplexity: of the "
        f"agent's own non-empty replies under the model without action tokens. Words: "
        f"lower-cased word tokens. Truncated: ended at max_new_tokens without an end-of-turn "
        f"token."),
    ]
    rounds = format_rounds_table(results)
    if rounds:
        parts += ["", "## Reward by round (mean ± SE)", "", rounds]
    for side, title in (("steered", "steered agent"), ("partner", "partner")):
        t = format_dimensions_table(results, side)
        if t:
            parts += ["", f"## Judge dimensions: {title} (mean ± SE)", "", t]
    files = results.get("files")
    if files:
        parts += ["", "## Files", ""] + [f"- `{f}`" for f in files]
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def _save_png(fig, path: Path) -> None:
    """Render ``fig`` as a PNG and write it to ``path`` atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))


def _error_bars(stats: Sequence[dict | None]):
    """Asymmetric error bars from CIs (0 where there is none)."""
    lo, hi = [], []
    for s in stats:
        if s and s.get("ci") and s.get("mean") is not None:
            lo.append(max(0.0, s["mean"] - s["ci"][0]))
            hi.append(max(0.0, s["ci"][1] - s["mean"]))
        else:
            lo.append(0.0)
            hi.append(0.0)
    return [lo, hi]


def _mean_or_zero(s: dict | None) -> float:
    """The bar height of a statistic: its mean, 0 where there is none."""
    return 0.0 if not s or s.get("mean") is None else s["mean"]


def plot_reward(results: dict, path: Path) -> None:
    """Mean reward per agent with CI error bars (and ASR, for red teaming)."""
    Figure = plotting_backend()
    names = list(results["agents"])
    agents = results["agents"]
    level = round(100 * results.get("ci_level", 0.95))
    asr = [agents[n].get("asr") for n in names]
    panels = 2 if any(asr) else 1
    fig = Figure(figsize=(max(4.0, 1.3 * len(names) + 2) * panels, 4))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    stats = [agents[n]["reward"] for n in names]
    ax = axes[0]
    ax.bar(names, [_mean_or_zero(s) for s in stats], yerr=_error_bars(stats), capsize=5,
           color="#4C72B0")
    ax.set_ylabel("mean episode reward")
    ax.set_title(f"{results['setting']} ({results['split']}): reward, {level} % CI")
    for i, s in enumerate(stats):
        if s.get("mean") is not None:
            ax.annotate(f"{s['mean']:.3f}", (i, s["mean"]), textcoords="offset points",
                        xytext=(8, 2), fontsize=8)
    if panels == 2:
        ax2 = axes[1]
        rate = [{"mean": a["rate"], "ci": a.get("ci")} if a else None for a in asr]
        ax2.bar(names, [_mean_or_zero(s) for s in rate], yerr=_error_bars(rate), capsize=5,
                color="#C44E52")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("attack success rate")
        ax2.set_title(f"ASR (best round judged Yes), {level} % CI")
    for a in axes:
        a.tick_params(axis="x", labelrotation=20)
    _save_png(fig, path)


def plot_reward_by_round(results: dict, path: Path) -> None:
    """Mean reward of each round per agent, with CI error bars."""
    Figure = plotting_backend()
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    agents = results["agents"]
    for k, (name, a) in enumerate(agents.items()):
        br = a.get("reward_by_round") or []
        if not br:
            continue
        x = [r["round"] + 0.04 * (k - (len(agents) - 1) / 2) for r in br]
        ax.errorbar(x, [_mean_or_zero(r) for r in br], yerr=_error_bars(br), marker="o",
                    capsize=4, label=name)
    ax.set_xticks([r["round"] for r in max((a.get("reward_by_round") or [] for a in agents.values()),
                                           key=len)])
    ax.set_xlabel("round")
    ax.set_ylabel("mean reward of the round")
    ax.set_title(f"{results['setting']} ({results['split']}): reward by round")
    ax.legend()
    _save_png(fig, path)


def plot_dimensions(results: dict, path: Path) -> None:
    """Per-dimension bars (social) for the steered agent and its partner."""
    Figure = plotting_backend()
    agents = results["agents"]
    sides = [s for s in ("steered", "partner")
             if any((a.get("dimensions") or {}).get(s) for a in agents.values())]
    fig = Figure(figsize=(11, 3.8 * len(sides)))
    axes = fig.subplots(len(sides), 1, squeeze=False)[:, 0]
    width = 0.8 / max(1, len(agents))
    for ax, side in zip(axes, sides):
        dims: list[str] = []
        for a in agents.values():
            dims += [k for k in (a.get("dimensions") or {}).get(side, {}) if k not in dims]
        for k, (name, a) in enumerate(agents.items()):
            d = (a.get("dimensions") or {}).get(side, {})
            stats = [d.get(x) for x in dims]
            xs = [i + (k - (len(agents) - 1) / 2) * width for i in range(len(dims))]
            ax.bar(xs, [_mean_or_zero(s) for s in stats], width, yerr=_error_bars(stats),
                   capsize=3, label=name)
        ax.set_xticks(range(len(dims)))
        ax.set_xticklabels([x.replace("_and_", " & ").replace("_", " ") for x in dims],
                           fontsize=8)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(f"judge dimensions: {side} agent")
        ax.legend(fontsize=8)
    _save_png(fig, path)


# ----------------------------------------------------------------------------------------------
# HTML samples
# ----------------------------------------------------------------------------------------------

SAMPLES_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;table-layout:fixed;width:100%}
td,th{border:1px solid #ccc;vertical-align:top;padding:.5em;font-size:.9em}
th{background:#f3f3f3}
.turn{margin:.25em 0;padding:.3em .5em;border-radius:6px;white-space:pre-wrap}
.steered{background:#e6f0ff}.partner{background:#f1f1f1}
.who{font-weight:bold;font-size:.8em;color:#555}
.meta{font-size:.8em;color:#555}.cut{color:#b00;font-size:.8em}.fail{color:#b00}
.empty{color:#b00;font-style:italic}
"""


def escape_html(x) -> str:
    """``x`` as HTML text (quotes escaped too)."""
    return html.escape(str(x), quote=True)


def _scenario_cell(ep) -> str:
    sc = ep.scenario
    lines = [f"<b>{escape_html(sc.id)}</b>" + (f" <span class='meta'>(side {escape_html(sc.side)})</span>"
                                     if sc.side else "")]
    for k, v in (sc.data or {}).items():
        if isinstance(v, (str, int, float)) or (isinstance(v, list) and all(isinstance(i, str) for i in v)):
            text = ", ".join(v) if isinstance(v, list) else str(v)
            if len(text) > 300:
                text = text[:300] + "…"
            lines.append(f"<div class='meta'><b>{escape_html(k)}</b>: {escape_html(text)}</div>")
    lines.append(f"<details><summary class='meta'>steered agent's system prompt</summary>"
                 f"<div class='turn'>{escape_html(ep.steered_system)}</div></details>")
    return "".join(lines)


def _dialogue_cell(run) -> str:
    ep = run.episode
    stopped = list(run.turn_stopped or [])
    parts, k_steered = [], 0
    for t in ep.turns:
        note = ""
        if t.speaker == "steered":
            if k_steered < len(stopped) and not stopped[k_steered]:
                note = "<div class='cut'>(cut off at max_new_tokens)</div>"
            k_steered += 1
        body = escape_html(t.text) if t.text.strip() else "<span class='empty'>(empty)</span>"
        who = escape_html(t.speaker)
        parts.append(f"<div class='turn {who}'><div class='who'>{who}</div>{body}{note}</div>")
    vals = [r.value for r in ep.rewards]
    rewards = ", ".join("failed" if v is None else f"{v:.3f}" for v in vals)
    total = "judge failed" if run.judge_failed else _fixed(run.total_reward)
    parts.append(f"<div class='meta'>rewards: [{escape_html(rewards)}] · total: "
                 f"<b class='{'fail' if run.judge_failed else ''}'>{escape_html(total)}</b></div>")
    return "".join(parts)


def samples_table(results: dict, runs: dict, samples: int = 8) -> tuple[list[int], str]:
    """The episode ids shown and the HTML ``<table>`` of sample dialogues: one row per
    episode (the same scenario for every agent), one column per agent. All dialogue and
    scenario text is HTML-escaped."""
    names = list(results["agents"])
    by_id = {n: {r.episode.episode_id: r for r in runs[n]} for n in names}
    ids = [i for i in results["episode_ids"] if all(i in by_id[n] for n in names)][:samples]
    rows = []
    for i in ids:
        first = by_id[names[0]][i]
        cells = [f"<td>episode {escape_html(i)}<br>{_scenario_cell(first.episode)}</td>"]
        cells += [f"<td>{_dialogue_cell(by_id[n][i])}</td>" for n in names]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = "<th style='width:16%'>scenario</th>" + "".join(f"<th>{escape_html(n)}</th>" for n in names)
    return ids, f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def format_samples_html(results: dict, runs: dict, samples: int = 8) -> str:
    """``samples.html``: the sample dialogues (:func:`samples_table`) as a page."""
    names = list(results["agents"])
    ids, table = samples_table(results, runs, samples)
    title = f"{results['setting']} ({results['split']}): sample dialogues"
    summary = ", ".join(f"{escape_html(n)}: {escape_html(mean_se_text(results['agents'][n]['reward']))}"
                        for n in names)
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{escape_html(title)}</title>"
            f"<style>{SAMPLES_CSS}</style></head><body><h1>{escape_html(title)}</h1>"
            f"<p class='meta'>mean reward ± SE: {summary}. Model {escape_html(results.get('model'))}; "
            f"{escape_html(len(ids))} of {escape_html(results['episodes'])} episodes shown.</p>"
            f"{table}</body></html>\n")


__all__ = [
    "SAMPLES_CSS",
    "escape_html",
    "format_dimensions_table",
    "format_markdown",
    "format_rounds_table",
    "format_samples_html",
    "format_table",
    "interval_text",
    "main_table",
    "mean_se_text",
    "percent_text",
    "plot_dimensions",
    "plot_reward",
    "plot_reward_by_round",
    "plotting_backend",
    "samples_table",
]

