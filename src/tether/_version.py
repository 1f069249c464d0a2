"""The version of Tether, defined here once: the package metadata and `tether --version` read it."""

__version__ = "0.1.0"
