"""The vault: credentials stored encrypted at rest, per user, write-only.

Each value is sealed with AES-256-GCM under a fresh nonce, with the entry's metadata (name, agent,
hosts, methods, header, scope, ...) as associated data: an entry's ciphertext opens only under
its own metadata, so values cannot be moved between entries nor their hosts widened. The whole
document carries an HMAC as well, so entries cannot be dropped or edited unnoticed. Both keys
are derived (HKDF) from one 32-byte key (see `cellblock.vault_key`).

Values go in through `add` and come out only through `resolve`, which the run machinery uses to
hand `Credential`s to the egress proxy; `list` and `names` return metadata only, and no repr or
error message holds a value.

Writes are atomic (temp file, fsync, rename; mode 0600) under an exclusive `flock` on a lock file
beside the vault, so concurrent writers lose nothing; a failed check leaves the file as it was.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import contextlib
import datetime as dt
import fcntl
import hmac
import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Iterator
from hashlib import sha256
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, SecretStr, TypeAdapter, ValidationError

from cellblock.credentials import Credential
from cellblock.errors import VaultError
from cellblock.vault_key import load_key

#: Environment variable naming the vault file.
VAULT_ENV = "CELLBLOCK_VAULT"
#: Format version, bound into every MAC and associated data.
VERSION: Literal[1] = 1
_AGENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_NONCE_BYTES = 12
#: Values are NUL-padded to a multiple of this before sealing, so a ciphertext's length tells
#: little about its value's (values never hold NUL: they travel as HTTP fields and env values).
_PAD = 64


def data_home() -> Path:
    """`$XDG_DATA_HOME`, else ~/.local/share."""
    env = os.environ.get("XDG_DATA_HOME")
    return Path(env) if env and os.path.isabs(env) else Path.home() / ".local" / "share"


def default_vault_path() -> Path:
    """`$CELLBLOCK_VAULT`, else `$XDG_DATA_HOME/cellblock/vault.json`."""
    env = os.environ.get(VAULT_ENV)
    return Path(env) if env else data_home() / "cellblock" / "vault.json"


class VaultEntry(BaseModel):
    """What the vault tells about a credential: everything but its value."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    #: The agent whose sessions all get it (`scope="agent"`), or None for a session credential.
    agent: str | None = None
    hosts: list[str]
    methods: list[str] | None = None
    header: str | None = None
    in_query: bool = False
    in_body: bool = False
    scope: Literal["session", "agent"] = "session"
    #: When it was added (UTC).
    created: dt.datetime


class _Sealed(VaultEntry):
    """An entry as stored: the metadata and the sealed value."""

    nonce: str
    ciphertext: str

    def metadata(self) -> VaultEntry:
        return VaultEntry.model_validate(self.model_dump(include=set(VaultEntry.model_fields)))


class _Document(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1]
    key_id: str
    entries: list[_Sealed]
    mac: str


class _Keys:
    """The subkeys of one vault key (never printed)."""

    __slots__ = ("aead", "id", "mac")

    def __init__(self, key: bytes) -> None:
        def derive(info: bytes, length: int = 32) -> bytes:
            return HKDF(hashes.SHA256(), length, salt=None, info=info).derive(key)

        self.aead = AESGCM(derive(b"cellblock vault v1 aead"))
        self.mac = derive(b"cellblock vault v1 mac")
        # Tells a wrong key from a damaged file; reveals nothing about the key.
        self.id = derive(b"cellblock vault v1 key id", 8).hex()

    def __repr__(self) -> str:
        return f"<vault keys {self.id}>"


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def _associated_data(entry: VaultEntry) -> bytes:
    """What a value is bound to: the format and all of its entry's metadata."""
    meta = VaultEntry.model_validate(entry.model_dump(include=set(VaultEntry.model_fields)))
    return b"cellblock-vault-v1\0" + _canonical(meta.model_dump(mode="json"))


_ENTRIES = TypeAdapter(builtins.list[_Sealed])


def _document_mac(keys: _Keys, entries: builtins.list[_Sealed]) -> str:
    # pydantic's JSON of the entries is canonical (fields in declaration order, compact).
    body = f"cellblock-vault-v{VERSION}\0{keys.id}\0".encode() + _ENTRIES.dump_json(entries)
    return hmac.new(keys.mac, body, sha256).hexdigest()


def _check_agent(agent: str | None) -> None:
    if agent is not None and not _AGENT_RE.match(agent):
        raise VaultError(f"agent name {agent!r} is not valid (letters, digits, '_', '.', '-')")


def _label(name: str, agent: str | None) -> str:
    return f"{name!r} of agent {agent!r}" if agent else f"{name!r}"


class Vault:
    """Credentials encrypted at rest in one file of the current user.

    `path` defaults to `$CELLBLOCK_VAULT` or `$XDG_DATA_HOME/cellblock/vault.json`. The key is
    `key` (32 bytes), else `$CELLBLOCK_VAULT_KEY`, else the key file (`key_file`,
    `$CELLBLOCK_VAULT_KEY_FILE` or `$XDG_CONFIG_HOME/cellblock/vault.key`, mode 0600).

    A credential added with `agent="reviewer"` is agent-scoped: `resolve(agent="reviewer")`
    gives it to every session of that agent. Others are session credentials, given to a session
    by name.
    """

    def __init__(self, path: str | Path | None = None, *, key: bytes | None = None,
                 key_file: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_vault_path()
        self._key_file = Path(key_file) if key_file is not None else None
        if key is not None and len(key) != 32:
            raise VaultError("a vault key is 32 bytes")
        self.__keys = _Keys(key) if key is not None else None

    def __repr__(self) -> str:
        return f"Vault(path={str(self.path)!r})"

    # -- public API: values go in, metadata comes out -------------------------------------

    def add(self, credential: Credential, agent: str | None = None, *,
            replace: bool = False) -> VaultEntry:
        """Stores `credential` (for `agent`'s sessions when given, which makes it agent-scoped).
        An existing entry of that name is an error unless `replace`."""
        _check_agent(agent)
        if credential.scope == "agent" and agent is None:
            raise VaultError(f"credential {credential.name!r} has scope 'agent': name the agent "
                             "(agent=...)")
        plain = credential.value.get_secret_value().encode()
        if b"\0" in plain:
            raise VaultError(f"credential {credential.name!r}: its value holds a NUL byte")
        meta = VaultEntry(
            name=credential.name, agent=agent, hosts=list(credential.hosts),
            methods=list(credential.methods) if credential.methods is not None else None,
            header=credential.header, in_query=credential.in_query, in_body=credential.in_body,
            scope="agent" if agent is not None else "session",
            created=dt.datetime.now(dt.UTC).replace(microsecond=0),
        )
        with self._locked():
            keys = self._keys()
            entries = self._read(keys)
            kept = [e for e in entries if (e.name, e.agent) != (meta.name, agent)]
            if len(kept) != len(entries) and not replace:
                raise VaultError(f"credential {_label(meta.name, agent)} is already in the vault "
                                 "(remove it first, or replace it)")
            nonce = secrets.token_bytes(_NONCE_BYTES)
            sealed = keys.aead.encrypt(nonce, _pad(plain), _associated_data(meta))
            kept.append(_Sealed(**meta.model_dump(), nonce=_b64(nonce),
                                ciphertext=_b64(sealed)))
            self._write(keys, kept)
        return meta

    def remove(self, name: str, agent: str | None = None) -> None:
        """Deletes a credential (a session one, or `agent`'s)."""
        _check_agent(agent)
        with self._locked():
            keys = self._keys()
            entries = self._read(keys)
            kept = [e for e in entries if (e.name, e.agent) != (name, agent)]
            if len(kept) == len(entries):
                raise VaultError(f"no credential {_label(name, agent)} in the vault {self.path}")
            self._write(keys, kept)

    def names(self, agent: str | None = None) -> builtins.list[str]:
        """Names of the session credentials, or of `agent`'s credentials."""
        _check_agent(agent)
        return sorted(e.name for e in self.list() if e.agent == agent)

    def list(self) -> builtins.list[VaultEntry]:
        """Every entry's metadata (never a value), sorted by agent then name."""
        return sorted((e.metadata() for e in self._read(self._keys())),
                      key=lambda e: (e.agent or "", e.name))

    # -- for runs ---------------------------------------------------------------------------

    def resolve(self, names: Iterable[str] = (), agent: str | None = None
                ) -> builtins.list[Credential]:
        """The credentials a session gets: all of `agent`'s (when given), then each of `names`
        (the agent's own entry of that name first, else a session credential). For the run
        machinery, which hands them to the egress proxy; an unknown name is a VaultError."""
        _check_agent(agent)
        wanted = builtins.list(dict.fromkeys(names))
        keys = self._keys()
        entries = {(e.name, e.agent): e for e in self._read(keys)}
        chosen: dict[str, _Sealed] = {}
        if agent is not None:
            for e in sorted(entries.values(), key=lambda e: e.name):
                if e.agent == agent:
                    chosen[e.name] = e
        for name in wanted:
            if name in chosen:
                continue
            found = entries.get((name, None))
            if found is None:
                where = f"for agent {agent!r} or " if agent else ""
                raise VaultError(f"no credential {name!r} {where}among the session credentials "
                                 f"in the vault {self.path}")
            chosen[name] = found
        return [self._open(keys, e) for e in chosen.values()]

    # -- internals --------------------------------------------------------------------------

    def _keys(self) -> _Keys:
        if self.__keys is None:
            self.__keys = _Keys(load_key(self._key_file))
        return self.__keys

    def _open(self, keys: _Keys, e: _Sealed) -> Credential:
        try:
            value = keys.aead.decrypt(_unb64(e.nonce, self.path), _unb64(e.ciphertext, self.path),
                                      _associated_data(e))
        except InvalidTag:
            raise VaultError(
                f"vault {self.path}: credential {_label(e.name, e.agent)} does not open under "
                "its metadata: the file was tampered with"
            ) from None
        try:
            return Credential(name=e.name, value=SecretStr(value.rstrip(b"\0").decode()),
                              hosts=e.hosts, methods=e.methods, header=e.header,
                              in_query=e.in_query, in_body=e.in_body, scope=e.scope)
        except (ValidationError, UnicodeDecodeError):
            raise VaultError(f"vault {self.path}: credential {_label(e.name, e.agent)} is "
                             "damaged") from None

    def _read(self, keys: _Keys) -> builtins.list[_Sealed]:
        """The entries, after checking the key and the document's MAC."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as err:
            raise VaultError(f"cannot read the vault {self.path}: {err.strerror}") from None
        try:
            doc = _Document.model_validate_json(raw)
        except ValidationError:
            raise VaultError(f"vault {self.path} is corrupt or truncated (not a cellblock vault "
                             "file)") from None
        if doc.key_id != keys.id:
            raise VaultError(f"the key does not open the vault {self.path} (key id {keys.id}, "
                             f"the vault's is {doc.key_id}): check $CELLBLOCK_VAULT_KEY or the "
                             "key file")
        if not hmac.compare_digest(doc.mac, _document_mac(keys, doc.entries)):
            raise VaultError(f"vault {self.path} failed its integrity check: it was modified "
                             "outside cellblock or is damaged")
        seen: set[tuple[str, str | None]] = set()
        for e in doc.entries:
            if (e.name, e.agent) in seen:
                raise VaultError(f"vault {self.path} holds {_label(e.name, e.agent)} twice")
            seen.add((e.name, e.agent))
        return doc.entries

    def _write(self, keys: _Keys, entries: builtins.list[_Sealed]) -> None:
        entries = sorted(entries, key=lambda e: (e.agent or "", e.name))
        doc = _Document(version=VERSION, key_id=keys.id, entries=entries,
                        mac=_document_mac(keys, entries))
        data = doc.model_dump_json(indent=1).encode() + b"\n"
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.",
                                       suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            tmp = None
            # The rename itself is durable once the directory is synced.
            dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise VaultError(f"cannot write the vault {self.path}: {e.strerror}") from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock for a read-modify-write (a lock file: the vault file itself is
        replaced by each write, so a lock on it would not hold)."""
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path.with_name(self.path.name + ".lock"),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise VaultError(f"cannot lock the vault {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % _PAD)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str, path: Path) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise VaultError(f"vault {path} is corrupt (bad base64 in an entry)") from None
