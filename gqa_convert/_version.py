"""The package version, in a module of its own so that nothing imports it back from the root."""

__version__ = "0.1.0"
