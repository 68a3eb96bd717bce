"""Strategy names: registered on import, resolvable by LightningCLI scripts that never import the package,
and by class path. Ported in spirit from Lightning's tests_pytorch/strategies/test_registry.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import lightning.pytorch as pl
from lightning.pytorch.strategies import StrategyRegistry

import lightning_merak
from lightning_merak import MerakStrategy
from tests.helpers.launch import REPO

CLI_SCRIPT = textwrap.dedent("""
    import sys
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringModel
    cli = LightningCLI(BoringModel, run=False, args=sys.argv[1:])
    s = cli.trainer.strategy
    assert "lightning_merak" in sys.modules  # imported lazily, by resolving the name
    print(type(s).__name__, s.config.pipeline_parallel_size, s.config.memory_manager)
""")


def _run_cli(tmp_path, *args: str) -> str:
    script = tmp_path / "cli_script.py"
    script.write_text(CLI_SCRIPT)
    out = subprocess.run([sys.executable, str(script), *args, "--trainer.accelerator=cpu", "--trainer.devices=1"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_registered_on_import():
    assert lightning_merak.MerakStrategy is MerakStrategy
    assert "merak" in StrategyRegistry and "merak_delta" in StrategyRegistry
    trainer = pl.Trainer(strategy="merak", accelerator="cpu", devices=1, logger=False)
    assert isinstance(trainer.strategy, MerakStrategy)
    assert StrategyRegistry.get("merak_delta").config.memory_manager == "delta"


def test_bare_name_in_cli_script_that_never_imports_the_package(tmp_path):
    assert _run_cli(tmp_path, "--trainer.strategy=merak") == "MerakStrategy 1 none"
    assert _run_cli(tmp_path, "--trainer.strategy=merak_delta") == "MerakStrategy 1 delta"


def test_merak_delta_name_trains_within_a_default_budget(tmp_path):
    """The bare name carries no budget: DELTA then keeps within 75 % of the device's memory, and says so."""
    script = tmp_path / "fit_script.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        from lightning.pytorch.cli import LightningCLI
        from lightning.pytorch.demos.boring_classes import BoringModel
        cli = LightningCLI(BoringModel, run=False, args=sys.argv[1:])
        cli.trainer.fit(cli.model)
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        print(cli.trainer.global_step, cli.trainer.strategy._engine.delta.ledger.budget_bytes == int(0.75 * ram))
    """))
    out = subprocess.run([sys.executable, str(script), "--trainer.strategy=merak_delta", "--trainer.accelerator=cpu",
                          "--trainer.devices=1", "--trainer.max_steps=2", "--trainer.logger=false"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "2 True"
    assert "memory_budget not set; DELTA keeps" in out.stderr


def test_class_path_with_init_args(tmp_path):
    line = _run_cli(tmp_path, "--trainer.strategy=lightning_merak.MerakStrategy",
                    "--trainer.strategy.pipeline_parallel_size=1")
    assert line == "MerakStrategy 1 none"


def test_import_hook_loads_neither_torch_nor_lightning():
    code = "import sys; print(sorted(m for m in ('torch', 'lightning', 'lightning_merak') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=60)
    assert out.stdout.strip() == "[]"
    hooked = subprocess.run([sys.executable, "-c", "import lightning_merak_autoload, sys; print('torch' in sys.modules)"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert hooked.stdout.strip() == "False"
