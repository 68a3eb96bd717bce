"""The package's shape: no import cycles, private APIs only in ``_compat``, one list of schedules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "lightning_merak"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in PACKAGE.rglob("*.py")}


def _imports(tree: ast.Module, known: set[str]) -> set[str]:
    """Modules of the package this one imports, anywhere in it (function-level imports too)."""
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name in known:
                out.add(name)
    return out


def test_no_import_cycles_inside_the_package() -> None:
    modules = _modules()
    known = set(modules)
    graph = {m: _imports(tree, known) - {m} for m, tree in modules.items()}
    graph["lightning_merak"] = set()  # the public API imports everything; nothing inside may lean on it
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    # the layers: planning never imports the runtime, a mechanism never imports the Lightning glue
    for m, deps in graph.items():
        if m.startswith("lightning_merak.pipeline.plan"):
            assert not {d for d in deps if d.startswith("lightning_merak.pipeline.")
                        and not d.startswith("lightning_merak.pipeline.plan")}, m
        if m not in ("lightning_merak", "lightning_merak.strategy"):
            assert "lightning_merak.strategy" not in deps, f"{m} imports the strategy"


def test_private_torch_and_lightning_names_only_in_compat() -> None:
    """``from torch... import _x`` / ``from lightning... import _x`` and ``torch.utils._pytree`` stay in _compat."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("torch", "lightning"):
                if any(part.startswith("_") for part in node.module.split(".")) or any(
                        a.name.startswith("_") for a in node.names):
                    offenders.append(f"{path.name}: from {node.module} import ...")
            if isinstance(node, ast.Attribute) and node.attr in ("_pytree", "_local_tensor", "_version", "_parameters", "_buffers", "_optimizer",
                                                                  "_init_weights", "_qkv_same_embed_dim",
                                                                  "_reset_optimizers_and_schedulers"):
                offenders.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert not offenders, offenders


def test_one_schedule_registry() -> None:
    import inspect
    from typing import get_args

    from lightning_merak import MerakStrategy, strategy
    from lightning_merak.config import MerakConfig, MerakConfigError
    from lightning_merak.pipeline.plan.schedules import SCHEDULE_OPTIONS, SCHEDULES, Action

    annotation = inspect.signature(MerakStrategy.__init__).parameters["pipeline_schedule"].annotation
    hint = eval(annotation, vars(strategy))  # the strategy's hint, as jsonargparse reads it
    assert set(get_args(hint)) == set(SCHEDULE_OPTIONS) == set(SCHEDULES) | {"auto"}
    for name in SCHEDULES:
        MerakConfig(pipeline_schedule=name)
    try:
        MerakConfig(pipeline_schedule="nope")
    except MerakConfigError as err:
        assert all(name in str(err) for name in SCHEDULE_OPTIONS)
    for text in ("0F1", "2B3rc", "1F0pc", "0I2", "3W1", "1R0"):
        assert str(Action.parse(text)) == text
