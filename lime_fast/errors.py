"""Exceptions and warnings lime_fast raises; each names the problem and what to do about it.

Every exception the package raises on purpose derives from ``LimeError`` (``except lime_fast.LimeError``
catches them all) and from the built-in class a caller would otherwise expect (``RuntimeError``,
``ValueError``, ``FloatingPointError``)."""


class LimeError(Exception):
    """Base of every error lime_fast raises on purpose."""


class LimeWarning(UserWarning):
    """Something was adjusted or fell back to a documented default (truncated text, empty mask, ...)."""


class InputWarning(LimeWarning):
    """An input was accepted with an adjustment the user may not want (a stretched mask, an image larger
    than the model was trained on, ...). ``--strict`` (or ``warnings.simplefilter("error", InputWarning)``)
    turns these into errors, raised before any model work."""


class ModelLoadError(LimeError, RuntimeError):
    """A checkpoint could not be loaded (missing weights with no network, wrong layout, ...)."""


class ConfigError(LimeError, ValueError):
    """Settings that do not fit the model (e.g. feature levels at which the UNet has no attention)."""


class NonFiniteLatentsError(LimeError, FloatingPointError):
    """A denoising step produced NaN or inf latents (usually fp16 overflow)."""


class MaskError(LimeError, ValueError):
    """A mask cannot be read as asked: an unknown ``mask_convention``, or an alpha convention
    ("transparent", "opaque") for a mask file that has no alpha channel."""


class BatchError(LimeError):
    """A batch job cannot start: a bad manifest under ``strict``, Ray missing, its folder in use, ..."""


class UnsupportedModeError(LimeError, RuntimeError):
    """A requested fast mode cannot run here (FP8 on a CPU, on a GPU without FP8 tensor cores, or without
    torchao); raised before the model is changed, saying what to use instead."""


class EditCancelled(LimeError):
    """An edit stopped early because its caller's ``should_stop`` returned True (``LimeEngine.edit_batch``)."""


class TurnError(LimeError):
    """Turn ``turn`` (1-based) of a multi-turn edit failed after earlier turns finished: ``results`` holds
    the finished turns' ``EditResult``s (nothing is lost); the turn's own error is ``__cause__``."""

    def __init__(self, message: str, turn: int, results: list):
        super().__init__(message)
        self.turn, self.results = turn, results


class RefineError(LimeError, ValueError):
    """A refinement cannot be made as asked: a segment id or point outside the edit, a segment both added
    and removed, segments asked of an edit that had none (its region was a user mask), ..."""


class RefineUnavailableError(LimeError, RuntimeError):
    """A result can no longer be refined: its cache was dropped (``EditResult.release``, pickling), or the
    engine that made it was unloaded (garbage-collected). Re-run the edit."""


class SessionError(LimeError, ValueError):
    """A saved ``lime-fast edit`` session cannot be used: another model, settings, image or instruction than
    the ones it was written for, or a missing or damaged file."""
