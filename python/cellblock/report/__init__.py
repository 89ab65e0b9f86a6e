"""`cellblock report`: summaries of runs, evaluations, agent runs and traces, as text or HTML."""

from cellblock.report.render import to_html, to_text
from cellblock.report.summary import Bar, Chart, Summary, summarize

__all__ = ["Bar", "Chart", "Summary", "summarize", "to_html", "to_text"]
