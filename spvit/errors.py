"""Error types that the command-line tools turn into one line on stderr and exit code 2."""


class SpvitError(Exception):
    """Base class for errors caused by user input (models, files, architectures, budgets)."""


class UnsupportedModelError(SpvitError):
    """The model is not one spvit can attach a search space to."""


class ArchitectureError(SpvitError):
    """An architecture spec is malformed or does not fit its model."""


class CheckpointError(SpvitError):
    """A checkpoint is missing, unreadable or does not fit the model."""


class VerificationError(Exception):
    """A run finished but its result failed a check (e.g. ONNX parity): exit code 1, one line."""
