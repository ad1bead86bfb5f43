"""Model families. Each folder registers a ModelSpec as `model_spec`; the Trainer only sees specs."""
import importlib

from models.spec import ModelSpec

FAMILIES = ("llm", "moe", "deltanet")


def get_model_spec(family: str) -> ModelSpec:
    if family not in FAMILIES:
        raise KeyError(family)
    return importlib.import_module(f"models.{family}").model_spec
