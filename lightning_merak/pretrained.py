"""Pretrained weights read in shards: ``from_pretrained(folder)`` in ``configure_model()`` reads nothing at once.

Under ``MerakStrategy.tensor_init_context`` (which Lightning enters around ``configure_model``) a transformers
model's ``from_pretrained`` builds the model on the meta device from the folder's config and remembers the
folder (``SafetensorsCheckpoint``). After the cut, ``materialize`` reads each local tensor from the files with
safetensors' lazy ``safe_open`` — only this rank's tensors are ever read, and of a tensor-parallel weight only
this rank's slice (``get_slice``). Keys the files lack (a tied head
stored once) get the model's own init and are made equal to their tie by the build recipe.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_LOADING_KWARGS = ("torch_dtype", "dtype", "device_map", "low_cpu_mem_usage", "local_files_only", "revision",
                   "trust_remote_code", "use_safetensors", "cache_dir", "force_download", "token")


class PretrainedFolderError(ValueError):
    """``from_pretrained`` was given something this strategy cannot read lazily; the message says what to do."""


class SafetensorsCheckpoint:
    """The tensors of a local transformers checkpoint folder (one file, or shards with an index), read lazily."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        if (folder / INDEX_FILE).is_file():
            self.file_of = {k: folder / f for k, f in json.loads((folder / INDEX_FILE).read_text())["weight_map"].items()}
        elif (folder / SINGLE_FILE).is_file():
            from safetensors import safe_open

            with safe_open(str(folder / SINGLE_FILE), framework="pt") as f:
                self.file_of = {k: folder / SINGLE_FILE for k in f.keys()}
        else:
            raise PretrainedFolderError(
                f"{folder} holds no {SINGLE_FILE} or {INDEX_FILE}: MerakStrategy reads pretrained weights from "
                "safetensors files only (save the model with save_pretrained(..., safe_serialization=True))."
            )
        self._open: dict[Path, Any] = {}
        self.read_keys: list[str] = []

    def key_for(self, name: str, base_prefix: str) -> str | None:
        """The file's key for a module's tensor name: as is, or with/without the base model's prefix."""
        for key in (name, f"{base_prefix}.{name}" if base_prefix else None,
                    name[len(base_prefix) + 1:] if base_prefix and name.startswith(base_prefix + ".") else None):
            if key is not None and key in self.file_of:
                return key
        return None

    def read(self, key: str, like: torch.Tensor) -> torch.Tensor:
        """One tensor, checked against the shape the module expects; of a tensor-parallel parameter (a DTensor)
        only this rank's slice is read."""
        from safetensors import safe_open

        from lightning_merak.tensor_parallel.shards import shard_index

        path = self.file_of[key]
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt", device="cpu")
        handle = self._open[path]
        lazy = handle.get_slice(key)
        shape = tuple(lazy.get_shape())
        if shape != tuple(like.shape):
            raise PretrainedFolderError(
                f"{self.folder}: tensor `{key}` has shape {list(shape)} in {path.name}, but the model built from the "
                f"folder's config expects {list(like.shape)}. The folder's weights do not belong to this config."
            )
        self.read_keys.append(key)
        index = shard_index(like)
        return handle.get_tensor(key) if index is None else index.read(lazy)

    def close(self) -> None:
        self._open.clear()


def _local_folder(path: Any) -> Path:
    folder = Path(str(path))
    if not folder.is_dir():
        raise PretrainedFolderError(
            f"from_pretrained({str(path)!r}) under MerakStrategy: {str(path)!r} is not a local folder. The strategy "
            "reads pretrained weights lazily from a local checkpoint folder and never downloads (there may be no "
            "network). Download or save the model to a folder first (save_pretrained, or huggingface-cli download) "
            "and pass that folder."
        )
    return folder


@contextmanager
def lazy_from_pretrained() -> Iterator[None]:
    """Within the context, ``PreTrainedModel.from_pretrained(folder)`` builds on meta and remembers the folder."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        yield
        return
    original = PreTrainedModel.__dict__["from_pretrained"]

    def from_pretrained(cls: Any, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        folder = _local_folder(pretrained_model_name_or_path)
        checkpoint = SafetensorsCheckpoint(folder)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        config = kwargs.pop("config", None)
        for name in _LOADING_KWARGS:
            kwargs.pop(name, None)
        if config is None:
            config, unused = cls.config_class.from_pretrained(folder, return_unused_kwargs=True, **kwargs)
        model = cls(config, *args)
        if isinstance(dtype, torch.dtype):
            model.to(dtype)
        model.name_or_path = str(folder)
        model._merak_checkpoint = checkpoint
        return model

    PreTrainedModel.from_pretrained = classmethod(from_pretrained)
    try:
        yield
    finally:
        PreTrainedModel.from_pretrained = original


def checkpoint_of(model: Any) -> SafetensorsCheckpoint | None:
    return getattr(model, "_merak_checkpoint", None)


def forget(model: Any) -> None:
    with suppress(AttributeError):
        checkpoint_of(model).close()
        del model._merak_checkpoint
