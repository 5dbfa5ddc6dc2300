"""Imports run one way, `kernels` <- `flux_model` <- `engine` <- `bench`: a module never imports a package above its
own, not even deferred inside a function. Read off the source with ast, so imports that never run are caught too."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("kernels", "flux_model", "engine", "bench")


def imported_modules(source: str, module: str):
    """(line, dotted name: a module, or `module.name` for `from module import name`) of every import in `source`, the text of module `module` (dotted, a package's
    `__init__` included): `import` and `from` statements anywhere in the file, relative ones resolved, and
    `importlib.import_module("literal")`."""
    package = module.split(".")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            # relative: from the module's package, one level up per extra dot
            parent = package[:len(package) - node.level] if node.level else []
            base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:  # `from .. import engine` imports the module `engine`
                yield node.lineno, f"{base}.{alias.name}" if base else alias.name
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.lineno, node.args[0].value


def upward_imports(source: str, module: str) -> list[str]:
    """The imports of `module` that reach a package above its own layer."""
    own = LAYERS.index(module.split(".")[0])
    return [f"{module}:{line} imports {name}" for line, name in imported_modules(source, module)
            if name.split(".")[0] in LAYERS and LAYERS.index(name.split(".")[0]) > own]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def test_no_import_runs_back_up():
    files = [path for package in LAYERS for path in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 30  # the packages were found
    violations = [v for path in files for v in upward_imports(path.read_text(), module_name(path))]
    assert not violations, "\n".join(violations)


def test_the_checker_sees_deferred_and_relative_imports():
    source = '''
import torch
from kernels.qtensor import QTensor

def load(path):
    from engine.checkpoints import load_checkpoint
    import bench.kernels
    return load_checkpoint(path)

from ..engine import errors
from . import autoencoder
importlib.import_module("engine.loading")
'''
    found = upward_imports(source, "flux_model.model")
    assert sorted(v.split(" imports ")[1] for v in found) == [
        "bench.kernels", "engine.checkpoints.load_checkpoint", "engine.errors", "engine.loading"]
    assert upward_imports("from . import model\nfrom .. import engine", "flux_model.__init__") == [
        "flux_model.__init__:2 imports engine"]
    assert upward_imports("from flux_model import Flux\nimport kernels", "engine.loading") == []
