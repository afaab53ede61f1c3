"""The installed version, whichever wheel installed the package."""

from __future__ import annotations

from importlib import metadata


def installed_version(default: str = "unknown") -> str:
    """The version of the distribution that installed ``llamabox``: ``llamabox`` itself, or a
    backend's wheel (``llamabox-cuda12``, ``llamabox-vulkan``, ...), which installs the same
    package under another name (docs/backends.md)."""
    try:
        return metadata.version("llamabox")  # the cpu wheel, or a source install: no scan
    except metadata.PackageNotFoundError:
        pass
    for name in metadata.packages_distributions().get("llamabox") or []:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return default
