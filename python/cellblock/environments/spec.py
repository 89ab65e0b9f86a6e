"""The declaration of an environment, as data: a pydantic model loaded from TOML or Python.

    name = "analysis"
    base = "host"                      # or a root filesystem source (see rootfs.py)
    apt = ["jq"]                       # Debian packages
    pip = ["pandas==2.2.2"]            # pip requirement specifiers
    npm = ["left-pad@1.3.0"]           # npm package specs (npm must be installed)
    [files]
    "conf/settings.json" = '{"debug": false}'       # content
    "data/words.txt" = { source = "/srv/words.txt" }  # a host file, copied at build time
    [env]
    MODE = "batch"
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from cellblock.errors import InvalidSpec

#: Names of environments: they are file names in the store and appear on command lines.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

#: Variables the environment itself sets (a declaration extends them through its layers).
RESERVED_ENV = ("PATH", "PYTHONPATH", "NODE_PATH", "LD_LIBRARY_PATH")


class FileSource(BaseModel):
    """A file of the environment: inline `content`, or a host file `source` read at build time."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    content: str | None = None
    source: str | None = None
    mode: int = 0o644

    @model_validator(mode="after")
    def _one_of(self) -> FileSource:
        if (self.content is None) == (self.source is None):
            raise ValueError("give exactly one of content or source")
        if not 0 <= self.mode <= 0o777:
            raise ValueError(f"mode {oct(self.mode)} is not a permission mode (0..0o777)")
        return self


class EnvironmentSpec(BaseModel):
    """An environment: a base, packages (Debian, pip, npm), files and variables."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    base: str = "host"
    apt: list[str] = []
    pip: list[str] = []
    npm: list[str] = []
    files: dict[str, FileSource] = {}
    env: dict[str, str] = {}

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a valid name (letters, digits, '.', '_', '-')")
        return v

    @field_validator("apt", "pip", "npm", mode="before")
    @classmethod
    def _list(cls, v: Any) -> Any:
        if isinstance(v, (str, bytes)):
            raise ValueError(f"expected a list of packages, got the string {v!r}")
        return v

    @field_validator("apt", "pip", "npm")
    @classmethod
    def _packages(cls, v: list[str]) -> list[str]:
        for item in v:
            # Package names go on a command line: an option there would change the build.
            if not item.strip() or item.startswith("-") or any(c.isspace() for c in item):
                raise ValueError(f"{item!r} is not a package name")
        return v

    @field_validator("files", mode="before")
    @classmethod
    def _files(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        return {k: {"content": f} if isinstance(f, str) else f for k, f in v.items()}

    @field_validator("files")
    @classmethod
    def _file_paths(cls, v: dict[str, FileSource]) -> dict[str, FileSource]:
        for path in v:
            p = PurePosixPath(path)
            if p.is_absolute() or not p.parts or ".." in p.parts or "\0" in path:
                raise ValueError(f"{path!r}: file paths are relative and stay inside the layer")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not key or "=" in key or "\0" in key:
                raise ValueError(f"{key!r} is not a variable name")
            if key in RESERVED_ENV:
                raise ValueError(f"{key} is set from the environment's layers")
        return v

    @property
    def host_base(self) -> bool:
        """True when the base is the host's own runtimes (no root filesystem)."""
        return self.base == "host"

    @classmethod
    def build(cls, **fields: Any) -> EnvironmentSpec:
        """Validate fields, turning pydantic's errors into `InvalidSpec`."""
        try:
            return cls(**fields)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err.get("loc", ()))
            msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
            raise InvalidSpec(f"environment: {loc}: {msg}" if loc else msg) from None

    @classmethod
    def from_toml(cls, path: str | Path) -> EnvironmentSpec:
        """Load a declaration from a TOML file (top-level keys are the model's fields).
        Relative `source` paths of files are taken from the file's directory."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise InvalidSpec(f"cannot read environment {path}: {e}") from None
        files = data.get("files")
        if isinstance(files, dict):
            for value in files.values():
                if isinstance(value, dict) and isinstance(value.get("source"), str):
                    value["source"] = str((path.parent / value["source"]).absolute())
        base = data.get("base")
        if isinstance(base, str) and base != "host" and not base.startswith(("/", "mmdebstrap:")):
            data["base"] = str((path.parent / base).absolute())
        return cls.build(**data)
