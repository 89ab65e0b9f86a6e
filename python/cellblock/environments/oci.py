"""OCI image layouts: index.json -> manifest -> layer blobs, every blob's digest verified.

https://github.com/opencontainers/image-spec (image-layout.md, manifest.md, layer.md).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from cellblock.environments import rootfs
from cellblock.errors import UnsafeLayer

#: Largest index or manifest read (they are small JSON documents).
MAX_JSON = 4 << 20
#: Nested indexes followed (an index may point at a per-platform index).
MAX_DEPTH = 4

_INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
_DIGEST = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")


def is_layout(path: Path) -> bool:
    """Whether `path` is an OCI image layout directory."""
    return (path / "oci-layout").is_file() and (path / "index.json").is_file()


def blob(layout: Path, descriptor: Any) -> Path:
    """The blob a descriptor names, after checking its size and digest."""
    if not isinstance(descriptor, dict):
        raise UnsafeLayer(f"{layout}: a descriptor is not an object")
    digest = descriptor.get("digest")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise UnsafeLayer(f"{layout}: bad digest {digest!r}")
    algo, hexdigest = digest.split(":", 1)
    path = layout / "blobs" / algo / hexdigest
    if not path.is_file() or path.is_symlink():
        raise UnsafeLayer(f"{layout}: blob {digest} is missing")
    size = descriptor.get("size")
    if isinstance(size, int) and path.stat().st_size != size:
        raise UnsafeLayer(f"{layout}: blob {digest} has {path.stat().st_size} bytes, the "
                          f"descriptor says {size}")
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != hexdigest:
        raise UnsafeLayer(f"{layout}: blob {digest} does not match its digest")
    return path


def _json(path: Path, what: str) -> Any:
    if path.stat().st_size > MAX_JSON:
        raise UnsafeLayer(f"{path}: {what} larger than {MAX_JSON} bytes")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise UnsafeLayer(f"{path}: {what} is not JSON ({e})") from None


def _pick(layout: Path, index: Any) -> Any:
    """The manifest descriptor of an index: the linux/amd64 one, else the first."""
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise UnsafeLayer(f"{layout}: the index lists no manifest")
    for d in manifests:
        p = d.get("platform") if isinstance(d, dict) else None
        if isinstance(p, dict) and p.get("os") == "linux" and p.get("architecture") == "amd64":
            return d
    return manifests[0]


def layers(layout: Path) -> list[Path]:
    """The verified layer blobs of the image in `layout`, lowest first."""
    doc = _json(layout / "index.json", "index.json")
    for _ in range(MAX_DEPTH):
        desc = _pick(layout, doc)
        doc = _json(blob(layout, desc), "manifest")
        is_index = desc.get("mediaType") in _INDEX_TYPES or doc.get("mediaType") in _INDEX_TYPES
        if not is_index and "layers" in doc:
            break
    else:
        raise UnsafeLayer(f"{layout}: indexes nested deeper than {MAX_DEPTH}")
    found = doc.get("layers")
    if not isinstance(found, list):
        raise UnsafeLayer(f"{layout}: the manifest has no layer list")
    if len(found) > rootfs.MAX_LAYERS:
        raise UnsafeLayer(f"{layout}: {len(found)} layers (at most {rootfs.MAX_LAYERS})")
    return [blob(layout, d) for d in found]
