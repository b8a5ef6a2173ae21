"""Installs come from locks: every dependency pyproject.toml declares is pinned, with hashes, at a version its range
allows, in the lock of each install that needs it (a stale lock fails here, not in a user's image)."""

from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement

from tests.conftest import ROOT

LOCKS = {
    "serve.txt": ["backbones"],
    "ray.txt": ["backbones", "ray"],
    "dev.txt": ["test", "backbones", "tools", "bench", "ray"],
}


def pinned(lock: str) -> dict[str, tuple[str, bool]]:
    """name -> (version, hashed) of a lock file."""
    text = (ROOT / "deploy" / "lock" / lock).read_text()
    out = {}
    for block in re.split(r"\n(?=\S)", text):
        if match := re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", block):
            out[match[1].lower().replace("_", "-")] = (match[2], "--hash=sha256:" in block)
    return out


@pytest.mark.parametrize(("lock", "extras"), LOCKS.items())
def test_every_declared_dependency_is_locked_with_hashes(lock: str, extras: list[str]) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *(d for e in extras for d in project["optional-dependencies"][e])]
    locked = pinned(lock)
    for spec in map(Requirement, wanted):
        name = spec.name.lower().replace("_", "-")
        if name == "torch":  # pinned per target, outside the locks
            assert name not in locked
            continue
        assert name in locked, f"{lock}: {name} is not locked; run `bash deploy/lock.sh`"
        version, hashed = locked[name]
        assert hashed and spec.specifier.contains(version, prereleases=True), f"{lock}: {name}=={version} vs {spec}"


def test_the_installs_use_the_locks() -> None:
    install = (ROOT / ".ci" / "install").read_text()
    assert "--require-hashes -r deploy/lock/dev.txt" in install
    assert "--no-deps --require-hashes -r deploy/lock/trainers.txt" in install
    assert '--require-hashes -r "${LOCK}"' in (ROOT / "Dockerfile").read_text()
