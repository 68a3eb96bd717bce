"""lightning_merak: ``Trainer(strategy="merak")`` gives automatic 3D parallelism and memory management."""

from lightning_merak.config import MerakConfigError
from lightning_merak.partition import plan_model
from lightning_merak.pipeline.microbatch import register_batch_split
from lightning_merak.strategy import MerakStrategy

__version__ = "0.1.0"


def _register() -> None:
    """Register every name of the autoload module's one list (it must stay importable without torch)."""
    from lightning.pytorch.strategies import StrategyRegistry

    from lightning_merak_autoload import STRATEGY_NAMES

    for name, (init_params, description) in STRATEGY_NAMES.items():
        StrategyRegistry.register(name, MerakStrategy, description=description, override=True, **init_params)


_register()

__all__ = ["MerakStrategy", "MerakConfigError", "plan_model", "register_batch_split"]
