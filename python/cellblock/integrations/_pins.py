"""The SDK version ranges the integrations support, and the error naming them.

The integrations use a few private names of the SDKs (module-private constants, helpers and
hooks they provide rather than copies of them); the extras pin the ranges they were built and
tested on, and an import that finds a name gone says which range works.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

#: anthropic versions of `cellblock[managed-agents]`.
SUPPORTED_ANTHROPIC = ">=2.17,<2.18"
#: openai-agents versions of `cellblock[openai-agents]`.
SUPPORTED_OPENAI_AGENTS = ">=0.24,<0.25"


def unsupported(module: str, package: str, supported: str, extra: str,
                cause: Exception) -> ImportError:
    """The ImportError of an integration whose SDK lacks a name it uses."""
    try:
        found = version(package)
    except PackageNotFoundError:
        found = "none"
    return ImportError(
        f"{module} needs {package}{supported} (found {found}): "
        f"pip install 'cellblock[{extra}]' ({type(cause).__name__}: {cause})"
    )
