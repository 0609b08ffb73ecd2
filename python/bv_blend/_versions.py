"""The version guard shared by the integrations with other trainers (TRL, verl)."""

from __future__ import annotations

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion


def require_version(package: str, version: str, supported: str, relies_on: str) -> None:
    """Raise ImportError unless `version` of `package` lies in `supported`, the range the
    integration `bv_blend.<package>` was tested against; `relies_on` says what would differ."""
    try:
        ok = SpecifierSet(supported).contains(version, prereleases=True)
    except InvalidVersion:  # older `packaging` releases raise where newer ones answer False
        ok = False
    if not ok:
        raise ImportError(
            f"bv_blend.{package} supports {package}{supported} but {package} {version} is "
            f"installed; it relies on {relies_on} that differ between {package} releases. Install "
            f"a supported release with `pip install 'bv-blend-ext[{package}]'` (or "
            f"'{package}{supported}').")
