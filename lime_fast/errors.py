"""Exceptions and warnings lime_fast raises; each names the problem and what to do about it."""


class LimeWarning(UserWarning):
    """Something was adjusted or fell back to a documented default (truncated text, empty mask, ...)."""


class ModelLoadError(RuntimeError):
    """A checkpoint could not be loaded (missing weights with no network, wrong layout, ...)."""


class NonFiniteLatentsError(FloatingPointError):
    """A denoising step produced NaN or inf latents (usually fp16 overflow)."""


class BatchError(Exception):
    """A batch job cannot start: a bad manifest under ``strict``, Ray missing, its folder in use, ..."""
