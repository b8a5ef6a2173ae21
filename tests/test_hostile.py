"""No request stalls the server (#29), against real `reward-server serve` processes on loopback: connections that send
nothing or trickle, oversized headers, bodies that stop arriving, SIGTERM meanwhile, and a soak over the whole hostile
corpus with `/health` probed from another process. Bounded in count and time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.calibration import TARGET_S
from tests.conftest import rss_kib

pytestmark = pytest.mark.slow  # real server processes; the in-process side is tests/test_stalls.py

FAST = {"REWARD_HEADER_TIMEOUT_S": "1", "REWARD_BODY_TIMEOUT_S": "2"}


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_all(sock: socket.socket, timeout: float = 10) -> bytes:
    """What the server sends until it closes the connection (b"" when it closes without a word)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    return data


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1") else 0


def test_idle_and_trickling_connections_are_closed_at_the_header_deadline(server: Callable[..., Any]) -> None:
    """100 connections trickling a header byte every 10 s all stayed open past 100 s."""
    url, _ = server("gpt2", **FAST)
    idle = [connect(url) for _ in range(20)]
    trickling = connect(url)
    began = time.monotonic()
    for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n":
        try:
            trickling.send(bytes([byte]))
        except OSError:
            break
        time.sleep(0.1)
        if time.monotonic() - began > 3:
            break
    answers = [read_all(sock, 5) for sock in (*idle, trickling)]
    took = time.monotonic() - began
    assert took < 6  # closed at ~1 s, not held
    assert {status_of(a) for a in answers} == {408}
    assert b"REWARD_HEADER_TIMEOUT_S" in answers[-1]
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200


def test_oversized_headers_are_431_and_never_reach_the_app(server: Callable[..., Any]) -> None:
    url, _ = server("gpt2", **FAST)
    huge = connect(url)
    huge.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
    try:
        for _ in range(160):  # 10 MB in 64 KB chunks; the server answers and closes long before
            huge.sendall(b"a" * 65536)
    except OSError:
        pass
    many = connect(url)
    with contextlib.suppress(OSError):
        many.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(100_000)))
    for sock, words in ((huge, b"REWARD_MAX_HEADER_BYTES"), (many, b"REWARD_MAX_HEADERS")):
        answer = read_all(sock)
        assert status_of(answer) == 431 and words in answer, answer[:300]
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200


def test_connections_past_the_cap_get_a_json_503_and_the_server_recovers(server: Callable[..., Any]) -> None:
    """300 idle connections against 256 file descriptors made /health time out."""
    url, _ = server("gpt2", REWARD_MAX_CONNECTIONS="30", **FAST)
    held = [connect(url) for _ in range(30)]
    extra = [connect(url) for _ in range(5)]
    answers = [read_all(sock, 3) for sock in extra]
    assert {status_of(a) for a in answers} == {503}
    error = json.loads(answers[0].split(b"\r\n\r\n", 1)[1])["error"]
    assert error["type"] == "too_many_connections" and "REWARD_MAX_CONNECTIONS" in error["message"]
    assert b"retry-after: 1" in answers[0].lower()
    for sock in held:  # the held ones are closed at the header deadline, and the server serves again
        read_all(sock, 5)
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200


def test_a_body_that_stops_arriving_gets_408_and_cannot_hold_sigterm(server: Callable[..., Any]) -> None:
    """A trickling body kept the process alive 60 s after SIGTERM."""
    url, proc = server("gpt2", **FAST)
    slow = connect(url)
    slow.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
    began = time.monotonic()
    answer = read_all(slow, 10)
    assert status_of(answer) == 408 and b"REWARD_BODY_TIMEOUT_S" in answer
    assert 1.5 < time.monotonic() - began < 6
    again = connect(url)
    again.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
    time.sleep(0.3)
    began = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == 0
    assert time.monotonic() - began < 6  # the body deadline bounds the drain, not the client


# ---- the soak -------------------------------------------------------------------------------------------------------
PROBE = """
import json, os, sys, time, httpx
url, stop, out = sys.argv[1], sys.argv[2], sys.argv[3]
latencies, failures = [], 0
with httpx.Client(timeout=5) as client:
    while not os.path.exists(stop):
        began = time.perf_counter()
        try:
            ok = client.get(url + "/health").status_code == 200
        except httpx.HTTPError:
            ok = False
        latencies.append(time.perf_counter() - began)
        failures += not ok
        time.sleep(0.02)
json.dump({"latencies": latencies, "failures": failures}, open(out, "w"))
"""


def hostile_corpus() -> list[tuple[str, bytes, dict[str, str]]]:
    """Every shape of the review, each within the 16 MB body limit; (path, body, headers)."""
    plain = {"content-type": "application/json"}
    hh = "\n\n".join(f"{'Human' if i % 2 == 0 else 'Assistant'}: t{i}" for i in range(16_000))[:199_000]
    return [
        ("/get_reward", json.dumps({"query": ["x" + "<|im_end|>" * 19_000]}).encode(), plain),
        ("/get_reward", json.dumps({"query": ["x" + "<|endoftext|>" * 15_000] * 40}).encode(), plain),  # valid
        ("/get_reward", json.dumps({"query": [""] * 2_000_000}).encode(), plain),
        ("/score", json.dumps({"items": [{"prompt": "", "response": ""}] * 500_000}).encode(), plain),
        ("/score", json.dumps({"items": [{"prompt": "q " * 100, "response": "w " * 7_500}] * 1024}).encode(), plain),
        ("/score", json.dumps({"items": [{"prompt": hh, "response": "r"}]}).encode(), plain),
        ("/score", json.dumps({"items": [{"prompt": "p", "response": "r " * 1000}] * 1000}).encode(),
         {**plain, "X-Request-Timeout": "0.5"}),
        ("/rank", json.dumps({"groups": [{"prompt": "p", "responses": ["r"] * 1024}], "probabilities": True}).encode(),
         plain),
        ("/get_reward", b'{"query": ["hi"], "labels": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}", plain),
        ("/classify", json.dumps({"input": [[1] * 400_000]}).encode(), plain),
        ("/score", b'{"items": [{"prompt": "unterminated', plain),
    ]  # fmt: skip


@pytest.mark.timeout(600)  # one round of the corpus took ~110 s beside a CPU hog on 2 shared cores
def test_soak_over_the_hostile_corpus(server: Callable[..., Any], tmp_path: Path) -> None:
    """0 responses >= 500, /health p99 < 100 ms throughout, RSS back within 10% of where one pass of the corpus
    left it (the first pass builds kernels and caches for its shapes), and the peak bounded. The soak runs rounds of
    the whole corpus at once for ~25 s (REWARD_TEST_LOAD_S), sized by the rounds' measured length: a round that would
    end past the budget is not started, but the first always runs (a busy machine runs one, a fast one several)."""
    url, proc = server("gpt2", **FAST)
    corpus = hostile_corpus()
    valid = {"items": [{"prompt": "What is 2 + 2?", "response": "4"}] * 8}
    cold_rss = rss_kib(proc.pid)
    began = time.monotonic()
    with httpx.Client(base_url=url, timeout=300) as client:  # one pass first: kernels and caches for these shapes
        for path, body, headers in corpus:
            client.post(path, content=body, headers=headers)
    first_pass = time.monotonic() - began
    time.sleep(1.5)
    start_rss = rss_kib(proc.pid)
    probe_out, stop = tmp_path / "probe.json", tmp_path / "stop"
    probe = subprocess.Popen([sys.executable, "-c", PROBE, url, str(stop), str(probe_out)])
    statuses: dict[int, int] = {}
    deadlines: list[tuple[int, float]] = []
    peak = start_rss
    requests = 0
    rounds: list[float] = []

    async def soak() -> None:
        nonlocal peak, requests
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

            async def send(path: str, body: bytes, headers: dict[str, str]) -> None:
                nonlocal requests
                began = time.perf_counter()
                response = await client.post(path, content=body, headers=headers)
                if "X-Request-Timeout" in headers:  # its deadline is the point: a 504, on time
                    deadlines.append((response.status_code, time.perf_counter() - began))
                else:
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                requests += 1

            async def abandoned() -> None:  # a client that leaves mid-request: its items are dropped
                nonlocal requests
                body = {"items": [{"prompt": "p", "response": "r " * 500}] * 600}
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(client.post("/score", json=body), 0.5)
                requests += 1

            end = time.monotonic() + TARGET_S
            while not rounds or time.monotonic() + max(rounds) < end:
                began = time.monotonic()
                await asyncio.gather(*(send(*case) for case in corpus), abandoned(), send("/score", *_json(valid)))
                rounds.append(time.monotonic() - began)
                peak = max(peak, rss_kib(proc.pid))

    time.sleep(1)  # the probe is up before the soak starts
    asyncio.run(soak())
    stop.touch()  # the probe covered the whole soak, however long its last round took
    probe.wait(30)
    time.sleep(2)
    final_rss = rss_kib(proc.pid)
    probed = json.loads(probe_out.read_text())
    latencies = sorted(probed["latencies"])
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    print(
        f"hostile soak: first pass {first_pass:.1f} s, then {len(rounds)} rounds in {sum(rounds):.1f} s: "
        f"{requests} requests, statuses "
        f"{dict(sorted(statuses.items()))}, 0.5 s deadlines "
        f"{sorted({s for s, _ in deadlines})} within {max(t for _, t in deadlines):.2f} s; /health {len(latencies)} "
        f"probes, p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms, {probed['failures']} failed; RSS cold "
        f"{cold_rss // 1024} MiB, after one pass {start_rss // 1024} MiB, peak {peak // 1024} MiB, final "
        f"{final_rss // 1024} MiB"
    )
    assert not [s for s in statuses if s >= 500], statuses
    assert all(status in (200, 504) and took < 1.5 for status, took in deadlines), deadlines
    assert probed["failures"] == 0 and p99 < 0.1
    assert final_rss < start_rss * 1.1
    assert peak - cold_rss < 512 * 1024  # one 1,024 x 15k-character request alone took 1.5 GB


def _json(body: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    return json.dumps(body).encode(), {"content-type": "application/json"}
