"""Shared test configuration."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

# Deterministic, and fair to the other core when tests run in parallel (pytest -n 2).
torch.set_num_threads(int(os.environ.get("LOSSSCALE_TEST_THREADS", "1")))

settings.register_profile(
    "default", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("ci", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "default")
