"""ZeRO scenarios (``tests/zero/scenarios.py``) under MerakStrategy on CPU processes, for each zero stage given.

usage: python tests/scripts/zero_fit.py OUT_DIR CONFIG_JSON
CONFIG_JSON: {"stages": [0, 1, 2], "scenarios": ["adamw", ...], "devices": 2, "batch_size": 4, "ckpt_path": null}
Each rank writes OUT_DIR/rank{r}.pt: {stage: {scenario: result}}.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.zero.scenarios import BATCH, SCENARIOS, WORLD  # noqa: E402

if __name__ == "__main__":
    out, cfg = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    kwargs = {"devices": cfg.get("devices", WORLD), "batch_size": cfg.get("batch_size", BATCH),
              "ckpt_path": cfg.get("ckpt_path")}
    results = {stage: {name: SCENARIOS[name](False, out / f"zero{stage}" / name, stage, **kwargs)
                       for name in cfg["scenarios"]} for stage in cfg["stages"]}
    torch.save(results, out / f"rank{torch.distributed.get_rank()}.pt")
    # leave no gloo threads running at interpreter exit (an abort there would fail the launch after the results)
    torch.distributed.destroy_process_group()
