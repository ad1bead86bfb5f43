"""What a wheel of shardwright holds: setuptools packages .py files only, unless pyproject declares more."""
import subprocess
import tomllib

from tests.conftest import REPO


def test_every_data_file_inside_a_package_is_declared_package_data():
    """A file a package reads at run time (planner/devices.yaml) must be declared, or a wheel built from a clean
    checkout leaves it out; the files git tracks under each package are compared with the declaration."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = [pattern.rstrip("*") for pattern in setuptools["packages"]["find"]["include"]]
    tracked = subprocess.run(["git", "ls-files", *packages], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    data = {path for path in tracked if not path.endswith(".py")}
    declared = {f"{package}/{name}" for package, names in setuptools.get("package-data", {}).items()
                for name in names}
    assert data, "no data files found: the check would pass vacuously"
    assert data == declared
