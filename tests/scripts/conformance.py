"""Run Lightning conformance scenarios under MerakStrategy on 2 CPU processes (Lightning launches rank 1).

usage: python tests/scripts/conformance.py OUT_DIR STRATEGY_KWARGS_JSON SCENARIO [SCENARIO ...]
Each rank writes OUT_DIR/rank{r}.pt with the scenarios' results.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.helpers.scenarios import run  # noqa: E402

if __name__ == "__main__":
    out, strategy_kwargs, names = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3:]
    torch.set_num_threads(1)
    results = run(names, reference=False, root=out / "work", strategy_kwargs=strategy_kwargs)
    rank = torch.distributed.get_rank()
    torch.save(results, out / f"rank{rank}.pt")
