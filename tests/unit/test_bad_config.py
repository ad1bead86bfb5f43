"""Each bad config of issue 14 item 8 is one UserError line (exit 2 through the CLI), before anything runs."""
import collections

import pytest

from launcher.cli import USER_ERROR_EXIT, main
from launcher.config import load_config, validate
from launcher.errors import UserError
from tests.conftest import TINY

FAULTS: collections.Counter = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def fault_report():
    yield
    print(f"\nconfig faults injected: {sum(FAULTS.values())} ({dict(FAULTS)})")


@pytest.mark.parametrize("override, message", [
    ("model.dim=0", "model section: dim=0 must be >= 1"),
    ("model.dim=-128", "model section: dim=-128 must be >= 1"),
    ("model.n_heads=0", "model section: n_heads=0 must be >= 1"),
    ("model.n_layers=0", "model section: n_layers=0 must be >= 1"),
    ("checkpoint.every=-1", "checkpoint.every=-1 must be >= 0"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last=-1 must be >= 0"),
    ("data.vocab_size=0", "data.vocab_size=0 must be >= 1"),
    ("run.max_restarts=-1", "run.max_restarts=-1 must be >= 0"),
    ("train.steps=[1,", "--set 'train.steps=[1,': the value is not valid YAML"),
])
def test_bad_values(override, message):
    FAULTS["bad value"] += 1
    with pytest.raises(UserError, match=message.replace("[", r"\[")) as error:
        validate(load_config(TINY, [override]), world_size=1)
    assert "\n" not in str(error.value)


def test_bad_files(tmp_path):
    duplicate = tmp_path / "duplicate.yaml"
    duplicate.write_text("model:\n  dim: 128\n  dim: 64\n")
    with pytest.raises(UserError, match="is not valid YAML at line 3: key 'dim' appears twice"):
        load_config(duplicate)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"run:\n  dir: caf\xe9\n")
    with pytest.raises(UserError, match=r"is not UTF-8 text \(byte 15: b.\\xe9.\); save it as UTF-8"):
        load_config(latin1)
    FAULTS["bad config file"] += 2


@pytest.mark.parametrize("damage", ["run.dir is a file", "latest is a directory", "latest is not text"])
def test_bad_run_directory(tmp_path, damage):
    run_dir = tmp_path / "run"
    if damage == "run.dir is a file":
        run_dir.write_text("")
        message = "is a file, not a directory"
    else:
        (run_dir / "checkpoints").mkdir(parents=True)
        latest = run_dir / "checkpoints" / "latest"
        if damage == "latest is a directory":
            latest.mkdir()
            message = "latest is a directory"
        else:
            latest.write_bytes(b"step-\xff\xfe")
            message = r"latest is not text \(not UTF-8\)"
    FAULTS["bad run directory"] += 1
    with pytest.raises(UserError, match=message):
        validate(load_config(TINY, [f"run.dir={run_dir}"]), world_size=1)


def test_no_processes(capsys):
    FAULTS["--nproc-per-node 0"] += 1
    assert main(["train", str(TINY), "--nproc-per-node", "0"]) == USER_ERROR_EXIT
    assert capsys.readouterr().err == "error: --nproc-per-node 0: give a number of processes >= 1\n"
