"""Exceptions with messages that tell the user what to do."""


class DatError(Exception):
    """Base class of every error dat raises on purpose."""


class MissingPackageError(DatError, ImportError):
    def __init__(self, package: str, install: str, purpose: str = ""):
        why = f" (needed for {purpose})" if purpose else ""
        super().__init__(f"The package '{package}' is not installed{why}. Install it with:\n    {install}")
        self.package = package
        self.install = install


class ContextLengthError(DatError, ValueError):
    """A prompt does not fit the model's context limit."""
