"""`/monitor/ui` in a real headless Chromium: it loads with no console error, shows every run with its charts, and
follows new requests without a reload. The screenshot it takes is kept in the test's directory."""

from __future__ import annotations

import random
from pathlib import Path

import httpx

from tests.browser import Browser
from tests.test_monitor import policy

WINDOW = 256  # the live server's default REWARD_MONITOR_WINDOW: 8 /rank requests of 32 items


def send(url: str, run: str, windows: int, rng: random.Random) -> None:
    with httpx.Client(base_url=url, timeout=60, headers={"X-Run-Id": run}) as client:
        for step in range(windows * WINDOW // 32):
            assert client.post("/rank", json={"groups": policy(step % 6, rng)}).status_code == 200


def test_the_page_shows_each_run_and_follows_new_requests(live_server: str, tmp_path: Path) -> None:
    rng = random.Random(1)
    send(live_server, "page-a", 3, rng)
    with Browser(tmp_path / "profile") as browser:
        browser.open(f"{live_server}/monitor/ui")
        browser.evaluate("window.loadedOnce = true")  # gone if the page reloads
        assert browser.evaluate("document.querySelector('[data-run=\"page-a\"] h2').textContent") == "page-a"
        assert browser.evaluate("document.querySelectorAll('[data-run=\"page-a\"] figure polyline').length") >= 6
        assert browser.evaluate("document.querySelector('[data-run=\"page-a\"]').textContent").count("no warning")
        assert browser.evaluate("document.querySelectorAll('line[stroke-dasharray]').length") > 0  # thresholds
        send(live_server, "page-b", 1, rng)
        browser.wait_for("document.querySelector('[data-run=\"page-b\"]') !== null", timeout=20)
        assert browser.evaluate("window.loadedOnce") is True
        assert "768 items, 3 windows" in browser.evaluate("document.querySelector('[data-run=\"page-a\"]').textContent")
        browser.screenshot(tmp_path / "monitor.png")
        assert browser.errors == []
    assert (tmp_path / "monitor.png").stat().st_size > 10_000
