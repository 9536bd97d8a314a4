"""Every error foldsoup raises on purpose, in one leaf module (no foldsoup imports), so any
layer can raise or catch any of them without importing another layer.

ValueError subclasses are problems with the user's input (config, data, files), reported as one
line naming the key or file; RuntimeError subclasses are states of a run. All of them are
FoldsoupErrors: the command line prints those as one line, and anything else with its traceback
(an exception nobody raised on purpose is a bug, and its traceback is what a report needs)."""


class FoldsoupError(Exception):
    """Raised on purpose, with a message written for the user."""


class ConfigError(FoldsoupError, ValueError):
    """A configuration problem, with a message that names the key and what is allowed."""


class DataError(FoldsoupError, ValueError):
    """A dataset problem, naming the file or class concerned."""


class WeightsError(FoldsoupError, ValueError):
    """A weight file that is missing, truncated, corrupt or otherwise unreadable."""


class ModelError(FoldsoupError, ValueError):
    """A model configuration or checkpoint problem (open_clip or timm), naming the arch, tag or file."""


# The open_clip name the project has always raised; the same class.
ClipError = ModelError


class SoupError(FoldsoupError, ValueError):
    """Ingredients that cannot be averaged (different keys, shapes, dtypes or integer buffers), or none left."""


class MemoryShort(FoldsoupError, RuntimeError):
    """A soup job's ingredients fit neither on its device nor in host memory."""


class Diverged(FoldsoupError, RuntimeError):
    """The loss became NaN or infinite. `guard`: the first-step guard's losses measured before
    (training.loop.guard_stats reads them)."""

    def __init__(self, message: str, guard: dict | None = None):
        super().__init__(message)
        self.guard = dict(guard or {})


class Interrupted(FoldsoupError, RuntimeError):
    """SIGTERM arrived; resume state was saved."""


class NoFreeDevice(FoldsoupError, RuntimeError):
    """Every GPU slot stayed held for FOLDSOUP_GPU_WAIT_S."""
