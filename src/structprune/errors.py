"""User-facing errors. The CLI prints these as one line and exits non-zero."""


class StructPruneError(Exception):
    """Bad input or an impossible request: the message says what and how to fix it."""


class UnsupportedArchitectureError(StructPruneError):
    """The model family has no adapter."""


class CalibrationError(StructPruneError):
    """Calibration data is missing, too short, or produced non-finite statistics."""
