"""Exceptions raised for bad input; each message names the problem and the fix."""


class RedLensError(Exception):
    """Base class of every error this library raises on purpose."""


class UnsupportedModelError(RedLensError, TypeError):
    """The model class belongs to no supported family."""


class NoImageTokensError(RedLensError, ValueError):
    """The inputs hold no image placeholder token, so there is nothing visual to optimize."""


class ConfigError(RedLensError, ValueError):
    """A RedLensConfig field has an invalid value (raised at construction)."""


class CaptureError(RedLensError, RuntimeError):
    """The decoder could not be captured into a graph."""


class ReductionUnavailableError(RedLensError, NotImplementedError):
    """The config asks for a reduction whose pass is not part of this build."""


class BudgetUnreachableError(RedLensError, ValueError):
    """flops_budget cannot be met even with every layer reduced down to the floors."""


class PruningError(RedLensError, ValueError):
    """Token pruning cannot serve these inputs (e.g. prune_keep above a sample's visual count)."""


class CodebookError(RedLensError, ValueError):
    """A redundancy codebook cannot be built, read or used with this model."""


class ExportError(RedLensError, RuntimeError):
    """The ONNX export cannot be made (an op without a translation, a bad output folder, ...)."""


class InputError(RedLensError, ValueError):
    """The inputs cannot be served as given: image placeholders without pixel values, an unreadable
    image file, an argument the optimized model's forward does not serve."""


class ModelFilesError(RedLensError, ValueError):
    """A model directory's files are truncated or corrupt (checked before the weights load)."""


class OutputFolderError(RedLensError, OSError):
    """An output folder cannot take a command's outputs (foreign files, not writable, a file)."""


class SavedModelError(RedLensError, ValueError):
    """A saved optimized model folder cannot be read, or was saved for another model or library version."""


class ReportError(RedLensError, ValueError):
    """An audit report cannot be read, or a measurement put into it is malformed."""


class EngineUnavailableError(RedLensError, ImportError):
    """engine="ray" was asked for, but Ray (the `ray` extra) is not installed or cannot be reached."""


class PassOrderError(RedLensError, ValueError):
    """A pass list breaks the order the passes declare (runs_after / runs_last)."""
