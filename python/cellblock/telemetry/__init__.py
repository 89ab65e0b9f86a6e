"""Observability: OpenTelemetry spans and metrics, security events, the cost meter."""

from cellblock.observe import (
    RunRecord,
    SessionRecord,
    add_run_observer,
    add_session_observer,
    remove_run_observer,
    remove_session_observer,
)
from cellblock.telemetry.cost import CostMeter, CostReport, ModelCost
from cellblock.telemetry.export import configure
from cellblock.telemetry.otel import Telemetry

__all__ = [
    "CostMeter",
    "CostReport",
    "ModelCost",
    "RunRecord",
    "SessionRecord",
    "Telemetry",
    "add_run_observer",
    "add_session_observer",
    "configure",
    "remove_run_observer",
    "remove_session_observer",
]
