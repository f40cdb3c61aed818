"""One exception type for everything a user can get wrong, so the CLI can print it and exit 2."""


class EdgeLLMError(Exception):
    """A problem the user can fix: the message names the problem and the fix."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}. {fix}" if fix else problem)


class ModelFormatError(EdgeLLMError):
    """The model file or directory is missing, truncated or malformed."""


class UnsupportedModelError(EdgeLLMError):
    """The model is well-formed but uses an architecture or tensor type edgellm does not run yet."""
