"""The OpenMP settings the launcher package gives torch's libgomp (launcher/cpu_threads.py), read back from libgomp
itself: OMP_DISPLAY_ENV makes it print the settings it started with."""
import os
import re
import subprocess
import sys

import pytest

from launcher.cpu_threads import SETTINGS, torch_bundles_libgomp
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(not torch_bundles_libgomp(), reason="this torch does not ship GNU OpenMP (libgomp)")


def libgomp_settings(code: str, **env: str) -> tuple[dict[str, str], str]:
    """(what libgomp says it started with, stdout) of a fresh Python running `code`, without the user's settings of
    SETTINGS unless given in `env`."""
    clean = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                          env={**clean, "OMP_DISPLAY_ENV": "VERBOSE", **env})
    # "  OMP_WAIT_POLICY = 'ACTIVE'"; libgomp of GCC 13 and later prefixes "[host] "
    shown = dict(re.findall(r"^\s+(?:\[host\]\s+)?(\w+) = '([^']*)'", done.stderr, re.MULTILINE))
    assert set(SETTINGS) <= set(shown), f"libgomp printed no settings (is torch built with GNU OpenMP?): {done.stderr}"
    return {name: shown[name] for name in SETTINGS}, done.stdout


def test_the_launcher_sets_libgomp_s_wait_policy_before_torch_loads_it():
    """The entry point's import order (`shardwright` imports launcher.cli): libgomp starts with SETTINGS, and the
    trainer's log line says so."""
    shown, said = libgomp_settings("import launcher.cli, torch; from launcher.cpu_threads import describe_openmp; "
                                   "torch.ones(1); print(describe_openmp(2))")
    assert shown == SETTINGS
    assert "keep spinning" in said, said


def test_torch_loaded_first_keeps_libgomp_s_defaults_and_the_log_says_how_to_fix_it():
    """Negative control: the same check sees libgomp's defaults when torch is loaded before the launcher, and the log
    line names the settings to start with."""
    shown, said = libgomp_settings("import torch, launcher; from launcher.cpu_threads import describe_openmp; "
                                   "print(describe_openmp(2))")
    assert shown["OMP_WAIT_POLICY"] != SETTINGS["OMP_WAIT_POLICY"], shown
    assert "start with OMP_WAIT_POLICY=ACTIVE GOMP_SPINCOUNT=300000" in said, said


def test_a_user_s_own_setting_is_kept_whole_and_a_single_thread_logs_nothing():
    """A user who chose the wait policy gets libgomp's spin for it (PASSIVE: none), not our spin count, and the log
    line says what to start with instead; one thread logs nothing."""
    shown, said = libgomp_settings("import launcher, torch, os; from launcher.cpu_threads import describe_openmp; "
                                   "print(describe_openmp(1), os.environ.get('GOMP_SPINCOUNT')); "
                                   "print(describe_openmp(2))", OMP_WAIT_POLICY="PASSIVE")
    assert shown == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}
    first, second = said.splitlines()
    assert first.split() == ["None", "None"]
    assert "start with OMP_WAIT_POLICY=ACTIVE GOMP_SPINCOUNT=300000" in second, second
