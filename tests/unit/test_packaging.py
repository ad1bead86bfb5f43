"""What a wheel of shardwright holds: setuptools packages .py files only, unless pyproject declares more."""
import fnmatch
import shutil
import subprocess

import pytest

from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def tracked_files(*paths: str) -> list[str]:
    """The files git tracks under `paths`; the test skips outside a git checkout (an unpacked sdist)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the tracked files are unknown")
    listed = subprocess.run(["git", "ls-files", "-z", "--", *paths], cwd=REPO, capture_output=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout git can read: {listed.stderr.decode().strip()}")
    return [path for path in listed.stdout.decode().split("\0") if path]


def test_every_data_file_inside_a_package_is_declared_package_data():
    """A file a package reads at run time (planner/devices.yaml) must be declared, or a wheel built from a clean
    checkout leaves it out; the files git tracks under each package are compared with the declaration."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = [pattern.rstrip("*") for pattern in setuptools["packages"]["find"]["include"]]
    data = {path for path in tracked_files(*packages) if not path.endswith(".py")}
    declared = [f"{package.replace('.', '/')}/{pattern}"
                for package, patterns in setuptools.get("package-data", {}).items() for pattern in patterns]
    assert data, "no data files found: the check would pass vacuously"
    undeclared = sorted(path for path in data if not any(fnmatch.fnmatch(path, p) for p in declared))
    unmatched = [pattern for pattern in declared if not any(fnmatch.fnmatch(path, pattern) for path in data)]
    assert not undeclared and not unmatched, (undeclared, unmatched)
