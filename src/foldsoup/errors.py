"""Every error foldsoup raises on purpose, in one leaf module (no foldsoup imports), so any
layer can raise or catch any of them without importing another layer.

ValueError subclasses are problems with the user's input (config, data, files), reported as one
line naming the key or file; RuntimeError subclasses are states of a run."""


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and what is allowed."""


class DataError(ValueError):
    """A dataset problem, naming the file or class concerned."""


class WeightsError(ValueError):
    """A weight file that is missing, truncated, corrupt or otherwise unreadable."""


class ModelError(ValueError):
    """A model configuration or checkpoint problem (open_clip or timm), naming the arch, tag or file."""


# The open_clip name the project has always raised; the same class.
ClipError = ModelError


class SoupError(ValueError):
    """Ingredients that cannot be averaged: different keys, shapes, dtypes or integer buffers."""


class MemoryShort(RuntimeError):
    """A soup job's ingredients fit neither on its device nor in host memory."""


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


class Interrupted(RuntimeError):
    """SIGTERM arrived; resume state was saved."""
