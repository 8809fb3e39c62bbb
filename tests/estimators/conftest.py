"""Every estimator exactness test runs in float64 from a fixed seed."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _float64(float64_seeded):
    yield
