"""The family contract holds from outside: launcher/ and parallel/ never name a family or call one of
its methods, every registered family fills the contract, and no two modules import each other."""
import ast
import inspect
import re
from pathlib import Path

import pytest
from torch import nn

from models import FAMILIES, get_model_spec

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("launcher", "parallel", "models", "data")
# The families of the design, built or not: none may be named by the framework.
FAMILY_NAMES = {*FAMILIES, "tokenformer", "matformer", "solo"}


def family_methods() -> set[str]:
    """Methods the families' model classes (and their modules) define beyond the contract."""
    contract = {"forward", "init_parameter"} | set(dir(nn.Module))
    methods = set()
    for family in FAMILIES:
        for cls in inspect.getmro(get_model_spec(family).model_cls):
            if cls.__module__.startswith("models."):
                methods |= {name for name, _ in inspect.getmembers(cls, inspect.isfunction)} - contract
    return methods


def framework_sources():
    for package in ("launcher", "parallel"):
        for path in sorted((REPO / package).rglob("*.py")):
            yield path.relative_to(REPO), path.read_text()


def test_framework_names_no_family_and_calls_no_family_method():
    methods = family_methods()
    assert {"end_step", "set_aux_loss_scale"} <= methods  # the scan sees the MoE's own methods
    words = re.compile(r"\b(" + "|".join(sorted(FAMILY_NAMES | methods)) + r")\b", re.IGNORECASE)
    found = [f"{path}:{n}: {line.strip()}" for path, text in framework_sources()
             for n, line in enumerate(text.splitlines(), 1) if words.search(line)]
    assert not found, "\n".join(found)


def test_the_scan_finds_a_family_name_where_there_is_one():
    """Negative control: the same pattern flags a line that names a family or calls its hook."""
    words = re.compile(r"\b(" + "|".join(sorted(FAMILY_NAMES | family_methods())) + r")\b", re.IGNORECASE)
    assert words.search("if cfg.model.family == 'MoE':") and words.search("part.end_step()")
    assert not words.search("the experts of a mixture-of-experts layer; llama_style")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_fills_the_contract(family):
    spec = get_model_spec(family)
    assert spec.name == family
    consumers = {key.consumer for key in spec.data.keys.values()}
    assert "inputs" in consumers and spec.loss.count is not None
    assert spec.split_stage is not None and spec.n_layers is not None
    assert spec.plan.tensor_parallel is not None and spec.plan.context_parallel is not None


def imports_of(path: Path, module: str) -> set[str]:
    """Project modules `path` (module name `module`) imports, at any depth of its code."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in PACKAGES}


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return {name: {m for m in imports_of(path, name) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_modules_or_packages():
    graph = import_graph()
    assert len(graph) > 50 and graph["launcher.trainer"]  # the walk sees the project
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(module.split(".")[0], set()).update(t.split(".")[0] for t in targets)
    packages = {p: targets - {p} for p, targets in packages.items()}
    assert find_cycle(packages) is None, " -> ".join(find_cycle(packages))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_a_parameter_without_an_init_rule_is_an_error():
    import torch

    from models.llm.model import LLMConfig, Transformer
    from parallel.init import init_parameters

    model = Transformer(LLMConfig(dim=16, n_layers=1, n_heads=2, vocab_size=32, multiple_of=16))
    model.layers["0"].extra = torch.nn.Linear(4, 4)  # a plain nn.Linear knows no init rule
    with pytest.raises(TypeError, match=r"layers.0.extra.weight belongs to a Linear, which has no init_parameter"):
        init_parameters(model, seed=0)


def test_resume_compares_the_architecture_not_how_it_is_computed():
    from launcher.errors import UserError
    from launcher.trainer import check_same_model
    from models.deltanet.model import DeltaNetConfig
    from models.spec import architecture

    saved = DeltaNetConfig(dim=32, n_heads=2, vocab_size=50, backend="chunked", chunk_size=64)
    meta = {"family": "deltanet", "model": architecture(saved)}
    assert "backend" not in meta["model"] and "chunk_size" not in meta["model"]
    check_same_model(meta, "deltanet", architecture(DeltaNetConfig(dim=32, n_heads=2, vocab_size=50,
                                                                   backend="recurrent", chunk_size=16)), Path("ckpt"))
    with pytest.raises(UserError, match="conv_size: checkpoint 4 vs config 2"):
        check_same_model(meta, "deltanet", architecture(DeltaNetConfig(dim=32, n_heads=2, vocab_size=50, conv_size=2)),
                         Path("ckpt"))
    with pytest.raises(UserError, match="ckpt holds a deltanet model, not a llm one"):  # not "a different shape"
        check_same_model(meta, "llm", architecture(saved), Path("ckpt"))
