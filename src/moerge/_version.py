"""The installed moerge version (recorded in every file moerge writes)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moerge")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"
