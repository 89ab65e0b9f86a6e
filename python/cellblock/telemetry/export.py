"""Exporter set-up: where spans and metrics go (console, OTLP, a JSONL file, memory)."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Literal

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from cellblock.errors import InvalidSpec
from cellblock.telemetry.otel import Redact, Telemetry

Exporter = Literal["console", "otlp", "none"]


class JsonlSpanExporter(SpanExporter):
    """Writes each finished span as one JSON line (what `cellblock report` reads)."""

    def __init__(self, path: str | Path) -> None:
        self._file: IO[str] = Path(path).open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            for span in spans:
                self._file.write(json.dumps(json.loads(span.to_json())) + "\n")
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()


def configure(
    exporter: Exporter = "console",
    *,
    trace_file: str | Path | None = None,
    service_name: str = "cellblock",
    record_content: bool = False,
    redact: Redact | None = None,
    metric_readers: Sequence[MetricReader] = (),
) -> Telemetry:
    """A Telemetry attached to every run, on new providers exporting to `exporter` (and to
    `trace_file` as JSONL). Its `shutdown()` detaches it and flushes and closes the providers.

    "otlp" needs the `cellblock[otlp]` extra and reads the usual OTEL_EXPORTER_OTLP_*
    variables. Tests pass their own in-memory exporters to `TracerProvider` and
    `Telemetry(...)` directly instead.
    """
    resource = Resource.create({"service.name": service_name})
    tracer_provider = TracerProvider(resource=resource)
    readers = list(metric_readers)
    if exporter == "console":
        tracer_provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    elif exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise InvalidSpec(
                "the OTLP exporter needs the otlp extra: pip install 'cellblock[otlp]'"
            ) from None
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    elif exporter != "none":
        raise InvalidSpec(f"unknown exporter {exporter!r} (console, otlp, none)")
    if trace_file is not None:
        tracer_provider.add_span_processor(SimpleSpanProcessor(JsonlSpanExporter(trace_file)))
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    telemetry = Telemetry(tracer_provider, meter_provider, record_content=record_content,
                          redact=redact)
    telemetry.owns(tracer_provider, meter_provider)
    return telemetry.attach()
