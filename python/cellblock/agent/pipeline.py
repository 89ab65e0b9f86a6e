"""Pipelines: sequential stages, each an agent of a team in a sandbox session of its own,
passing artefacts forward, resumable per stage.

A stage's artefacts are the workspace paths it lists in `outputs` (files or directories,
relative to /workspace) and its answer (text, or JSON with `output = "json"`). Every later
stage finds the files at the same paths in its own workspace, and `{previous}` in its task is
replaced by the answer of the stage before it.

The journal directory records each finished stage: its artefact files, its answer and its
cost, under a fingerprint of the stage's definition and of every stage before it. A rerun
skips the recorded stages (their artefacts are restored from the journal) and starts at the
first one not finished, e.g. the one that failed; changing a stage re-runs it and the stages
after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cellblock.agent.results import AgentResult
from cellblock.agent.spec import Team
from cellblock.errors import CellblockError, InvalidSpec

JOURNAL = "journal.json"


class Stage(BaseModel):
    """One step of a pipeline: which agent, what to do, what it hands on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    agent: str
    task: str
    outputs: list[str] = []
    output: Literal["text", "json"] = "text"

    @field_validator("outputs")
    @classmethod
    def _relative(cls, v: list[str]) -> list[str]:
        for p in v:
            pure = PurePosixPath(p)
            if pure.is_absolute() or ".." in pure.parts or not pure.parts:
                raise InvalidSpec(f"stage output {p!r}: a path relative to /workspace")
        return v


StageStatus = Literal["done", "resumed", "failed", "not_run"]


class StageResult(BaseModel):
    """How a stage ended in this run; `resumed` means taken from the journal, not run."""

    model_config = ConfigDict(frozen=True)

    name: str
    status: StageStatus
    output: Any = None
    files: list[str] = []
    result: AgentResult | None = None
    error: str | None = None
    cost_usd: float = 0.0


class PipelineResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    ok: bool
    stages: list[StageResult]
    #: The answer of the last stage (when all finished).
    output: Any = None
    #: What this run spent (stages taken from the journal cost nothing now).
    cost_usd: float
    failed_stage: str | None = None


class Pipeline:
    """Stages of agents from `team`, journaled under `journal_dir`."""

    def __init__(self, team: Team, stages: list[Stage], journal_dir: str | Path) -> None:
        if not stages:
            raise InvalidSpec("a pipeline needs at least one stage")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise InvalidSpec(f"stage names must be unique: {names}")
        for s in stages:
            team[s.agent]  # raises InvalidSpec for an unknown agent
        self.team = team
        self.stages = stages
        self.dir = Path(journal_dir)

    def _fingerprints(self, task: str) -> list[str]:
        chain = hashlib.sha256(task.encode())
        out = []
        for s in self.stages:
            chain.update(s.model_dump_json().encode())
            chain.update(self.team[s.agent].model_dump_json().encode())
            out.append(chain.hexdigest())
        return out

    def journal(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.dir / JOURNAL).read_text())
            return data
        except FileNotFoundError:
            return {"stages": {}}
        except (OSError, ValueError) as e:
            raise InvalidSpec(f"pipeline journal {self.dir / JOURNAL}: {e}") from None

    def _record(self, journal: dict[str, Any], name: str, entry: dict[str, Any]) -> None:
        journal["stages"][name] = entry
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".journal-")
        with os.fdopen(fd, "w") as f:
            json.dump(journal, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / JOURNAL)  # a crash leaves the old journal or the new one

    def run(self, task: str) -> PipelineResult:
        """Runs (or resumes) the pipeline on `task`, the first stage's `{previous}`."""
        journal = self.journal()
        prints = self._fingerprints(task)
        results: list[StageResult] = []
        previous: Any = task
        files: dict[str, Path] = {}  # workspace path -> where the artefact is kept
        cost = 0.0
        failed: str | None = None
        for stage, fingerprint in zip(self.stages, prints, strict=True):
            if failed is not None:
                results.append(StageResult(name=stage.name, status="not_run"))
                continue
            entry = journal["stages"].get(stage.name)
            if entry is not None and entry.get("fingerprint") == fingerprint:
                previous = entry["output"]
                for p in entry["files"]:
                    files[p] = self.dir / stage.name / "files" / p
                results.append(StageResult(name=stage.name, status="resumed", output=previous,
                                           files=entry["files"], cost_usd=entry["cost_usd"]))
                continue
            outcome = self._run_stage(stage, previous, files)
            cost += outcome.cost_usd
            results.append(outcome)
            if outcome.status != "done":
                failed = stage.name
                continue
            previous = outcome.output
            for p in stage.outputs:
                files[p] = self.dir / stage.name / "files" / p
            self._record(journal, stage.name, {
                "fingerprint": fingerprint, "output": outcome.output, "files": stage.outputs,
                "cost_usd": outcome.cost_usd, "finished_at": time.time(),
            })
        return PipelineResult(ok=failed is None, stages=results, cost_usd=cost,
                              output=previous if failed is None else None, failed_stage=failed)

    def _run_stage(self, stage: Stage, previous: Any, files: dict[str, Path]) -> StageResult:
        from cellblock import Sandbox

        spec = self.team[stage.agent]
        prev_text = previous if isinstance(previous, str) else json.dumps(previous)
        task = stage.task.replace("{previous}", prev_text)
        result: AgentResult | None = None
        try:
            with Sandbox(policy=self.team.policy_of(spec)) as sandbox:
                if self.team.on_session is not None:
                    self.team.on_session(sandbox)
                for path, kept in files.items():
                    sandbox.upload(kept, path)
                result = self.team.build(stage.agent, sandbox=sandbox).run(task)
                if result.stop_reason != "end_turn":
                    raise _StageFailed(result.error or f"the agent stopped: {result.stop_reason}")
                output: Any = result.final_text
                if stage.output == "json":
                    output = _parse_json(result.final_text)
                out_dir = self.dir / stage.name / "files"
                shutil.rmtree(out_dir, ignore_errors=True)  # leftovers of a failed attempt
                for path in stage.outputs:
                    target = out_dir / path
                    target.parent.mkdir(parents=True, exist_ok=True)
                    sandbox.download(path, target)
        except (_StageFailed, CellblockError) as e:
            kind = "" if isinstance(e, _StageFailed) else f"{type(e).__name__}: "
            return StageResult(name=stage.name, status="failed", result=result,
                               error=f"{kind}{e}",
                               cost_usd=result.cost_usd if result is not None else 0.0)
        return StageResult(name=stage.name, status="done", output=output, files=stage.outputs,
                           result=result, cost_usd=result.cost_usd)


class _StageFailed(Exception):
    pass


def _parse_json(text: str) -> Any:
    body = text.strip()
    if body.startswith("```"):  # a fenced block: ```json ... ```
        body = body.split("\n", 1)[1] if "\n" in body else ""
        body = body.rsplit("```", 1)[0]
    try:
        return json.loads(body)
    except ValueError as e:
        raise _StageFailed(f"the stage's answer is not JSON ({e})") from None
