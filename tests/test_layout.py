"""The package is laid out by role, and each room imports only what its role allows (read from the source, so an
import inside a function counts too); no module grows past 350 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

APP = ROOT / "app"
HTTP = ("fastapi", "starlette", "uvicorn", "app.server")
ML = ("torch", "transformers", "tokenizers", "safetensors", "peft", "numpy")

# room -> prefixes its modules must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "app/engine": (*HTTP, "app.bench", "app.training", "app.clients"),
    "app/model": (*HTTP, "app.engine", "app.bench", "app.training", "app.clients", "app.settings"),
    "app/training": (*HTTP, "app.bench", "app.clients"),
    "app/settings.py": (*HTTP, *ML, "app."),
}
ROOMS = {"server", "engine", "model", "training", "clients", "bench"}


def modules() -> list[Path]:
    return sorted(APP.rglob("*.py"))


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from app import server`
    return names


def matches(name: str, prefix: str) -> bool:
    return name.startswith(prefix) if prefix.endswith(".") else name == prefix or name.startswith(prefix + ".")


def test_app_holds_the_rooms_and_two_top_level_modules() -> None:
    top = {p.name for p in APP.iterdir() if p.name != "__pycache__"}
    assert top == {"__init__.py", "settings.py", "cli.py", *ROOMS}
    assert all((APP / room / "__init__.py").exists() for room in ROOMS)


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_import_rules(room: str) -> None:
    target = ROOT / room
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    assert files
    broken = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in imports(path)
        for prefix in FORBIDDEN[room]
        if matches(name, prefix)
    }
    assert not broken


@pytest.mark.parametrize(
    ("room", "allowed"),
    [
        ("app/clients", {"httpx", "app.clients"}),  # trainers import the clients without torch or the server
        ("app/engine/batching.py", {"app.model.plan"}),  # the batcher: pure Python, unit-tested with lists
        ("app/engine/handoff.py", set()),
        ("app/model/plan.py", set()),  # what the batcher emits and the model runs: no torch
    ],
)
def test_light_rooms_import_only_the_standard_library_and(room: str, allowed: set[str]) -> None:
    target = ROOT / room
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    stdlib = {*sys.stdlib_module_names, "__future__"}
    broken = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in imports(path)
        if name.split(".")[0] not in stdlib and not any(matches(name, prefix) for prefix in allowed)
    }
    assert not broken


def test_only_the_cli_reaches_into_the_benchmark() -> None:
    users = {
        path.relative_to(ROOT).as_posix()
        for path in modules()
        if not path.is_relative_to(APP / "bench") and any(matches(n, "app.bench") for n in imports(path))
    }
    assert users == {"app/cli.py"}


def test_no_module_is_over_350_lines() -> None:
    sizes = {path.relative_to(ROOT).as_posix(): len(path.read_text().splitlines()) for path in modules()}
    assert {name: n for name, n in sizes.items() if n > 350} == {}


@pytest.mark.parametrize(
    ("module", "heavy"),
    [
        ("app.clients", ("torch", "transformers", "fastapi", "starlette", "pydantic", "app.server", "app.model")),
        ("app.engine.batching", ("torch", "transformers", "numpy")),
    ],
)
def test_light_modules_stay_light_when_imported(module: str, heavy: tuple[str, ...]) -> None:
    """What the source says, checked where it matters: a trainer importing the client loads none of these."""
    code = f"import sys, {module}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
