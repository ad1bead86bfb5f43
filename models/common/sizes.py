"""Checks of a model config's size fields, for the families' __post_init__: a zero or negative size
would otherwise build a model with no blocks or fail deep inside torch."""


def check_sizes(cfg, positive: tuple[str, ...], non_negative: tuple[str, ...] = ()) -> None:
    """Raise ValueError naming the first field of `positive` below 1 or of `non_negative` below 0."""
    for names, least in ((positive, 1), (non_negative, 0)):
        for name in names:
            value = getattr(cfg, name)
            if value < least:
                raise ValueError(f"{name}={value} must be >= {least}")
