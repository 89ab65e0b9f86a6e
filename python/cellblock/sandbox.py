"""One-shot runs: `cellblock.run(argv, ...)` builds a run spec and hands it to the native core."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from cellblock import _native, forkserver
from cellblock.credentials import (
    Credential,
    CredentialsArg,
    OnPlaceholderLeak,
    credential_hosts,
    credentials_for_spec,
    normalize_credentials,
)
from cellblock.errors import CellblockError, InvalidSpec
from cellblock.observe import notify_run
from cellblock.policy import Policy, as_pattern_list
from cellblock.redaction import redact_error, redactor_for
from cellblock.result import RunResult
from cellblock.seccomp import CompiledFilter, SeccompPolicy, compile_filter, profile_for_argv
from cellblock.secrets import Secret, SecretsArg, normalize_secrets, secrets_for_spec
from cellblock.terminal import (
    DEFAULT_TERM,
    SizeArg,
    tty_section,
    typed_input,
    typing_from,
    window_source,
)

if TYPE_CHECKING:
    from cellblock.environments.runtime import Resolved

#: Called with (stream, data) where stream is 1 (stdout) or 2 (stderr); data is redacted.
OutputCallback = Callable[[int, bytes], None]

_SYSTEM_PREFIXES = ("/usr", "/bin", "/sbin", "/lib")

#: The policy of runs given none (frozen; building one per run cost ~15 us).
_DEFAULT_POLICY = Policy()

forkserver.install()


def _outside_system(path: str) -> bool:
    return not any(path == p or path.startswith(p + "/") for p in _SYSTEM_PREFIXES)


def runtime_prefixes() -> list[str]:
    """Host directories of the interpreters runs use, when they live outside /usr (e.g. pyenv)."""
    return list(_runtime_prefixes(sys.base_prefix, os.environ.get("PATH")))


@functools.lru_cache(maxsize=8)
def _runtime_prefixes(base_prefix: str, path: str | None) -> tuple[str, ...]:
    # Cached per (interpreter, PATH): looking node up costs ~0.3 ms, on every run otherwise.
    # A node installed or moved later under the same PATH is not seen until PATH changes.
    prefixes = []
    base = os.path.realpath(base_prefix)
    if _outside_system(base):
        prefixes.append(base)
    node = shutil.which("node", path=path)
    if node:
        node_prefix = os.path.dirname(os.path.dirname(os.path.realpath(node)))
        if _outside_system(node_prefix) and node_prefix not in prefixes:
            prefixes.append(node_prefix)
    return tuple(prefixes)


def default_env(prefixes: Sequence[str]) -> dict[str, str]:
    """The environment every run starts from: nothing of the caller's is inherited."""
    path = [f"{p}/bin" for p in prefixes]
    path += ["/usr/local/bin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/sbin", "/sbin"]
    return {"PATH": ":".join(path), "HOME": "/workspace", "LANG": "C.UTF-8"}


def resolve_seccomp(
    argv: Sequence[str], profile: str | None, seccomp: SeccompPolicy | None
) -> CompiledFilter | None:
    """The filter a run gets: explicit policy, named profile, or chosen from argv[0]."""
    if seccomp is not None:
        return compile_filter(seccomp)
    name = profile or profile_for_argv(list(argv))
    if name == "none":
        return None
    return compile_filter(name)


def build_spec(
    argv: Sequence[str],
    policy: Policy,
    secrets: list[Secret],
    compiled: CompiledFilter | None,
    tty: dict[str, Any] | None = None,
    environment: Resolved | None = None,
) -> dict[str, Any]:
    """The JSON-ready RunSpec for the core (`tty`: see `cellblock.terminal.tty_section`).
    `environment`: the policy's environment as the caller holds it (see
    `cellblock.environments.runtime.hold`); resolved here when not given."""
    if isinstance(argv, (str, bytes)) or not argv or not all(isinstance(a, str) for a in argv):
        raise InvalidSpec("argv must be a non-empty list of strings")
    rootfs = policy.rootfs
    if policy.environment is None:
        environment = None
    elif environment is None:
        from cellblock.environments.runtime import resolve

        environment = resolve(policy.environment)
    if environment is not None:
        if environment.rootfs is not None:
            if rootfs is not None:
                raise InvalidSpec(f"rootfs is given and environment {environment.name!r} "
                                  "has a root filesystem base: give one of them")
            rootfs = environment.rootfs
    # A rootfs brings its own runtimes: none of the host's is bound in.
    prefixes = [] if rootfs else runtime_prefixes()
    env = default_env(prefixes)
    binds = prefixes
    if environment is not None:
        environment.apply(env)
        binds = [*prefixes, *environment.binds]
    env.update(policy.env)
    creds = list(policy.credentials)
    allow = list(policy.allow_net)
    # A credential allows egress to its hosts (it is useless without).
    allow += [h for h in credential_hosts(creds) if h not in allow]
    spec: dict[str, Any] = {
        "argv": list(argv),
        "env": env,
        "cwd": policy.cwd,
        "limits": policy.limits(),
        "ro_binds": binds,
        "secrets": secrets_for_spec(secrets),
        "net": {"allow": allow} if allow else None,
        "rootfs": rootfs,
        "credentials": credentials_for_spec(
            creds, policy.on_credential_leak, policy.tls_ca_bundle
        ),
    }
    if tty is not None:
        spec["tty"] = tty
        # Full-screen programs need a terminal type; docker run -t says xterm too.
        env.setdefault("TERM", DEFAULT_TERM)
    if compiled is not None:
        spec["seccomp"] = compiled.spec_section
    return spec


def with_credentials(base: Policy, credentials: CredentialsArg) -> list[Credential] | None:
    """The policy's credentials plus `credentials` (None when none are given)."""
    extra = normalize_credentials(credentials)
    return [*base.credentials, *extra] if extra else None


def encode_spec(spec: dict[str, Any], compiled: CompiledFilter | None) -> str:
    """`json.dumps(spec)`, reusing the seccomp entry's encoding (the same for every run)."""
    if compiled is None or spec.get("seccomp") is not compiled.spec_section:
        return json.dumps(spec)
    rest = json.dumps({k: v for k, v in spec.items() if k != "seccomp"})
    return f'{rest[:-1]}, "seccomp": {compiled.spec_section_json}}}'


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """What `run` hands the core for one call (see `plan_run`)."""

    spec: dict[str, Any]
    compiled: CompiledFilter | None
    secrets: list[Secret]
    terminal: dict[str, Any] | None

    def encoded(self) -> str:
        """The spec as JSON for the core."""
        return encode_spec(self.spec, self.compiled)


def plan_run(
    argv: Sequence[str],
    *,
    memory: int | str | None = None,
    pids: int | None = None,
    cpus: float | None = None,
    timeout: float | None = None,
    cpu_time: float | None = None,
    max_output: int | str | None = None,
    disk: int | str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    policy: Policy | None = None,
    profile: str | None = None,
    seccomp: SeccompPolicy | None = None,
    allow_net: Sequence[str] | None = None,
    secrets: SecretsArg = None,
    environment: str | None = None,
    credentials: CredentialsArg = None,
    on_credential_leak: OnPlaceholderLeak | None = None,
    tls_ca_bundle: str | None = None,
    tty: bool = False,
    tty_size: SizeArg = None,
    rootfs: str | os.PathLike[str] | None = None,
    held_environment: Resolved | None = None,
) -> PlannedRun:
    """The spec `run` would hand the core for these arguments (the same errors too): one
    definition shared with `cellblock.cells.prepare`, which makes cells for it ahead."""
    base = policy or _DEFAULT_POLICY
    merged = base.merged(
        memory=memory, pids=pids, cpus=cpus, timeout=timeout, cpu_time=cpu_time,
        max_output=max_output, disk=disk, cwd=cwd, profile=profile, seccomp=seccomp,
        environment=environment,
        env={**base.env, **env} if env else None,
        allow_net=as_pattern_list(allow_net), rootfs=rootfs,
        credentials=with_credentials(base, credentials),
        on_credential_leak=on_credential_leak, tls_ca_bundle=tls_ca_bundle,
    )
    all_secrets = normalize_secrets(merged.secrets) + normalize_secrets(secrets)
    compiled = resolve_seccomp(argv, merged.profile, merged.seccomp)
    terminal = tty_section(tty, tty_size)
    spec = build_spec(argv, merged, all_secrets, compiled, terminal, held_environment)
    return PlannedRun(spec, compiled, all_secrets, terminal)


def run(
    argv: Sequence[str],
    *,
    memory: int | str | None = None,
    pids: int | None = None,
    cpus: float | None = None,
    timeout: float | None = None,
    cpu_time: float | None = None,
    max_output: int | str | None = None,
    disk: int | str | None = None,
    env: Mapping[str, str] | None = None,
    stdin: bytes | str | None = None,
    cwd: str | None = None,
    policy: Policy | None = None,
    profile: str | None = None,
    seccomp: SeccompPolicy | None = None,
    allow_net: Sequence[str] | None = None,
    secrets: SecretsArg = None,
    environment: str | None = None,
    credentials: CredentialsArg = None,
    on_credential_leak: OnPlaceholderLeak | None = None,
    tls_ca_bundle: str | None = None,
    on_output: OutputCallback | None = None,
    cancel: threading.Event | None = None,
    cells: bool = True,
    tty: bool = False,
    tty_size: SizeArg = None,
    tty_input: int | None = None,
    rootfs: str | os.PathLike[str] | None = None,
) -> RunResult:
    """Run `argv` in a fresh sandbox and report what happened.

    Keyword arguments override the policy's fields; sizes accept ints or strings like "64M".
    The GIL is released for the whole run, so threads can run sandboxes concurrently.
    Setting `cancel` from another thread kills the run (reported as `signaled`).
    `cells=False` builds the sandbox now even when a pre-created one is ready
    (see `cellblock.cells`).
    `tty=True` gives the command a pseudo-terminal of the sandbox's own as stdin, stdout and
    stderr (output merged into `stdout`; `stdin` is typed into it, then Ctrl-D), with a
    `tty_size=(rows, cols)` window (default 24x80), or a function giving the current size,
    followed while the run goes on; `tty_input`, a readable fd (e.g. the caller's keyboard),
    is typed into the terminal as it arrives; see `cellblock.terminal`.
    `rootfs` (a directory, see `cellblock.environments.rootfs`) becomes the sandbox's root,
    read-only, in place of the host's system directories.
    `environment` names a built environment (`cellblock env build`): its packages are
    mounted read-only and found through PATH, PYTHONPATH, NODE_PATH and LD_LIBRARY_PATH.
    `credentials` (a list of `cellblock.Credential`) are added to the policy's: the sandbox
    sees a placeholder, the egress proxy substitutes the value (see `cellblock.credentials`);
    `on_credential_leak` and `tls_ca_bundle` as the policy's fields.
    """
    from cellblock.cells import wait_watch
    from cellblock.environments.runtime import held

    # The environment's layers are held (shared lock) from resolving them until the run ends:
    # `cellblock env rm` keeps them meanwhile.
    env_name = environment if environment is not None else (policy or _DEFAULT_POLICY).environment
    with held(env_name) as held_env:
        planned = plan_run(
            argv, memory=memory, pids=pids, cpus=cpus, timeout=timeout, cpu_time=cpu_time,
            max_output=max_output, disk=disk, env=env, cwd=cwd, policy=policy,
            profile=profile, seccomp=seccomp, allow_net=allow_net, secrets=secrets,
            environment=environment, credentials=credentials,
            on_credential_leak=on_credential_leak, tls_ca_bundle=tls_ca_bundle, tty=tty,
            tty_size=tty_size, rootfs=rootfs, held_environment=held_env,
        )
        spec, compiled, all_secrets, terminal = (
            planned.spec, planned.compiled, planned.secrets, planned.terminal)
        data = typed_input(stdin.encode() if isinstance(stdin, str) else stdin,
                           terminal is not None)
        try:
            # Without a keyboard source there is nothing to set up (nor to check).
            hooks: AbstractContextManager[Callable[[int], None] | None] = (
                nullcontext() if tty_input is None else typing_from(tty, tty_input))
            with hooks as on_terminal:
                report = _native.run(
                    encode_spec(spec, compiled), data, compiled.bpf if compiled else None,
                    on_output, cancel, cells, window_source(tty, tty_size), on_terminal,
                )
        except CellblockError as e:
            # Messages can echo argv, paths or env: no secret leaves through them.
            raise redact_error(e, redactor_for(all_secrets)) from None
    result = RunResult(**report)
    if cells:
        wait_watch.check()
    notify_run("run", result)
    return result
