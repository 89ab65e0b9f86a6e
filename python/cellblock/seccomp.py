"""Seccomp profiles as data (`profiles/*.toml`), compiled to classic BPF with pyseccomp.

What a compiled filter does, for the running architecture only:
- a call on the profile's allowlist runs;
- a call in the profile's argument rules runs only with the allowed arguments (clone without
  CLONE_NEW* flags, socket for AF_UNIX/AF_INET/AF_INET6 and NETLINK_ROUTE, a few personality
  values); `clone3` is answered ENOSYS, unreported, so glibc falls back to `clone`, whose flags
  a filter can read;
- any other call returns SECCOMP_RET_USER_NOTIF: the supervisor's listener answers EPERM and
  reports it (or the run is killed, `on_violation="kill"`);
- a call through another ABI (x86 `int 0x80`, x32) kills the process.

Custom policies: `allow` adds calls to the base profile's allowlist, `deny` removes calls (and
their argument rules); `deny` wins over `allow`. The `refuse` list of the profiles and the calls
with argument rules can never be allowed, and the `required` calls (which the sandbox makes
after installing the filter to hand over the listener and exec) can never be denied: asking for
either is a `SeccompError`.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyseccomp
from pydantic import BaseModel, ConfigDict, ValidationError

from cellblock.errors import SeccompError

PROFILE_DIR = Path(__file__).parent / "profiles"

#: libseccomp's answer for a name it does not know (__NR_SCMP_ERROR).
_UNKNOWN_SYSCALL = -1
#: Syscall numbers scanned to name every call of the native architecture.
_MAX_SYSCALL_NR = 1024


class SeccompPolicy(BaseModel):
    """Which seccomp profile a run uses, with optional additions and removals."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base: str = "default"
    allow: list[str] = []
    deny: list[str] = []
    on_violation: Literal["errno", "kill"] = "errno"


@dataclass(frozen=True)
class CompiledFilter:
    """A filter ready for the core: BPF bytes plus the names used to report refused calls.

    Instances are shared by the compile cache: treat `names` as read-only.
    """

    profile: str
    bpf: bytes
    names: dict[int, str]
    on_violation: str

    @functools.cached_property
    def spec_section(self) -> dict[str, Any]:
        """The run spec's `seccomp` entry (built once: the names cover ~300 calls)."""
        return {"profile": self.profile, "names": {str(k): v for k, v in self.names.items()},
                "on_violation": self.on_violation}

    @functools.cached_property
    def spec_section_json(self) -> str:
        """`spec_section` as JSON, encoded once."""
        return json.dumps(self.spec_section)


class _ArgSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int
    op: Literal["eq32", "masked_eq"]
    value: int
    mask: int | None = None


class _RuleSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    syscall: str
    why: str
    action: Literal["allow", "errno"]
    errno: str | None = None
    args: list[_ArgSpec] = []


class _ProfileFile(BaseModel):
    """The format of `profiles/NAME.toml`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    description: str
    base: str | None = None
    allow: list[str] = []
    deny: list[str] = []
    required: list[str] = []
    refuse: list[str] = []
    rule: list[_RuleSpec] = []


@dataclass(frozen=True)
class _Profile:
    allow: frozenset[str]
    required: frozenset[str]
    refuse: frozenset[str]
    rules: tuple[_RuleSpec, ...]


def known_profiles() -> list[str]:
    """Names of the profiles shipped in `profiles/`."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def profile_for_argv(argv: list[str]) -> str:
    """The profile for a command when none is given, chosen from the name of argv[0]."""
    name = os.path.basename(argv[0]) if argv else ""
    if name.startswith("python"):
        return "python"
    if name in ("node", "nodejs"):
        return "node"
    if name in ("sh", "bash", "dash", "zsh"):
        return "shell"
    return "default"


def compile_filter(policy: SeccompPolicy | str) -> CompiledFilter:
    """Compile a policy (or a profile name) to BPF for this architecture, cached per policy."""
    if isinstance(policy, str):
        return _compile(policy, (), (), "errno")
    return _compile(
        policy.base,
        tuple(sorted(set(policy.allow))),
        tuple(sorted(set(policy.deny))),
        policy.on_violation,
    )


def cache_info() -> functools._CacheInfo:
    """Hits and misses of the compile cache (one entry per distinct policy)."""
    return _compile.cache_info()


@functools.lru_cache(maxsize=64)
def _compile(
    base: str, allow: tuple[str, ...], deny: tuple[str, ...], on_violation: str
) -> CompiledFilter:
    profile = _load_profile(base, ())
    for name in allow:
        _check_known(name, "allow")
        if name in profile.refuse:
            raise SeccompError(
                f"syscall {name!r} is refused in every profile and cannot be allowed"
            )
        if any(r.syscall == name for r in profile.rules):
            raise SeccompError(
                f"syscall {name!r} is only allowed with fixed arguments and cannot be allowed "
                f"wholesale (deny it to refuse it entirely)"
            )
    for name in deny:
        _check_known(name, "deny")
        if name in profile.required:
            raise SeccompError(f"syscall {name!r} cannot be denied: the sandbox needs it to start")
    allowed = (profile.allow | set(allow)) - set(deny)
    rules = [r for r in profile.rules if r.syscall not in deny]
    label = base if not (allow or deny) else f"{base}+custom"
    return CompiledFilter(
        profile=label,
        bpf=_build_bpf(allowed, rules),
        names={nr: n for nr, n in _native_syscalls().items() if n not in allowed},
        on_violation=on_violation,
    )


def _build_bpf(allowed: frozenset[str] | set[str], rules: list[_RuleSpec]) -> bytes:
    try:
        f = pyseccomp.SyscallFilter(pyseccomp.NOTIFY)
        f.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
        # A binary search over syscall numbers instead of a linear scan.
        f.set_attr(pyseccomp.Attr.CTL_OPTIMIZE, 2)
        for name in sorted(allowed):
            nr = _native_nr(name)
            if nr is not None:
                f.add_rule(pyseccomp.ALLOW, nr)
        for rule in rules:
            nr = _native_nr(rule.syscall)
            if nr is not None:
                f.add_rule(_action(rule), nr, *(_arg(a) for a in rule.args))
        with tempfile.TemporaryFile() as out:
            f.export_bpf(out)
            out.seek(0)
            return out.read()
    except OSError as e:
        raise SeccompError(f"libseccomp refused the filter: {e}") from None


def _action(rule: _RuleSpec) -> int:
    if rule.action == "allow":
        return int(pyseccomp.ALLOW)
    code = getattr(errno, rule.errno or "", None)
    if not isinstance(code, int):
        raise SeccompError(f"rule for {rule.syscall!r}: unknown errno {rule.errno!r}")
    return int(pyseccomp.ERRNO(code))


def _arg(a: _ArgSpec) -> pyseccomp.Arg:
    mask = 0xFFFFFFFF if a.op == "eq32" else (a.mask or 0)
    return pyseccomp.Arg(a.index, pyseccomp.MASKED_EQ, mask, a.value)


def _native_nr(name: str) -> int | None:
    """The call's number here, or None for a call that exists only on other architectures."""
    nr = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    return nr if nr >= 0 else None


def _check_known(name: str, where: str) -> None:
    if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) == _UNKNOWN_SYSCALL:
        raise SeccompError(f"unknown syscall {name!r} in {where}")


@functools.cache
def _native_syscalls() -> dict[int, str]:
    """Number -> name of every call libseccomp knows on this architecture."""
    table = {}
    for nr in range(_MAX_SYSCALL_NR):
        try:
            table[nr] = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, nr).decode()
        except ValueError:
            continue
    return table


@functools.cache
def _load_profile(name: str, seen: tuple[str, ...]) -> _Profile:
    path = PROFILE_DIR / f"{name}.toml"
    if name not in known_profiles():
        raise SeccompError(
            f"unknown seccomp profile {name!r} (known: {', '.join(known_profiles())})"
        )
    if name in seen:
        raise SeccompError(f"seccomp profile {name!r} has a cycle of bases: {' -> '.join(seen)}")
    try:
        spec = _ProfileFile(**tomllib.loads(path.read_text()))
    except (OSError, tomllib.TOMLDecodeError, ValidationError) as e:
        raise SeccompError(f"bad seccomp profile {path}: {e}") from None
    where = f"profile {name!r}"
    names = (*spec.allow, *spec.deny, *spec.required, *spec.refuse, *(r.syscall for r in spec.rule))
    for n in names:
        _check_known(n, where)
    base = _load_profile(spec.base, (*seen, name)) if spec.base else _Profile(
        frozenset(), frozenset(), frozenset(), ()
    )
    required = base.required | set(spec.required)
    refuse = base.refuse | set(spec.refuse)
    rules = tuple(r for r in (*base.rules, *spec.rule) if r.syscall not in spec.deny)
    ruled = {r.syscall for r in rules}
    wrongly_allowed = sorted(set(spec.allow) & (refuse | ruled))
    if wrongly_allowed:
        raise SeccompError(f"{where} allows refused or argument-checked calls: {wrongly_allowed}")
    allow = frozenset((base.allow | set(spec.allow)) - set(spec.deny))
    if not required <= allow:
        raise SeccompError(f"{where} does not allow calls the sandbox needs to start: "
                           f"{sorted(required - allow)}")
    return _Profile(allow=allow, required=frozenset(required), refuse=frozenset(refuse),
                    rules=rules)
