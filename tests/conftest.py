"""What every test starts from."""

import pytest

from lmtrain.model import selfcheck


@pytest.fixture(autouse=True)
def fresh_self_checks():
    """Each test starts with no path checked or turned off (lmtrain.model.kernels.selfcheck keeps
    both per process, as a run does)."""
    selfcheck.reset()
    yield
    selfcheck.reset()
