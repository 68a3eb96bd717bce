"""Make ``strategy="merak"`` resolvable in processes that never import ``lightning_merak``.

Lightning has no entry-point group for strategies, so this module (loaded by a ``.pth`` file at interpreter
start) installs a tiny import hook. It imports nothing heavy: only when ``lightning.pytorch.strategies`` (or
``pytorch_lightning.strategies``) is imported does it add the strategy names to that registry, as factories
that import ``lightning_merak`` on first use. Processes that never import Lightning pay one small import.
"""

import importlib.abc
import importlib.machinery
import sys

_WATCHED = ("lightning.pytorch.strategies", "pytorch_lightning.strategies")

# name -> (init params, description); the single list of registered names (MerakStrategy reads it too)
STRATEGY_NAMES = {
    "merak": ({}, "Merak 3D parallelism (data x pipeline x tensor) with default options"),
    "merak_delta": ({"memory_manager": "delta"}, "Merak with the DELTA activation memory manager"),
}


def _lazy_factory(name: str):
    def make(**kwargs):
        from lightning_merak.strategy import MerakStrategy

        return MerakStrategy(**{**STRATEGY_NAMES[name][0], **kwargs})

    return make


def register_lazy(registry) -> None:
    """Register every Merak strategy name in ``registry`` without importing torch-heavy modules."""
    for name, (_, description) in STRATEGY_NAMES.items():
        if name not in registry:
            registry.register(name, _lazy_factory(name), description=description)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _WATCHED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            try:
                register_lazy(module.StrategyRegistry)
            except Exception:  # never break Lightning's own import
                pass

        spec.loader.exec_module = exec_module
        return spec


if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())
