"""The support matrix: every family at pp = 2 and tp = 2 equals one process (1e-5), or is refused with the reason
and the option to use. One launch of 2 processes runs every case in sequence; README.md must say
what the run shows."""

from __future__ import annotations

import re

import pytest

from tests.breadth import workers
from tests.breadth.families import FAMILY_NAMES
from tests.helpers.launch import REPO, spawn

TOL = 1e-5
MODES = ("pp", "tp")
#: (family, mode) → the refusal's message, which must name the option to use instead
REFUSED = {("resnet", "tp"): r"has nothing to shard for tensor parallelism.*Use tensor_parallel_size=1"}
#: (family, mode) → a warning the case must give (it runs, equal to one process, but the user should know)
WARNED = {("mamba", "tp"): r"no layer of the blocks `backbone.layers` is tensor-parallel.*tensor_parallel_size=1"}


#: MoE under a pipeline, in the same launch: Mixtral's router logits (collected from every layer, read by the aux
#: loss after the last one) carried to the last stage; exact with the aux loss on over the whole batch as one
#: micro-batch (the aux loss couples the batch), and over 2 micro-batches with it off
MOE = [("mixtral_4_layers", "pp_whole_batch"), ("mixtral_4_layers", "pp_aux_off")]


@pytest.fixture(scope="module")
def matrix() -> dict:
    cases = [(family, mode) for family in FAMILY_NAMES for mode in MODES] + MOE
    ranks = spawn(workers.matrix, 2, cases, timeout=480)
    return {case: [r[case] for r in ranks] for case in cases}


def _problems(case: tuple[str, str], per_rank: list[dict]) -> list[str]:
    problems = []
    for rank, result in enumerate(per_rank):
        where = f"{case[0]} {case[1]}=2 rank {rank}"
        if "error" in result:
            problems.append(f"{where} failed:\n{result['error']}")
        elif case in REFUSED:
            if not re.search(REFUSED[case], result.get("refused", "")):
                problems.append(f"{where} should be refused ({REFUSED[case]}), got {result}")
        elif "refused" in result:
            problems.append(f"{where} was refused: {result['refused']}")
        else:
            for key in ("loss", "eval", "grads"):
                if key in result and not result[key] < TOL:
                    problems.append(f"{where}: {key} differs from one process by {result[key]:.2e}")
            if case in WARNED and not any(re.search(WARNED[case], w) for w in result["warnings"]):
                problems.append(f"{where} should warn ({WARNED[case]}), got {result['warnings']}")
    if "loss" not in per_rank[-1] and case not in REFUSED and "error" not in per_rank[-1]:
        problems.append(f"{case}: the last rank reported no loss")
    return problems


@pytest.mark.multiprocess
def test_every_family_equals_one_process_or_is_refused(matrix):
    problems = [p for case, per_rank in matrix.items() for p in _problems(case, per_rank)]
    assert not problems, "\n".join(problems)


@pytest.mark.multiprocess
def test_readme_support_matrix_says_what_the_run_shows(matrix):
    """README.md: one row per family, a ✓ where the case runs equal to one process, else the reason."""
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 1 + len(MODES) and cells[0].strip("`") in FAMILY_NAMES:
            rows[cells[0].strip("`")] = dict(zip(MODES, cells[1:], strict=True))
    assert set(rows) == set(FAMILY_NAMES)
    for (family, mode), per_rank in matrix.items():
        if (family, mode) in MOE:
            continue
        cell = rows[family][mode]
        if "refused" in per_rank[0]:
            assert cell.startswith("refused"), f"{family} {mode}: the docs say {cell!r}, the run refused it"
        else:
            assert cell.startswith("✓"), f"{family} {mode}: the docs say {cell!r}, the run passed"


@pytest.mark.multiprocess
def test_moe_router_logits_pipelined_balanced_and_equal_to_one_process(matrix):
    """Issue 17: with the aux loss on, stage 0 used to hold only the embedding (balance 2.0). The router logits
    now cross the cut like any other tensor, and the losses equal one process with the aux loss on and off."""
    for case in MOE:
        per_rank = matrix[case]
        problems = _problems(case, per_rank)
        assert not problems, "\n".join(problems)
        assert all(r["balance"] <= 1.15 and not r["warnings"] for r in per_rank), per_rank
        aux = case[1] != "pp_aux_off"
        assert len(per_rank[0]["carried"]) == (2 if aux else 0), per_rank[0]["carried"]  # layers 0 and 1's logits
