"""`CellblockSandboxClient`: a sandbox client for the OpenAI Agents SDK (`agents.sandbox`)
backed by cellblock sessions, so `SandboxAgent` runs its shell and file tools in cellblock.

Each SDK sandbox session is one `cellblock.Sandbox`; the manifest root must be /workspace
(the SDK's default), the session's persistent workspace. Commands run with `Sandbox.run`,
files go through the session's files API, workspace persist/hydrate are tar streams of
/workspace made and checked with the SDK's own tar helpers. Every command runs as the
sandbox's root (uid 0 of its own user namespace): `user=` other than "root" is refused.
The SDK's PTY calls (`exec_command` / `write_stdin`) are `Sandbox.start` processes
(`_openai_agents_pty`); `exposed_ports` are `Sandbox.expose` forwards on loopback, made again
whenever the session's sandbox opens (create, resume).
"""

from __future__ import annotations

import io
import os
import posixpath
import tarfile
import tempfile
import uuid
from pathlib import Path
from typing import Literal

from cellblock.integrations._pins import SUPPORTED_OPENAI_AGENTS, unsupported

try:
    from agents.sandbox.errors import WorkspaceArchiveReadError, WorkspaceArchiveWriteError
    from agents.sandbox.manifest import Manifest
    from agents.sandbox.session.base_sandbox_session import BaseSandboxSession
    from agents.sandbox.session.sandbox_client import BaseSandboxClient, BaseSandboxClientOptions
    from agents.sandbox.session.sandbox_session import SandboxSession
    from agents.sandbox.session.sandbox_session_state import SandboxSessionState
    from agents.sandbox.snapshot import SnapshotBase, SnapshotSpec, resolve_snapshot
    from agents.sandbox.types import ExecResult, ExposedPortEndpoint, User
    from agents.sandbox.util.tar_utils import (
        UnsafeTarMemberError,
        safe_extract_tarfile,
        should_skip_tar_member,
    )
except ImportError as e:  # a moved name: say which versions work, not just what broke
    raise unsupported("cellblock.integrations.openai_agents", "openai-agents",
                      SUPPORTED_OPENAI_AGENTS, "openai-agents", e) from e
from anyio.to_thread import run_sync

from cellblock.errors import CellblockError, InvalidSpec
from cellblock.integrations._openai_agents_pty import WORKSPACE, PtySessions, shell_exit_code
from cellblock.policy import Policy
from cellblock.process import ExposedPort
from cellblock.session import Sandbox

_PRIVATE = (
    (BaseSandboxSession, "_prepare_exec_command"),
    (BaseSandboxSession, "_persist_workspace_skip_relpaths"),
    (BaseSandboxSession, "_resolve_pty_session_entry"),
    (BaseSandboxClient, "_wrap_session"),
    (BaseSandboxClient, "_validate_manifest_for_create"),
    (BaseSandboxClient, "_deserialize_session_state_payload"),
)
for _owner, _name in _PRIVATE:
    if not hasattr(_owner, _name):
        raise unsupported("cellblock.integrations.openai_agents", "openai-agents",
                          SUPPORTED_OPENAI_AGENTS, "openai-agents",
                          AttributeError(f"{_owner.__name__}.{_name} is gone"))

#: The one user a sandbox can run as: its root (uid 0 in its own user namespace).
_USERS = (None, "", "root")


def _check_user(user: str | User | None, what: str) -> None:
    """Refuses a `user=` the sandbox cannot honour (rather than running as root anyway)."""
    name = user.name if isinstance(user, User) else user
    if name not in _USERS:
        raise InvalidSpec(
            f"{what}: user {name!r} is not supported: a cellblock sandbox runs everything as "
            "its own root (uid 0 in its user namespace); leave user unset or use 'root'"
        )


class CellblockSandboxClientOptions(BaseSandboxClientOptions):
    """Options of a new session: the cellblock policy (limits, allow_net, secrets...); its
    secrets are added to the client's and kept out of the session state."""

    type: Literal["cellblock"] = "cellblock"
    policy: Policy = Policy()
    #: Ports of the sandbox's 127.0.0.1 forwarded to a free port on the host's loopback
    #: (`resolve_exposed_port` gives the host address).
    exposed_ports: tuple[int, ...] = ()


class CellblockSandboxSessionState(SandboxSessionState):
    """Serializable state of a cellblock-backed session. Its policy carries no secrets (the
    SDK serializes session state into run state): the client holds them."""

    type: Literal["cellblock"] = "cellblock"
    policy: Policy = Policy()


class CellblockSandboxSession(PtySessions, BaseSandboxSession):
    """One cellblock sandbox serving the SDK's exec, PTY, read, write, exposed-port and
    workspace calls."""

    state: CellblockSandboxSessionState

    def __init__(
        self, *, state: CellblockSandboxSessionState, secrets: dict[str, str] | None = None
    ) -> None:
        self.state = state
        self._secrets = dict(secrets or {})
        self._sandbox: Sandbox | None = None
        self._ports: dict[int, ExposedPort] = {}
        PtySessions.__init__(self)

    @property
    def sandbox(self) -> Sandbox:
        """The cellblock sandbox, opened on first use with the state's exposed ports."""
        if self._sandbox is None or not self._sandbox.is_open:
            sandbox = Sandbox(self.state.policy, secrets=self._secrets)
            try:
                # A new sandbox (first use, resume, reopen) has new host ports: resolve again.
                self._ports = {p: sandbox.expose(p) for p in self.state.exposed_ports}
            except BaseException:
                sandbox.close()
                raise
            self._sandbox = sandbox
        return self._sandbox

    async def _ensure_backend_started(self) -> None:
        await run_sync(lambda: self.sandbox)

    async def _shutdown_backend(self) -> None:
        sandbox, self._sandbox = self._sandbox, None
        if sandbox is not None:
            await run_sync(sandbox.close)

    async def _resolve_exposed_port(self, port: int) -> ExposedPortEndpoint:
        await run_sync(lambda: self.sandbox)
        forward = self._ports[port]  # the SDK checked `port` is one of the state's
        return ExposedPortEndpoint(host=forward.host, port=forward.host_port, tls=False)

    def _prepare_exec_command(
        self, *command: str | Path, shell: bool | list[str], user: str | User | None
    ) -> list[str]:
        # The SDK's own preparation would prefix `sudo -u USER`: the sandbox has one user.
        _check_user(user, "exec")
        return super()._prepare_exec_command(*command, shell=shell, user=None)

    async def _exec_internal(
        self, *command: str | Path, timeout: float | None = None
    ) -> ExecResult:
        argv = [str(c) for c in command]

        def run() -> ExecResult:
            result = self.sandbox.run(argv, timeout=timeout, cwd=WORKSPACE)
            return ExecResult(stdout=result.stdout_bytes, stderr=result.stderr_bytes,
                              exit_code=shell_exit_code(result))

        return await run_sync(run)

    def _sandbox_path(self, path: Path | str) -> str:
        return str(self.normalize_path(path))

    async def read(self, path: Path, *, user: str | User | None = None) -> io.IOBase:
        _check_user(user, "read")
        target = self._sandbox_path(path)
        try:
            data = await run_sync(self.sandbox.read_file, target)
        except CellblockError as e:
            raise FileNotFoundError(f"{path}: {e}") from None
        return io.BytesIO(data)

    async def write(self, path: Path, data: io.IOBase, *, user: str | User | None = None) -> None:
        _check_user(user, "write")
        target = self._sandbox_path(path)
        payload = data.read()
        raw = payload.encode() if isinstance(payload, str) else bytes(payload)
        await run_sync(self.sandbox.write_file, target, raw)

    async def running(self) -> bool:
        return self._sandbox is not None and self._sandbox.is_open

    async def persist_workspace(self) -> io.IOBase:
        """A tar of /workspace with workspace-relative names, without the SDK's ephemeral
        and runtime skip paths, special files and symlinks (the files API never follows a
        link, so links inside the sandbox are not archived)."""
        skip = self._persist_workspace_skip_relpaths()

        def keep(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
            if should_skip_tar_member(member.name, skip_rel_paths=skip, root_name=None):
                return None  # a skipped folder is not descended into either
            if not (member.isfile() or member.isdir()):
                return None
            member.uid = member.gid = 0  # the host copy's owner means nothing to a sandbox
            member.uname = member.gname = ""
            return member

        def archive() -> io.BytesIO:
            with tempfile.TemporaryDirectory(prefix="cellblock-persist-") as tmp:
                self.sandbox.download(WORKSPACE, tmp)
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w") as tar:
                    tar.add(tmp, arcname=".", filter=keep)
            buf.seek(0)
            return buf

        try:
            return await run_sync(archive)
        except (tarfile.TarError, OSError, CellblockError) as e:
            raise WorkspaceArchiveReadError(path=Path(WORKSPACE), cause=e) from e

    async def hydrate_workspace(self, data: io.IOBase) -> None:
        """Extracts a workspace tar with the SDK's safe extractor (no absolute or `..`
        names, no links out of the workspace, nothing under an archived link) into a host
        folder of its own, then copies it into /workspace with the files API."""

        def extract() -> None:
            with tempfile.TemporaryDirectory(prefix="cellblock-hydrate-") as tmp:
                with tarfile.open(fileobj=data, mode="r:*") as tar:
                    safe_extract_tarfile(tar, root=Path(tmp),
                                         allow_external_symlink_targets=False)
                self._upload_tree(Path(tmp), WORKSPACE)

        try:
            await run_sync(extract)
        except UnsafeTarMemberError as e:
            raise WorkspaceArchiveWriteError(
                path=Path(WORKSPACE), context={"reason": e.reason, "member": e.member}, cause=e
            ) from e
        except (tarfile.TarError, OSError, CellblockError) as e:
            raise WorkspaceArchiveWriteError(path=Path(WORKSPACE), cause=e) from e

    def _upload_tree(self, src: Path, dst: str) -> None:
        """Copies the extracted tree: folders and files with the files API (which never
        writes through a link), the archive's links (all inside the workspace, the SDK's
        extractor checked) with `ln` in the sandbox, after everything else."""
        links: list[tuple[str, str]] = []
        for child in sorted(src.iterdir()):
            target = posixpath.join(dst, child.name)
            if child.is_symlink():
                links.append((os.readlink(child), target))
            elif child.is_dir():
                self.sandbox.make_dirs(target)
                self._upload_tree(child, target)
            elif child.is_file():
                self.sandbox.upload(child, target)
        for link, target in links:
            result = self.sandbox.run(["ln", "-sfn", "--", link, target])
            if not result.ok:
                raise OSError(f"{target}: cannot make the archived symlink: {result.stderr}")


class CellblockSandboxClient(BaseSandboxClient[CellblockSandboxClientOptions | None]):
    """Creates SDK sandbox sessions backed by cellblock (``SandboxRunConfig(client=
    CellblockSandboxClient(policy))``)."""

    backend_id = "cellblock"
    supports_default_options = True

    def __init__(self, policy: Policy | None = None) -> None:
        self._policy = policy or Policy()

    async def create(
        self,
        *,
        snapshot: SnapshotSpec | SnapshotBase | None = None,
        manifest: Manifest | None = None,
        options: CellblockSandboxClientOptions | None = None,
    ) -> SandboxSession:
        manifest = manifest if manifest is not None else Manifest()
        if manifest.root != WORKSPACE:
            raise InvalidSpec(f"manifest root must be {WORKSPACE} (got {manifest.root!r})")
        self._validate_manifest_for_create(manifest)
        policy = options.policy if options is not None else self._policy
        session_id = uuid.uuid4()
        state = CellblockSandboxSessionState(
            session_id=session_id,
            manifest=manifest,
            snapshot=resolve_snapshot(snapshot, str(session_id)),
            policy=policy.model_copy(update={"secrets": {}}),
            exposed_ports=options.exposed_ports if options is not None else (),
        )
        secrets = {**self._policy.secrets, **policy.secrets}
        return self._wrap_session(CellblockSandboxSession(state=state, secrets=secrets))

    async def delete(self, session: SandboxSession) -> SandboxSession:
        inner = session._inner
        if isinstance(inner, CellblockSandboxSession):
            await inner._shutdown_backend()
        return session

    async def resume(self, state: SandboxSessionState) -> SandboxSession:
        if not isinstance(state, CellblockSandboxSessionState):
            raise TypeError("CellblockSandboxClient.resume expects a CellblockSandboxSessionState")
        session = CellblockSandboxSession(state=state, secrets=self._policy.secrets)
        return self._wrap_session(session)

    def deserialize_session_state(self, payload: dict[str, object]) -> SandboxSessionState:
        return self._deserialize_session_state_payload(payload, CellblockSandboxSessionState)
