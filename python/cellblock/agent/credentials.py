"""Credentials of an agent's sessions: the vault's agent-scoped ones plus those the agent was
given, handed to the sandbox each run opens (the egress proxy substitutes them; the sandbox only
sees placeholders)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from cellblock.credentials import Credential, credential_names

if TYPE_CHECKING:
    from cellblock.vault import Vault


class AgentCredentials:
    """What one agent's sessions get: every credential the vault holds for `agent_name`
    (scope "agent"), the vault's session credentials named in `given`, and the `Credential`
    objects in `given` (session scope, not stored). Resolved anew for each session, so a
    credential added to the vault for the agent reaches its next session."""

    def __init__(self, agent_name: str | None, given: Sequence[Credential | str],
                 vault: Vault | None) -> None:
        self.agent_name = agent_name
        self.objects = [c for c in given if isinstance(c, Credential)]
        self.names = [c for c in given if isinstance(c, str)]
        self._vault = vault
        credential_names(self.objects)  # duplicates among the objects are an error now

    def __bool__(self) -> bool:
        return bool(self.agent_name or self.objects or self.names)

    def vault(self) -> Vault:
        if self._vault is None:
            from cellblock.vault import Vault  # cryptography only when an agent uses the vault

            self._vault = Vault()
        return self._vault

    def known_names(self) -> list[str]:
        """Names of the variables the sessions will have (metadata only: no value is opened)."""
        names = {c.name for c in self.objects} | set(self.names)
        if self.agent_name is not None:
            names |= set(self.vault().names(self.agent_name))
        return sorted(names)

    def resolve(self) -> list[Credential]:
        """The credentials of one session; a Credential given to the agent wins over a vault
        entry of the same name."""
        if not self.agent_name and not self.names:
            return list(self.objects)
        own = {c.name for c in self.objects}
        stored = self.vault().resolve([n for n in self.names if n not in own],
                                      agent=self.agent_name)
        return self.objects + [c for c in stored if c.name not in own]
