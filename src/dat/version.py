"""The package version, in a module of its own so that storage code can record it without
importing the model stack."""

__version__ = "0.1.0"
