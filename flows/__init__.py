"""Prefect flows wiring geo_dino's stages; the library itself never imports Prefect."""

import os

# The ephemeral Prefect server started for a run sends no usage telemetry unless the user turns it on
# (runs may be air-gapped, and reach nothing but their own files): set before Prefect is first imported.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
