"""Micro-batch RNG streams: dropout masks that do not depend on how the model is cut, scheduled or recomputed.

torch draws random numbers from one generator per device, in program order. A pipeline runs each stage's
blocks per micro-batch on its own rank, so with plain torch RNG its dropout masks cannot equal those of one
process. With streams (``MerakStrategy(rng="microbatch")``) the generator is reseeded

- at the start of each micro-batch, from the run's seed and the micro-batch's global index, and
- on entry to every module call, from the module's name and the seed then current, and on exit from the seed
  it was entered with.

So the masks a module draws depend only on (seed, micro-batch, module, call order), which is the same on one
process running the same micro-batches (gradient accumulation) and on any pipeline layout:

- a block that another stage owns (a zero stub here) leaves the generator as the real block would, since its
  exit seed depends only on its entry seed;
- recomputation restores the generator state of its start (``torch.utils.checkpoint``, Merak's
  pre-checkpointed forwards, DELTA's replays), after the entry reseed, and re-runs the same module calls.

The reseeds cost two generator seeds per module call: opt-in.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection

import torch
from torch import nn

_MASK64 = (1 << 64) - 1
_START, _EXIT, _STEP = 0x5354415254, 0x45584954, 0x53544550  # salts: "START", "EXIT", "STEP"
_BATCH = 0x4241544348  # "BATCH": a run of the user's step over the whole batch (a loss that couples the batch)


def mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): stable across processes, unlike ``hash``."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 29
    return h >> 1


class MicrobatchRNG:
    """Reseeds the generators of ``device`` (and the CPU's) at micro-batch starts and around module calls.

    ``root``'s submodules are hooked, except ``root`` itself and ``skip`` (modules called a different number of
    times in different layouts, e.g. a pipelined module the last stage enters twice). ``data_parallel``:
    (size, rank), so that replicas seeing different data draw different masks.
    """

    def __init__(self, root: nn.Module, seed: int, device: torch.device, skip: Collection[nn.Module] = (),
                 data_parallel: tuple[int, int] = (1, 0)) -> None:
        self.seed = int(seed)
        self.device = device
        self.dp_size, self.dp_rank = data_parallel
        self._entered: list[int] = []
        self._handles: list = []
        skipped = {id(m) for m in skip} | {id(root)}
        self._modules = [(module, zlib.crc32(name.encode())) for name, module in root.named_modules()
                         if id(module) not in skipped]
        self.install()

    def install(self) -> None:
        """Hook every module call (again after ``remove``)."""
        if self._handles:
            return
        for module, ident in self._modules:
            self._handles.append(module.register_forward_pre_hook(self._enter(ident)))
            self._handles.append(module.register_forward_hook(self._exit))

    def index(self, batch_index: int, micro: int, num_micro: int) -> int:
        """Global index of micro-batch ``micro`` of the ``batch_index``-th batch of training (counting the batches
        of accumulation windows), on this data-parallel replica."""
        return ((batch_index * num_micro) + micro) * self.dp_size + self.dp_rank

    def start(self, batch_index: int, micro: int = 0, num_micro: int = 1) -> None:
        """Begin a micro-batch: what runs next, the user's step before the model included, draws from its stream."""
        self._entered.clear()  # a pipeline stage's forward stops early (mid-module): its exits never run
        self._reseed(mix(self.seed, self.index(batch_index, micro, num_micro), _START))

    def start_batch(self, batch_index: int) -> None:
        """Begin a run of the user's step over the whole batch (capture and last stage draw alike)."""
        self._entered.clear()
        self._reseed(mix(self.seed, self.index(batch_index, 0, 1), _BATCH))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _enter(self, ident: int):
        def hook(module: nn.Module, args: tuple) -> None:
            seed = mix(ident, torch.initial_seed())
            self._entered.append(seed)
            self._reseed(seed)
        return hook

    def _exit(self, module: nn.Module, args: tuple, output: object) -> None:
        if self._entered:
            self._reseed(mix(self._entered.pop(), _EXIT))

    def _reseed(self, seed: int) -> None:
        _reseed(seed, self.device)


class StepStreams:
    """The default under a pipeline (``rng="torch"``): the user's step sees the same random numbers on every stage.

    A pipeline runs the start of ``training_step`` twice per micro-batch: on the first stage, to capture the model's
    inputs, and on the last, as the loss. Noise drawn there (a diffusion target, MLM masking, augmentation) must be
    the same numbers both times, so the generators are seeded from (seed, micro-batch's global index) before each
    run of the step for that micro-batch. Modules are not hooked: dropout inside the model draws as torch draws
    (see ``MicrobatchRNG`` for masks that do not depend on the layout).
    """

    def __init__(self, seed: int, device: torch.device, data_parallel: tuple[int, int] = (1, 0)) -> None:
        self.seed = int(seed)
        self.device = device
        self.dp_size, self.dp_rank = data_parallel

    def index(self, batch_index: int, micro: int, num_micro: int) -> int:
        return ((batch_index * num_micro) + micro) * self.dp_size + self.dp_rank

    def start(self, batch_index: int, micro: int = 0, num_micro: int = 1) -> None:
        _reseed(mix(self.seed, self.index(batch_index, micro, num_micro), _STEP), self.device)

    def start_batch(self, batch_index: int) -> None:
        """Before a run of the user's step over the whole batch (a loss that couples the batch)."""
        _reseed(mix(self.seed, self.index(batch_index, 0, 1), _BATCH), self.device)

    def install(self) -> None:
        """Nothing to install: no hooks."""

    def remove(self) -> None:
        """Nothing to remove: no hooks."""


def _reseed(seed: int, device: torch.device) -> None:
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)


def batch_index(trainer: object, batch_idx: int) -> int:
    """The training batch's position in the run, the same for one process accumulating over micro-batches and a
    pipeline splitting its batch into them: optimizer steps so far × batches per step + position in the window."""
    accumulate = trainer.accumulate_grad_batches
    return trainer.global_step * accumulate + batch_idx % accumulate
