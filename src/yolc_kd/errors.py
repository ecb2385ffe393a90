"""User-facing errors: the CLI prints these as one line, without a traceback."""


class UserError(Exception):
    """A mistake in what the user gave us (path, config, checkpoint, data)."""


class ModelConfigError(UserError, ValueError):
    """A model dict yolc-kd cannot build (unknown type or key, unsupported option): one line, no traceback."""
