import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def three_d(tmp_path_factory):
    """The runs of tests/pipeline/test_3d.py and tests/zero/test_zero_3d.py (tests/helpers/three_d.py), one
    launch per process count shared by both files: 8-process launches cost the most of the suite."""
    from tests.helpers.pipeline_runs import Launches
    from tests.helpers.three_d import GROUPS

    return Launches(tmp_path_factory.mktemp("three_d"), GROUPS)
