"""The `shardwright` command (and `python -m launcher`). The stop signals are taken before the CLI's imports, which
take seconds (torch): a stop that comes meanwhile still ends `train` in one line (launcher/stop_signals.py)."""
from launcher.stop_signals import StartUp


def main() -> int:
    start_up = StartUp().install()
    from launcher.cli import main as cli_main

    return cli_main(start_up=start_up)
