"""Exceptions of the matcher core: each names the problem specifically, for users and the node."""


class MatchAnythingError(Exception):
    """Base class of every error the package raises on purpose."""


class InputImageError(MatchAnythingError, ValueError):
    """An input image cannot be matched (empty, too small, wrong dtype/channels, NaN ...)."""


class CheckpointError(MatchAnythingError):
    """A checkpoint is missing, corrupt, of the wrong variant, or does not load strictly."""


class ConfigError(MatchAnythingError, ValueError):
    """A parameter value is invalid (type, range, or choice)."""


class BackendUnavailableError(MatchAnythingError):
    """The requested backend/device cannot run here (library or GPU missing)."""


class EngineMismatchError(MatchAnythingError):
    """A serialized engine does not fit this GPU / TensorRT / ONNX / shape; rebuild it."""
