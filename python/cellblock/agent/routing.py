"""Model routing: rules that send some turns to a cheaper model.

A `Router` is asked before every model request. Its classifier hook (a callable, if any) is
asked first; then the rules, in order: the first rule whose every condition holds names the
turn's model. With no match the turn goes to the agent's main model. Each turn records the
decision and its cost next to what the same tokens would have cost on the main model, so a run
shows what routing saved. Retries and the fallback model work as without routing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from cellblock.agent.pricing import Usage


class RouteContext(BaseModel):
    """What a routing rule can look at before a turn."""

    model_config = ConfigDict(frozen=True)

    #: The turn about to be requested (1 for the first).
    turn: int
    #: Characters of the task (the first message).
    task_chars: int
    #: Characters of the whole conversation to be sent.
    context_chars: int
    #: Tools called in the previous turn (empty on the first turn).
    last_tools: tuple[str, ...]
    #: The main model (what the turn gets unless a rule says otherwise).
    main_model: str


class Route(BaseModel):
    """A rule: every condition given must hold for the turn to go to `model`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    #: Tasks of at most this many characters (task size).
    max_task_chars: int | None = Field(default=None, ge=0)
    #: Conversations of at most this many characters.
    max_context_chars: int | None = Field(default=None, ge=0)
    #: Turns that follow tool calls, all of them among these tools (tool use); e.g. a turn
    #: that only has to read back what `read_file` returned.
    after_tools: list[str] | None = None

    def matches(self, ctx: RouteContext) -> bool:
        if self.max_task_chars is not None and ctx.task_chars > self.max_task_chars:
            return False
        if self.max_context_chars is not None and ctx.context_chars > self.max_context_chars:
            return False
        return self.after_tools is None or (
            bool(ctx.last_tools) and set(ctx.last_tools) <= set(self.after_tools))


#: A classifier hook: the model for this turn, or None to let the rules decide.
Classifier = Callable[[RouteContext], str | None]


class RoutingDecision(BaseModel):
    """One turn's routing: which model answered, why, and what it cost."""

    model_config = ConfigDict(frozen=True)

    turn: int
    model: str
    #: "main", "classifier", or "rule N" (index in the router's rules).
    reason: str
    usage: Usage = Usage()
    cost_usd: float = 0.0
    #: The same tokens priced at the main model.
    main_model_cost_usd: float = 0.0


class Router:
    """Rules and an optional classifier hook, asked once per turn."""

    def __init__(self, rules: Sequence[Route] = (), classifier: Classifier | None = None) -> None:
        self.rules = tuple(rules)
        self.classifier = classifier

    def decide(self, ctx: RouteContext) -> tuple[str, str]:
        """(model, reason) for the turn."""
        if self.classifier is not None:
            chosen = self.classifier(ctx)
            if chosen:
                return chosen, "classifier"
        for i, rule in enumerate(self.rules):
            if rule.matches(ctx):
                return rule.model, f"rule {i}"
        return ctx.main_model, "main"
