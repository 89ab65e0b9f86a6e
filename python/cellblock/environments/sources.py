"""Package sources, taken from the machine's own configuration: pip's (`pip config list`, which
includes PIP_* variables), apt's (`apt-config dump`, so APT_CONFIG is honoured) and npm's
(`npm config get registry`). A build's network allowlist is exactly the hosts named here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from cellblock.errors import EnvironmentBuildError

PYPI = "https://pypi.org/simple"
#: PyPI's index links its files on another host.
PYPI_FILES = "files.pythonhosted.org:443"


def allow_pattern(url: str) -> str | None:
    """`host:port` of an http(s) URL, None for anything else (file paths, file:// URLs)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}"


def local_path(location: str) -> str | None:
    """The host directory or file a pip/npm location names, if it is local."""
    if location.startswith("file://"):
        location = urlsplit(location).path
    return location if location.startswith("/") else None


@dataclass
class PipSources:
    """Where pip finds packages on this machine."""

    index_url: str = PYPI
    extra_index_urls: list[str] = field(default_factory=list)
    find_links: list[str] = field(default_factory=list)
    trusted_hosts: list[str] = field(default_factory=list)

    def allow(self) -> list[str]:
        urls = [self.index_url, *self.extra_index_urls, *self.find_links]
        out = [p for p in map(allow_pattern, urls) if p]
        if PYPI in (u.rstrip("/") for u in urls):
            out.append(PYPI_FILES)
        return sorted(set(out))

    def binds(self) -> list[str]:
        """Local find-links directories, bound read-only into the build."""
        return sorted({p for p in map(local_path, self.find_links) if p and os.path.isdir(p)})

    def env(self) -> dict[str, str]:
        env = {"PIP_INDEX_URL": self.index_url, "PIP_CONFIG_FILE": "/dev/null",
               "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        if self.extra_index_urls:
            env["PIP_EXTRA_INDEX_URL"] = " ".join(self.extra_index_urls)
        if self.find_links:
            env["PIP_FIND_LINKS"] = " ".join(self.find_links)
        if self.trusted_hosts:
            env["PIP_TRUSTED_HOST"] = " ".join(self.trusted_hosts)
        return env

    def fingerprint(self) -> dict[str, object]:
        return {"index": self.index_url, "extra": self.extra_index_urls,
                "find_links": self.find_links}


_CONFIG_LINE = re.compile(r"^(?P<scope>[^.]*)\.(?P<key>[a-z-]+)=(?P<value>.*)$")


def pip_sources(python: str) -> PipSources:
    """The sources `python -m pip` would use here (global, user, site config and PIP_*)."""
    try:
        out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise EnvironmentBuildError(f"pip: cannot read pip's configuration with {python}: {e}"
                                    ) from None
    values: dict[str, str] = {}
    # Later scopes win, and pip lists them in order (global, user, site, then :env:).
    for line in out.splitlines():
        m = _CONFIG_LINE.match(line.strip())
        if m:
            values[m["key"]] = m["value"].strip().strip("'\"")
    src = PipSources()
    if values.get("index-url"):
        src.index_url = values["index-url"]
    for key, target in (("extra-index-url", src.extra_index_urls),
                        ("find-links", src.find_links), ("trusted-host", src.trusted_hosts)):
        target.extend(values.get(key, "").split())
    return src


@dataclass
class AptSources:
    """The apt repositories of this machine, as one-line `deb` entries."""

    lines: list[str] = field(default_factory=list)

    def allow(self) -> list[str]:
        out = set()
        for line in self.lines:
            for word in line.split():
                pattern = allow_pattern(word)
                if pattern:
                    out.add(pattern)
        return sorted(out)

    def binds(self) -> list[str]:
        out = set()
        for line in self.lines:
            for word in line.split():
                if word.startswith("file:"):
                    path = urlsplit(word).path
                    if os.path.isdir(path):
                        out.add(path)
        return sorted(out)


def _apt_config() -> dict[str, str]:
    try:
        out = subprocess.run(["apt-config", "dump"], capture_output=True, text=True, timeout=30,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise EnvironmentBuildError(f"apt: cannot read apt's configuration: {e}") from None
    values = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        values[key] = value.strip().rstrip(";").strip('"')
    return values


def _deb822(text: str) -> list[str]:
    lines = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for raw in stanza.splitlines():
            if raw.startswith("#") or ":" not in raw or raw[:1].isspace():
                continue
            key, _, value = raw.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled") == "no":
            continue
        opts = " [trusted=yes]" if fields.get("trusted") == "yes" else ""
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                lines.append(f"deb{opts} {uri} {suite} {fields.get('components', '')}".strip())
    return lines


def apt_sources() -> AptSources:
    """`deb` lines of sources.list and sources.list.d (one-line and deb822 formats)."""
    cfg = _apt_config()
    etc = Path("/") / cfg.get("Dir", "/").lstrip("/") / cfg.get("Dir::Etc", "etc/apt")
    main = etc / cfg.get("Dir::Etc::sourcelist", "sources.list")
    parts = etc / cfg.get("Dir::Etc::sourceparts", "sources.list.d")
    src = AptSources()
    files = [main, *(sorted(parts.iterdir()) if parts.is_dir() else [])]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            src.lines.extend(_deb822(text))
        elif path.suffix == ".list" or path == main:
            src.lines.extend(ln.strip() for ln in text.splitlines()
                             if ln.strip().startswith("deb "))
    return src


def npm_registry() -> str:
    """npm's configured registry (npm must be installed)."""
    npm = shutil.which("npm")
    if npm is None:
        raise EnvironmentBuildError(
            "npm: npm packages need npm, which is not installed on this machine")
    try:
        return subprocess.run([npm, "config", "get", "registry"], capture_output=True,
                              text=True, timeout=60, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        raise EnvironmentBuildError(f"npm: cannot read npm's configuration: {e}") from None
