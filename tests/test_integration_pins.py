"""The integrations use private names of the SDKs: a release that drops one fails at import
with an ImportError naming the supported range, and the extras pin that same range."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cellblock.integrations._pins import SUPPORTED_ANTHROPIC, SUPPORTED_OPENAI_AGENTS

ROOT = Path(__file__).resolve().parent.parent


def test_extras_pin_the_supported_ranges() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert extras["managed-agents"] == [f"anthropic{SUPPORTED_ANTHROPIC}"]
    assert extras["openai-agents"] == [f"openai-agents{SUPPORTED_OPENAI_AGENTS}"]


@pytest.mark.parametrize("breakage, module, message", [
    ("import anthropic.lib.tools._tool_dispatch as m; del m.current_session_thread",
     "cellblock.integrations.managed_agents",
     f"cellblock.integrations.managed_agents needs anthropic{SUPPORTED_ANTHROPIC} (found "),
    ("import anthropic.lib.tools.agent_toolset as m; del m._BashOutput",
     "cellblock.integrations.managed_agents",
     f"cellblock.integrations.managed_agents needs anthropic{SUPPORTED_ANTHROPIC} (found "),
    ("from agents.sandbox.session.base_sandbox_session import BaseSandboxSession as B; "
     "del B._persist_workspace_skip_relpaths",
     "cellblock.integrations.openai_agents",
     f"cellblock.integrations.openai_agents needs openai-agents{SUPPORTED_OPENAI_AGENTS} "
     "(found "),
    ("import agents.sandbox.util.tar_utils as m; del m.safe_extract_tarfile",
     "cellblock.integrations.openai_agents",
     f"cellblock.integrations.openai_agents needs openai-agents{SUPPORTED_OPENAI_AGENTS} "
     "(found "),
])
def test_a_missing_private_name_names_the_supported_range(breakage: str, module: str,
                                                          message: str) -> None:
    pytest.importorskip(module.replace("cellblock.integrations.", "").replace(
        "managed_agents", "anthropic.lib.environments").replace("openai_agents",
                                                                "agents.sandbox"))
    r = subprocess.run([sys.executable, "-c", f"{breakage}\nimport {module}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ImportError: {message}"), r.stderr
    assert "pip install 'cellblock[" in last, last
