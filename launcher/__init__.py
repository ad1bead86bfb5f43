"""The user's entry: CLI, config, the Trainer loop, checkpoints and metrics."""
