"""Imports every compression method module so each registers its name (explicit, no directory scan)."""

from ..llm_hooks import fastv, kv_evict, schedule, yopo  # noqa: F401
from ..visual import baselines, fastervlm, hired  # noqa: F401
