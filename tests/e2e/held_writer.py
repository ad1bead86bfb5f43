"""An async save's writer that holds the write of step 3's staging directory for a minute before writing it, in
DCP's writer process (which imports this module to unpickle it): a training process killed meanwhile leaves it
mid-save (tests/e2e/crash_during_save.py mid-write, tests/e2e/test_cli.py kills during the save of step 3)."""
import time
from pathlib import Path

from launcher.checkpoint import _BackgroundWriter

HELD_STAGING = ".staging-step-3"


class HeldBackgroundWriter(_BackgroundWriter):
    def write_data(self, plan, planner):
        if Path(self.path).name == HELD_STAGING:
            time.sleep(60)
        return super().write_data(plan, planner)
