"""``lightning-merak plan``: print the partition plan of a transformers config or a LightningModule."""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

import torch
from torch import nn

TASKS = {"causal-lm": "AutoModelForCausalLM", "seq-cls": "AutoModelForSequenceClassification",
         "image-cls": "AutoModelForImageClassification", "seq2seq": "AutoModelForSeq2SeqLM"}


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _hf_model(model_type: str, task: str, overrides: dict[str, Any]) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.for_model(model_type, **overrides)
    with torch.device("meta"):  # planning needs shapes only: no weights are allocated
        return getattr(transformers, TASKS[task]).from_config(config)


def _example(model: nn.Module, task: str, batch: int, seq: int) -> tuple[tuple, dict]:
    config = getattr(model, "config", None)
    if task == "image-cls":
        size = getattr(config, "image_size", 224)
        channels = getattr(config, "num_channels", 3)
        return (), {"pixel_values": torch.zeros(batch, channels, size, size, device="meta")}
    vocab = getattr(config, "vocab_size", 2)
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta") % vocab
    if task == "seq2seq":
        return (), {"input_ids": ids, "labels": ids}
    return (), {"input_ids": ids}


def main_plan(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-merak plan", description="Print the pipeline partition plan.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-config", metavar="MODEL_TYPE", help="a transformers model type, e.g. gpt2, llama")
    source.add_argument("--module", metavar="CLASS_PATH", help="a LightningModule class, e.g. pkg.mod.MyModule")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--init-args", default="{}", help="JSON init arguments of --module")
    parser.add_argument("--task", choices=sorted(TASKS), default="causal-lm")
    parser.add_argument("--stages", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    from lightning_merak.partition import plan_model

    if args.hf_config:
        overrides = dict(item.split("=", 1) for item in args.set)
        model = _hf_model(args.hf_config, args.task, {k: _value(v) for k, v in overrides.items()})
        pipelined, example = model, None
    else:
        module_path, _, cls_name = args.module.rpartition(".")
        cls = getattr(importlib.import_module(module_path), cls_name)
        lightning_module = cls(**json.loads(args.init_args))
        from lightning_merak.parallelize import find_pipelined_module

        _, pipelined = find_pipelined_module(lightning_module, "auto")
        model = pipelined
        example = getattr(lightning_module, "example_input_array", None)
    if args.module and example is not None:
        example = (example if isinstance(example, tuple) else (example,)), {}
    else:
        example = _example(model, args.task, args.batch_size, args.seq_len)
    plan = plan_model(pipelined, example, args.stages)
    print(plan.to_json() if args.json else plan.table())
    return 0
