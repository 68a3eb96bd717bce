"""MerakStrategy: the Lightning glue.

Each hook follows the Trainer's lifecycle and calls into the mechanism packages: ``topology`` for the 3D mesh,
``pipeline`` (partitioning, stages, schedules) for pipeline parallelism, ``tensor_parallel`` and ``memory``.
Nothing algorithmic lives here.
"""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import Generator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from torch import Tensor
from torch.distributed.constants import default_pg_timeout

from lightning_merak import checkpoint as ckpt
from lightning_merak import failures, topology
from lightning_merak._compat import (
    TrainerFn,
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _optimizers_to_device,
    _SubprocessScriptLauncher,
    _sync_ddp_if_available,
    dataloader_for,
    install_clip_grad_by_norm,
    reset_optimizers,
    skip_lightning_backward,
    unwrap_optimizer,
)
from lightning_merak.config import MerakConfig, MerakConfigError, check_precision
from lightning_merak.pipeline.engine import StepContext
from lightning_merak.pipeline.plan.schedules import SCHEDULE_OPTIONS
from lightning_merak.pipeline.takeover import replay_logs
from lightning_merak.pretrained import lazy_from_pretrained
from lightning_merak.zero import data_parallel_optimizer

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch.distributed.device_mesh import DeviceMesh

log = logging.getLogger(__name__)


class MerakStrategy(ParallelStrategy):
    """Automatic 3D parallelism (data x pipeline x tensor) for an unmodified LightningModule.

    Args:
        data_parallel_size: replicas; ``"auto"`` = world size // (pipeline x tensor sizes).
        pipeline_parallel_size: pipeline stages; the pipelined module is cut automatically (see ``partition``).
        tensor_parallel_size: tensor-parallel group size (layers sharded with an automatic plan).
        num_microbatches: micro-batches per batch in the pipeline; default 2 x pipeline size (1 without a pipeline).
        pipeline_schedule: "auto" (default: the simulator chooses among all schedules, one or two stages per rank,
            with their recompute ratios) or one of ``pipeline.plan.schedules.SCHEDULES`` ("shifted_critical_path"
            (Merak), "1f1b", "gpipe", "interleaved_1f1b", "zbv").
        partition: "auto" or the module names (relative to the pipelined module) where stages 1.. begin.
        recompute: "stage_aware", "none", "full", or a float: Merak's first-stage recompute ratio.
        subtensor_chunks: sub-tensor TP overlap chunks; 1 disables the overlap.
        memory_manager: "none" or "delta" (dynamic swap-or-recompute of saved activations).
        memory_budget: bytes per device, or a string like "20GiB"; with DELTA and no budget, 75 % of the device's
            memory.
        pipeline_module: attribute path of the submodule to pipeline; "auto" = the child with most parameters.
        trace_dir: where per-rank timelines (Chrome trace JSON) of real pipeline steps are written.
        rng: "torch" (as is) or "microbatch": the generators are reseeded per micro-batch and around every module
            call, so dropout masks are the same in any pipeline layout, schedule and recompute mode, and in one
            process accumulating gradients over the same micro-batches (see ``lightning_merak.rng``).
        swap_dir: where DELTA's swap file goes on CPU-only runs (created if missing); default: a disk-backed
            temporary folder (the system one unless it is RAM-backed tmpfs, then /var/tmp), see
            ``memory.swap.default_swap_dir``.
        zero_stage: 0 (every data-parallel replica holds the whole optimizer state), 1 (each replica owns a
            balanced share of the parameters by bytes, keeps optimizer state for those only, steps them and
            all-gathers the new values) or 2 (as 1, and gradients are reduce-scattered instead of all-reduced, so
            from the sync on each replica holds only its owned ones; pipeline_parallel_size=1 only). Any optimizer
            but LBFGS; see ``lightning_merak.zero``.
        batch_loss: under a pipeline, "auto" (default: the first step compares, on the last stage, the loss of the
            whole batch with the mean of the micro-batch losses; where they differ the loss couples the batch, as
            in-batch negatives or a mean over a varying count of real tokens do, and the last stage computes it
            once over every micro-batch, with every forward before any backward), "whole" (always so) or
            "microbatch" (one loss per micro-batch, averaged: gradient accumulation's semantics).
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin: as for any
            Lightning ParallelStrategy (normally filled in by the Trainer).
        process_group_backend: "gloo" on CPU, "nccl" on GPU by default.
        timeout: process group timeout (short values make a deadlock fail fast).
        start_method: only "popen" (Lightning's subprocess launcher) or an external launcher (torchrun, SLURM).
    """

    strategy_name = "merak"

    def __init__(
        self,
        data_parallel_size: Union[int, Literal["auto"]] = "auto",
        pipeline_parallel_size: int = 1,
        tensor_parallel_size: int = 1,
        num_microbatches: Optional[int] = None,
        pipeline_schedule: Literal[SCHEDULE_OPTIONS] = "auto",
        partition: Union[Literal["auto"], list[str]] = "auto",
        recompute: Union[Literal["stage_aware", "none", "full"], float] = "stage_aware",
        subtensor_chunks: int = 2,
        memory_manager: Literal["none", "delta"] = "none",
        memory_budget: Union[int, str, None] = None,
        pipeline_module: str = "auto",
        trace_dir: Optional[str] = None,
        rng: Literal["torch", "microbatch"] = "torch",
        zero_stage: Literal[0, 1, 2] = 0,
        batch_loss: Literal["auto", "whole", "microbatch"] = "auto",
        swap_dir: Optional[str] = None,
        accelerator: Optional[pl.accelerators.Accelerator] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin)
        self.config = MerakConfig(
            data_parallel_size=data_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
            tensor_parallel_size=tensor_parallel_size, num_microbatches=num_microbatches,
            pipeline_schedule=pipeline_schedule, partition=partition, recompute=recompute,
            subtensor_chunks=subtensor_chunks, memory_manager=memory_manager, memory_budget=memory_budget,
            pipeline_module=pipeline_module, trace_dir=trace_dir, rng=rng, zero_stage=zero_stage,
            batch_loss=batch_loss,
            swap_dir=swap_dir,
        )
        if start_method != "popen":
            raise MerakConfigError(
                f"start_method={start_method!r} is not supported: Lightning's multiprocessing launcher (spawn/fork) "
                "hands rank 0's weights back to the parent process, but under pipeline or tensor parallelism rank 0 "
                "holds only its own stage/shard, so the model you get back would be silently incomplete. Use the "
                "default start_method='popen' (Lightning re-runs your script per rank), or launch with torchrun/SLURM."
            )
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._device_mesh: Optional[DeviceMesh] = None
        self._engine: Any = None  # built in setup: PipelineEngine (pp > 1) or LocalEngine; steps delegate to it
        self._data_parallel: dict[int, Any] = {}  # id(optimizer) -> its Replicated/ShardedOptimizer (zero.py)
        self._run_failed = False  # set by on_exception: teardown then runs no collective
        self.num_nodes = 1

    # ----------------------------------------------------------------------------------------- topology
    @property
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def is_distributed(self) -> bool:
        return True

    @property
    def device_mesh(self) -> DeviceMesh:
        if self._device_mesh is None:
            raise RuntimeError("The Merak device mesh exists only after the process group is set up.")
        return self._device_mesh

    @property
    def sizes(self) -> tuple[int, int, int]:
        """(dp, pp, tp), validated against the world size."""
        return self.config.resolve_world(self.num_nodes * max(self.num_processes, 1))

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # every pipeline/tensor rank of one replica must draw the same samples
        return {"num_replicas": topology.size(self._device_mesh, "dp"),
                "rank": topology.local_rank(self._device_mesh, "dp")}

    @property
    def process_group_backend(self) -> Optional[str]:
        return self._process_group_backend

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the stage must exist before its shard of the checkpoint is loaded

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # optimizer state is loaded from the sharded checkpoint in load_checkpoint

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = self.global_rank

    def _configure_launcher(self) -> None:
        # Validate everything that can be known before any process starts: a wrong size or precision fails
        # here, once, in the launching process (and on each rank under an external launcher).
        self.config.warn_zero_without_replicas(self.sizes[0])  # the sizes raise MerakConfigError on a bad world
        if self.precision_plugin is not None:
            check_precision(getattr(self.precision_plugin, "precision", "32-true"))
        assert self.cluster_environment is not None
        if not self.cluster_environment.creates_processes_externally:
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    def setup_environment(self) -> None:
        super().setup_environment()
        reset_seed()
        self.set_world_ranks()
        dp, pp, tp = self.sizes
        backend = self._process_group_backend or _get_default_process_group_backend_for_device(self.root_device)
        self._process_group_backend = backend
        device_id = self.root_device if self.root_device.type != "cpu" else None
        if not _distributed_is_initialized():
            topology.own_default_group()  # destroyed at exit; another strategy in this process reuses it
        _init_dist_connection(self.cluster_environment, backend, timeout=self._timeout, device_id=device_id)
        if self._device_mesh is not None:  # validate/test after fit with this Trainer: its stage holds these groups
            if not topology.reclaim(self._process_groups()):
                raise RuntimeError(
                    "This MerakStrategy's process groups were destroyed when another MerakStrategy was set up in this "
                    "process, so its pipeline stage and tensor-parallel shards cannot run again. Build a new Trainer "
                    "and LightningModule (or load a checkpoint) for further runs."
                )
        else:
            topology.destroy_retired()  # earlier strategies' groups: one set of groups per process at a time
            self._device_mesh = topology.build_mesh(self.root_device.type, dp, pp, tp, timeout=self._timeout)
        self._run_failed = False
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh
        hosts = [None] * self.world_size
        dist.all_gather_object(hosts, f"{socket.gethostname()}:{self.root_device}")
        rank_zero_info(topology.topology_table(dp, pp, tp, hosts))

    # ----------------------------------------------------------------------------------------- setup
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        if self._engine is not None:  # validate/test after fit: the same stage, its hooks installed again
            self._engine.attach()
        else:
            # nothing moves to the device before the cut: the recipe materialises only this rank's part
            self.model = self.precision_plugin.convert_module(self.model)
            self._engine = self._build_engine(trainer)
            topology.broadcast_module(self.lightning_module, topology.group(self._device_mesh, "dp"),
                                      topology.size(self._device_mesh, "dp"))
            topology.sync_metrics_over(self.lightning_module, topology.group(self._device_mesh, "dp"))
        self.barrier("merak_setup")
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)
        install_clip_grad_by_norm(self.precision_plugin, self._clip_grad_by_norm)

    def _build_engine(self, trainer: pl.Trainer) -> Any:
        """The build recipe (``parallelize.build_engine``) fed with the first batch of the running loop."""
        from lightning_merak.parallelize import build_engine

        step_name = STEP_FOR[trainer.state.fn]
        return build_engine(self.lightning_module, self._first_batch(trainer), step_name, self.config,
                            self._device_mesh, self.root_device, timeout=self._timeout,
                            optimizer_states=self._optimizer_states(trainer))

    def _optimizer_states(self, trainer: pl.Trainer) -> float | None:
        """Weight-sized optimizer tensors per parameter on one rank, for a partition that must fit
        ``memory_budget``: the optimizer is made after the cut, so ``configure_optimizers`` is called once more
        here, on the whole (possibly meta) module, and what it returns is measured (``weight_sized_states``) and
        dropped. Only with a budget, a pipeline and a fit; None elsewhere or where it cannot be told."""
        from lightning_merak._compat import configured_optimizers, unwrap_optimizer
        from lightning_merak.zero import weight_sized_states

        if self.config.budget_bytes is None or self.sizes[1] == 1 or trainer.state.fn != TrainerFn.FITTING:
            return None
        try:
            optimizers = configured_optimizers(self.lightning_module)
        except Exception as err:  # noqa: BLE001 — e.g. a fused optimizer refusing meta weights
            rank_zero_info(f"Merak memory_budget: configure_optimizers could not run before the cut ({err}); the "
                           "partition assumes Adam's two weight-sized states per parameter")
            return None
        if not optimizers:
            return 0.0  # nothing to step: weights and gradients only
        copies = [weight_sized_states(unwrap_optimizer(o)) for o in optimizers]
        if any(c is None for c in copies):
            rank_zero_info("Merak memory_budget: the optimizer's state could not be measured; the partition "
                           "assumes Adam's two weight-sized states per parameter")
            return None
        states = max(copies)  # several optimizers hold disjoint parameters: each parameter has one's state
        if self.config.zero_stage > 0:
            states /= self.sizes[0]  # sharded over the data-parallel replicas (one parameter's rounding aside)
        rank_zero_info(f"Merak memory_budget: {', '.join(type(unwrap_optimizer(o)).__name__ for o in optimizers)} "
                       f"keeps {states:g} weight-sized state tensor(s) per parameter on each rank; counted in each "
                       "stage's bytes")
        return states

    def _first_batch(self, trainer: pl.Trainer) -> Any:
        """The first batch of the running loop, on this rank's device; the RNG state is restored afterwards, so
        drawing it does not shift the run's randomness."""
        states = (torch.get_rng_state(), random.getstate())
        try:
            loaders = dataloader_for(trainer)
            loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
            if isinstance(loader, dict):
                loader = next(iter(loader.values()))
            batch = next(iter(loader))
        finally:
            torch.set_rng_state(states[0])
            random.setstate(states[1])
        return self.batch_to_device(batch)

    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        reset_optimizers(self)  # re-entering setup (validate after fit) rebuilds them
        super().setup_optimizers(trainer)
        dp_group, dp = topology.group(self._device_mesh, "dp"), topology.size(self._device_mesh, "dp")
        self._data_parallel = {id(opt): data_parallel_optimizer(opt, self.config.zero_stage, dp_group, dp)
                               for opt in self.optimizers}
        if topology.size(self._device_mesh, "tp") > 1:
            from lightning_merak.tensor_parallel import make_optimizer_checkpointable

            for optimizer in self.optimizers:  # per-head (strided) shards of fused q|k|v: see tensor_parallel
                make_optimizer_checkpointable(optimizer)

    def model_to_device(self) -> None:
        """Only this rank's part is ever on the device; ``setup`` puts it there (``parallelize.build_engine``)."""

    @contextmanager
    def tensor_init_context(self, empty_init: Optional[bool] = None) -> Generator[None, None, None]:
        """``configure_model()`` and ``trainer.init_module(empty_init=True)`` build on the meta device; ``setup``
        materialises only this rank's tensors after the cut, with each module's own init. A plain
        ``trainer.init_module()`` builds real weights on the CPU (the user may load or edit them before ``fit``;
        on meta that would silently do nothing), which the cut still comes before."""
        module = self.lightning_module
        in_configure_model = empty_init is None and module is not None  # Lightning's call around the hook
        device = torch.device("meta") if empty_init is True or in_configure_model else torch.device("cpu")
        before = {id(t) for t in _tensors(module)} if module is not None else None
        with device, self.precision_plugin.tensor_init_context(), lazy_from_pretrained():
            yield
        if before is not None:  # configure_model: what it made must be where it was asked to be made
            placed = [(n, t.device) for n, t in _named_tensors(module) if id(t) not in before and t.device != device]
            if placed:
                name, where = placed[0]
                raise MerakConfigError(
                    f"configure_model() created `{name}` on {where}, but under MerakStrategy it runs on the "
                    f"{device.type} device: the strategy cuts the model first and then materialises only this "
                    "rank's part on its device. Build the model without device= or .to(...) in configure_model()."
                )

    def _clip_grad_by_norm(self, optimizer: Any, clip_val: Union[int, float]) -> None:
        """Clip by the global norm over the whole model (all stages and shards), not the local one."""
        from lightning_merak.tensor_parallel import clip_grad_norm_

        params = [p for g in optimizer.param_groups for p in g["params"]]
        # a weight tied across stages has a copy (with the same summed gradient) on each: count one
        copies = self._engine.tied_copies()
        norm = clip_grad_norm_([p for p in params if id(p) not in copies], float(clip_val),
                               self._norm_groups(self._data_parallel[id(unwrap_optimizer(optimizer))]))
        coef = min(1.0, float(clip_val) / (float(norm) + 1e-6))
        for p in params:
            if id(p) in copies and p.grad is not None:
                p.grad.mul_(coef)

    def _norm_groups(self, data_parallel: Any) -> list[Any]:
        """Groups whose gradients are disjoint shards of one model: pipeline stages, tensor shards and, under ZeRO,
        the data-parallel owners."""
        dims = ("dp", "pp", "tp") if data_parallel.shards_gradients else ("pp", "tp")
        return [topology.group(self._device_mesh, d) for d in dims if topology.size(self._device_mesh, d) > 1]

    # ----------------------------------------------------------------------------------------- steps
    def on_train_start(self) -> None:
        if self._engine.runs_backward:  # the pipeline schedule runs backward (and zero_grad) itself
            skip_lightning_backward(self.lightning_module.trainer)

    def _step_context(self, args: tuple, kwargs: dict) -> StepContext:
        trainer = self.lightning_module.trainer
        batch_idx = int(kwargs["batch_idx"] if "batch_idx" in kwargs else args[1])
        accumulate = trainer.accumulate_grad_batches
        return StepContext(batch_idx=batch_idx, global_step=trainer.global_step,
                           starts_window=batch_idx % accumulate == 0, loss_scale=1.0 / accumulate,
                           rng_batch=trainer.global_step * accumulate + batch_idx % accumulate)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.train_step_context():
            result = self._engine.training_step(self._step_context(args, kwargs), *args, **kwargs)
        replay_logs(self.lightning_module, result.logs)
        return result.output

    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        """Average gradients over the data-parallel replicas once per optimizer step (after the last backward of
        an accumulation window, before clipping), step, exchange what ZeRO's owners stepped, then log what the
        engine measured (DELTA's ledger)."""
        step = self.lightning_module.trainer.global_step
        data_parallel = self._data_parallel[id(unwrap_optimizer(optimizer))]

        def closure_then_sync() -> Any:
            result = closure()
            self.sync_data_parallel_grads(data_parallel)
            return result

        out = super().optimizer_step(optimizer, closure_then_sync, model, **kwargs)
        data_parallel.after_step()
        self.log_memory(self._engine.end_step(step))
        return out

    def log_memory(self, stats: dict[str, float]) -> None:
        """DELTA's per-step ledger (bytes kept, swapped, recomputed, peak) as metrics of this rank."""
        assert self.lightning_module is not None
        for name, value in stats.items():
            self.lightning_module.log(name, float(value), on_step=True, on_epoch=False, rank_zero_only=True)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.val_step_context():
            return self._eval_step("validation_step", args, kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.test_step_context():
            return self._eval_step("test_step", args, kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.predict_step_context():
            return self._eval_step("predict_step", args, kwargs)

    def _eval_step(self, hook: str, args: tuple, kwargs: dict) -> Any:
        # every rank runs the user's hook itself (its self.log calls included): nothing to replay
        return self._engine.eval_step(hook, *args, **kwargs).output

    def sync_data_parallel_grads(self, data_parallel: Any) -> None:
        """Average this replica's gradients with the other data-parallel replicas (under ZeRO, each rank is left
        with those of the parameters it owns)."""
        assert self.lightning_module is not None
        data_parallel.sync_gradients([p for p in self.lightning_module.parameters() if p.requires_grad])

    # ----------------------------------------------------------------------------------------- collectives
    def barrier(self, name: Optional[str] = None) -> None:
        if _distributed_is_initialized():
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def reduce(self, tensor: Union[Tensor, Any], group: Optional[Any] = None,
               reduce_op: Optional[Union[dist.ReduceOp, str]] = "mean") -> Union[Tensor, Any]:
        """``self.log(sync_dist=True)`` reduces over the data-parallel group: pipeline/tensor ranks of one
        replica already hold the same value."""
        if not isinstance(tensor, Tensor) or not _distributed_is_initialized():
            return tensor
        if group is None:
            group = topology.group(self._device_mesh, "dp")
        return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        if not _distributed_is_initialized():
            return decision
        value = torch.tensor(int(decision), device=self.root_device)
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return bool(value == self.world_size) if all else bool(value)

    # ----------------------------------------------------------------------------------------- checkpoints
    def lightning_module_state_dict(self) -> dict[str, Any]:
        return {}  # the sharded weights are written by save_checkpoint straight from the module

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        return {}

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # done in load_checkpoint, shard by shard

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        pass

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("MerakStrategy.save_checkpoint(storage_options=...) is not supported: checkpoints are "
                            "written with torch.distributed.checkpoint.")
        ckpt.check_checkpoint_io(self._checkpoint_io)
        path = ckpt.local_path(self.broadcast(str(filepath)))
        assert self.lightning_module is not None
        ckpt.save_sharded(path, checkpoint, self.lightning_module, self.optimizers, self.is_global_zero,
                          stage=topology.local_rank(self._device_mesh, "pp"),
                          stage_of=self._engine.stage_of_parameters(), tied=self._engine.tied_names())

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """``weights_only=False`` (Lightning's argument) trusts the checkpoint; otherwise it loads as data only."""
        path = ckpt.local_path(self.broadcast(str(checkpoint_path)))
        assert self.lightning_module is not None
        tied = self._engine.tied_names() if self._engine is not None else {}  # loaded before setup: nothing cut
        return ckpt.load(path, self.lightning_module, self.optimizers, strict=self.lightning_module.strict_loading,
                         weights_only=weights_only, tied=tied)

    def remove_checkpoint(self, filepath: Any) -> None:
        path = ckpt.local_path(filepath)
        # on every rank, so a refusal stops all of them, and all have checked before rank 0 deletes anything
        failures.agree(lambda: ckpt.check_removable(path), f"the check before removing {path}")
        if self.is_global_zero:
            ckpt.remove(path)

    def _first_of_stage(self) -> bool:
        """The rank that speaks for its pipeline stage: data- and tensor-parallel coordinate 0."""
        return topology.local_rank(self._device_mesh, "dp") == 0 and topology.local_rank(self._device_mesh, "tp") == 0

    # ----------------------------------------------------------------------------------------- failures
    def on_exception(self, exception: BaseException) -> None:
        """A failure on this rank must not leave its peers waiting for the timeout: the process leaves as soon as
        the exception has ended the script (``lightning_merak.failures``); teardown then skips its collectives."""
        self._run_failed = True
        if self.world_size > 1:
            failures.record_failure(exception)

    # ----------------------------------------------------------------------------------------- teardown
    def teardown(self) -> None:
        """End of a fit/validate/test/predict: report DELTA's ledger; the engine closes DELTA and removes every hook
        and wrapper it installed; then, once nothing is in flight on any rank (async all-reduces, pipeline
        sends and receives: ``topology.quiesce``), the process groups the strategy made are retired. The module
        stays pruned to this rank's stage, so a later validate/test with this Trainer reuses it and its groups
        (``setup`` attaches the engine again); the next strategy set up in this process, or the process's exit,
        destroys them (``topology``)."""
        if self._engine is not None:
            report = self._engine.memory_report(self.global_rank)
            if report is not None and self._first_of_stage():
                print(report, flush=True)
            self._engine.teardown()
        if self._device_mesh is not None:
            if not self._run_failed:  # after a failure a peer may be gone: no collective
                topology.quiesce(self.root_device)
            topology.retire(self._process_groups())
        assert self.cluster_environment is not None and self.accelerator is not None
        self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()

    def _process_groups(self) -> list[Any]:
        """The groups this strategy made: the mesh's, and the engine's for weights tied across stages."""
        tied = [grp for grp, _, _ in getattr(self._engine, "tied_groups", [])]
        return topology.mesh_groups(self._device_mesh) + tied


def _named_tensors(module: Any) -> list[tuple[str, Tensor]]:
    return list(module.named_parameters()) + list(module.named_buffers())


def _tensors(module: Any) -> list[Tensor]:
    return [t for _, t in _named_tensors(module)]


STEP_FOR = {TrainerFn.FITTING: "training_step", TrainerFn.VALIDATING: "validation_step",
            TrainerFn.TESTING: "test_step", TrainerFn.PREDICTING: "predict_step"}
