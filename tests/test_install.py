"""Installs come from locks: every dependency pyproject.toml declares is pinned, with hashes, at a version its range
allows, in the lock of each install that needs it (a stale lock fails here, not in a user's image). The CPU locks hold
no CUDA wheel, the CUDA lock holds only PyPI's torch and its CUDA wheels, and serving pulls neither trainers nor Ray."""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement

from tests.conftest import ROOT

LOCKS = {
    "serve.txt": ["backbones"],
    "ray.txt": ["backbones", "ray"],
    "dev.txt": ["test", "backbones", "train", "bench", "ray"],
}
CUDA = re.compile(r"nvidia-.*|cuda-.*|triton")  # what PyPI's Linux torch pulls and its CPU build does not


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
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert '--require-hashes -r "${LOCK}"' in dockerfile
    assert "--no-deps --require-hashes -r deploy/lock/cuda.txt" in dockerfile  # TORCH=cuda
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert "TORCH" in re.findall(r"^ARG (\w+)=", dockerfile, re.M)
    assert compose["reward-server-gpu"]["build"]["args"] == {"TORCH": "cuda"}
    assert compose["reward-server"]["build"] == "."  # the defaults: serve.txt and torch's CPU build


def test_cpu_locks_hold_no_cuda_wheel_and_the_cuda_lock_only_those() -> None:
    """PyPI's Linux torch requires ~4 GB of CUDA wheels; the CPU locks are resolved against torch's CPU build."""
    cuda = pinned("cuda.txt")
    assert all(hashed for _, hashed in cuda.values())
    assert {name for name in cuda if not CUDA.fullmatch(name)} == {"torch"}
    assert any(name.startswith("nvidia-") for name in cuda)
    for lock in LOCKS:
        assert not [name for name in pinned(lock) if CUDA.fullmatch(name)], f"{lock}: run `bash deploy/lock.sh`"
    # what the CUDA torch needs besides its CUDA wheels (left out of cuda.txt) comes from the lock installed after it
    text = (ROOT / "deploy" / "lock" / "cuda.txt").read_text()
    left_out = re.findall(r"^# (\S+)$", text.split("excluded from the output:", 1)[1], re.M)
    assert "sympy" in left_out
    for lock in ("serve.txt", "ray.txt"):
        assert set(left_out) <= set(pinned(lock)), lock


def test_one_torch_version_everywhere() -> None:
    """The CPU locks were resolved against torch's CPU build of this version; the installs pin the same one."""
    version = pinned("cuda.txt")["torch"][0]
    assert re.search(rf"^TORCH={re.escape(version)}\b", (ROOT / "deploy" / "lock.sh").read_text(), re.M)
    assert f'torch="torch=={version}+cpu"' in (ROOT / ".ci" / "install").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"ARG TORCH_VERSION={version}\n" in dockerfile and '"torch==${TORCH_VERSION}+cpu"' in dockerfile


def test_serving_pulls_no_trainer_and_no_ray() -> None:
    """`pip install .` and the serve lock: no trainer, no Ray, no test or bench tools."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {Requirement(d).name.lower() for d in project["dependencies"]}
    serve = set(pinned("serve.txt"))
    for name in ("ray", "verl", "openrlhf", "trl", "vllm", "deepspeed", "litserve", "pytest", "matplotlib"):
        assert name not in core and name not in serve, name
