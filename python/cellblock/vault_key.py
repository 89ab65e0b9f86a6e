"""The vault's key: 32 random bytes, from `CELLBLOCK_VAULT_KEY` or a key file only its owner may
read (like ssh refuses a private key others can read).

The key is written and read as urlsafe base64 text (44 characters), so the same
text works in an environment variable and in the file.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import stat
from pathlib import Path

from cellblock.errors import VaultError

#: Environment variable holding the key itself (wins over the key file).
KEY_ENV = "CELLBLOCK_VAULT_KEY"
#: Environment variable naming the key file.
KEY_FILE_ENV = "CELLBLOCK_VAULT_KEY_FILE"
#: Bytes of key (AES-256).
KEY_BYTES = 32


def config_home() -> Path:
    """`$XDG_CONFIG_HOME`, else ~/.config."""
    env = os.environ.get("XDG_CONFIG_HOME")
    return Path(env) if env and os.path.isabs(env) else Path.home() / ".config"


def default_key_path() -> Path:
    """`$CELLBLOCK_VAULT_KEY_FILE`, else `$XDG_CONFIG_HOME/cellblock/vault.key`: kept apart from
    the vault file (in the data dir) so that a copy of one is not a copy of both."""
    env = os.environ.get(KEY_FILE_ENV)
    return Path(env) if env else config_home() / "cellblock" / "vault.key"


def encode_key(key: bytes) -> str:
    """The key as text."""
    return base64.urlsafe_b64encode(key).decode()


def parse_key(text: str, source: str) -> bytes:
    """Decodes a key; `source` names where it came from (never its text) in the error."""
    try:
        key = base64.urlsafe_b64decode(text.strip().encode())
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise VaultError(
            f"{source} is not a vault key (expected {KEY_BYTES} bytes in urlsafe base64, as "
            "`cellblock vault init` writes)"
        )
    return key


def read_key_file(path: Path) -> bytes:
    """Reads a key file that must be a regular file of the current user with mode 0600 (or
    stricter): a key that others can read, or could have replaced, is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise VaultError(
            f"no vault key: set {KEY_ENV} or create the key file {path} with "
            "`cellblock vault init`"
        ) from None
    except OSError as e:
        raise VaultError(f"cannot open key file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise VaultError(f"key file {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise VaultError(
                f"key file {path} has mode {mode:04o}: group and others may read it; it must "
                f"be 0600 (chmod 600 {path})"
            )
        if st.st_uid != os.geteuid():
            raise VaultError(
                f"key file {path} belongs to uid {st.st_uid}, not to this user (uid "
                f"{os.geteuid()})"
            )
        data = os.read(fd, 4096)
    except OSError as e:
        raise VaultError(f"cannot read key file {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    return parse_key(data.decode("ascii", "replace"), f"key file {path}")


def load_key(key_file: Path | None = None) -> bytes:
    """The key: `$CELLBLOCK_VAULT_KEY` if set, else the key file."""
    env = os.environ.get(KEY_ENV)
    if env is not None and key_file is None:
        return parse_key(env, f"${KEY_ENV}")
    return read_key_file(key_file or default_key_path())


def create_key_file(path: Path | None = None) -> Path:
    """Writes a fresh random key to a new file of mode 0600 (its directory 0700 when created);
    an existing key file is never replaced: the vault it opens would become unreadable."""
    path = path or default_key_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:
        raise VaultError(
            f"key file {path} exists: a new key would make its vault unreadable (remove the "
            "file yourself if that is what you want)"
        ) from None
    except OSError as e:
        raise VaultError(f"cannot create key file {path}: {e.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, (encode_key(secrets.token_bytes(KEY_BYTES)) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return path
