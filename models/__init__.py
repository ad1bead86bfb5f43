"""Model families. Each folder registers a ModelSpec as `model_spec`; the trainer only sees specs."""
import importlib

from models.spec import ModelSpec

# family name -> the module that defines its `model_spec`
FAMILIES = {"llm": "models.llm", "moe": "models.moe", "deltanet": "models.deltanet",
            "tokenformer": "models.tokenformer", "matformer": "models.matformer", "solo": "models.solo"}
DEFAULT_FAMILY = "llm"


def register_family(name: str, module: str) -> None:
    """Make a family defined outside this package (e.g. a test's) known by `name`, in this process."""
    FAMILIES[name] = module


def get_model_spec(family: str) -> ModelSpec:
    if family not in FAMILIES:
        raise KeyError(family)
    return importlib.import_module(FAMILIES[family]).model_spec


def configured_spec(family: str, model_cfg) -> ModelSpec:
    """The spec that trains model_cfg: the family's, or what its `configure` makes of it for this config."""
    spec = get_model_spec(family)
    return spec.configure(model_cfg) if spec.configure is not None else spec
