"""`GET /monitor/ui`: the monitor as a page, rendered here as HTML with inline SVG charts (no build step, no CDN, no
library). A dozen lines of inline script fetch the runs' part again every few seconds and swap it in, so the page
follows new requests without a reload.

Per run: its warnings in force, then one chart per signal over its windows (oldest left), the baseline windows
shaded, the checkpoint's eval set (its reference) as a grey line where it has one, and where a rule watches the
signal, the level below which it never trips as a dashed line."""

from __future__ import annotations

from html import escape
from typing import Any

from app.server.monitor import RULES

CHARTS = (
    ("reward_mean", "reward mean (p10-p90 band)"),
    ("length_corr", "corr(reward, reply length)"),
    ("group_length_corr", "within-group corr(reward, length)"),
    ("group_collapse", "share of /rank groups collapsed"),
    ("repetition", "share of replies repeating"),
    ("boilerplate", "share of replies with a phrase most prompts' replies use"),
    ("truncated", "share of items truncated"),
    ("ood", "share of items unlike the eval set"),
    ("distance_mean", "mean distance from the eval set's states"),
    ("reward_drift", "reward drift (baseline std)"),
)
WIDTH, HEIGHT, PAD = 300, 90, 4
REFRESH_MS = 2000

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>reward-server monitor</title><link rel="icon" href="data:,">
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }}
h2 {{ margin: 1.2em 0 0.3em; }} .run {{ border-top: 1px solid #ccc; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 12px; }} figure {{ margin: 0; }}
figcaption {{ font-size: 12px; color: #555; }} .warn {{ color: #b00; }} .ok {{ color: #070; }}
svg {{ background: #fafafa; border: 1px solid #ddd; }}
</style></head>
<body><h1>Reward-hacking monitor</h1>
<p>Each window is {window} items of a run. Shaded: the run's baseline windows; grey: the checkpoint's eval set;
dashed: the floor a warning needs.</p>
<div id="runs">{runs}</div>
<script>
async function refresh() {{
  try {{
    const answer = await fetch("/monitor/ui?part=runs", {{cache: "no-store"}});
    if (answer.ok) document.getElementById("runs").innerHTML = await answer.text();
  }} finally {{ setTimeout(refresh, {refresh}); }}
}}
setTimeout(refresh, {refresh});
</script></body></html>
"""


def page(snapshot: dict[str, Any]) -> str:
    return PAGE.format(window=snapshot["window"], runs=runs_html(snapshot), refresh=REFRESH_MS)


def runs_html(snapshot: dict[str, Any]) -> str:
    if not snapshot["runs"]:
        return '<p id="empty">No run has been scored yet.</p>'
    return "".join(_run(name, run) for name, run in snapshot["runs"].items())


def _run(name: str, run: dict[str, Any]) -> str:
    warnings = run["warnings"]
    said = (
        "".join(f'<li class="warn">{escape(w)}</li>' for w in warnings)
        if warnings
        else '<li class="ok">no warning</li>'
    )
    charts = "".join(_chart(run, signal, title) for signal, title in CHARTS)
    return (
        f'<section class="run" data-run="{escape(name)}"><h2>{escape(name)}</h2>'
        f"<p>{run['items']} items, {len(run['windows'])} windows</p><ul>{said}</ul>"
        f'<div class="charts">{charts}</div></section>'
    )


def _chart(run: dict[str, Any], signal: str, title: str) -> str:
    windows = run["windows"]
    values = [w["signals"].get(signal) for w in windows]
    known = [v for v in values if v is not None]
    band = [(w["signals"].get("reward_p10"), w["signals"].get("reward_p90")) for w in windows]
    if signal == "reward_mean":
        known += [v for pair in band for v in pair if v is not None]
    level = _trip_level(signal)
    if level is not None:
        known.append(level)
    reference = (run.get("reference") or {}).get(signal)  # the checkpoint's eval set, where it has one
    if isinstance(reference, float):
        known.append(reference)
    if not known:
        return (
            f'<figure><svg width="{WIDTH}" height="{HEIGHT}"></svg><figcaption>{title}: no data</figcaption></figure>'
        )
    low, high = min(known), max(known)
    span = (high - low) or 1.0
    step = (WIDTH - 2 * PAD) / max(1, len(windows) - 1)

    def x(i: int) -> float:
        return PAD + i * step

    def y(v: float) -> float:
        return HEIGHT - PAD - (v - low) / span * (HEIGHT - 2 * PAD)

    parts = []
    if run["baseline"]:
        last = max(run["baseline"]) - windows[0]["index"]
        if last >= 0:
            parts.append(f'<rect x="0" y="0" width="{x(last) + step / 2:.1f}" height="{HEIGHT}" fill="#e8eefc"/>')
    if signal == "reward_mean":
        top = [(x(i), y(hi)) for i, (_, hi) in enumerate(band) if hi is not None]
        bottom = [(x(i), y(lo)) for i, (lo, _) in enumerate(band) if lo is not None][::-1]
        if top and bottom:
            points = " ".join(f"{a:.1f},{b:.1f}" for a, b in top + bottom)
            parts.append(f'<polygon points="{points}" fill="#cfe0cf"/>')
    if level is not None:
        parts.append(
            f'<line x1="0" x2="{WIDTH}" y1="{y(level):.1f}" y2="{y(level):.1f}" stroke="#b00" stroke-dasharray="4 3"/>'
        )
    if isinstance(reference, float):
        parts.append(f'<line x1="0" x2="{WIDTH}" y1="{y(reference):.1f}" y2="{y(reference):.1f}" stroke="#999"/>')
    for value, at in ((high, 10), (low, HEIGHT - 3)):  # the axis' ends
        parts.append(f'<text x="{WIDTH - 3}" y="{at}" font-size="9" text-anchor="end" fill="#777">{value:.3g}</text>')
    line = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values) if v is not None)
    if line:
        parts.append(f'<polyline points="{line}" fill="none" stroke="#225" stroke-width="1.5"/>')
    latest = f"{values[-1]:.3g}" if values and values[-1] is not None else "-"
    return (
        f'<figure data-signal="{signal}"><svg width="{WIDTH}" height="{HEIGHT}" role="img" '
        f'aria-label="{title}">{"".join(parts)}</svg><figcaption>{title}: {latest}</figcaption></figure>'
    )


def _trip_level(signal: str) -> float | None:
    """The rule's floor for `signal` (the value below which it never fires), when a rule watches it."""
    return next((rule.floor for rule in RULES if rule.signal == signal), None)
