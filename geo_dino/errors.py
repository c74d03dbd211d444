"""One error tree. Every error is a :class:`GeoDinoError` and also the builtin that fits it."""

from __future__ import annotations


class GeoDinoError(Exception):
    """Root of every error raised by geo_dino."""


class ConfigError(GeoDinoError, ValueError):
    """A run configuration is invalid (unknown key, bad value)."""


class AOIError(GeoDinoError, ValueError):
    """An area of interest is not a valid RFC 7946 polygon set, or does not fit the raster."""


class ScreeningError(GeoDinoError, RuntimeError):
    """The sensitive-site screen could not run (missing, empty, unreadable or tampered registry/policy)."""


class RunRefused(GeoDinoError, PermissionError):
    """The screening policy refused the run, or approval is required and was not given."""

    def __init__(self, message: str, decision: object | None = None) -> None:
        super().__init__(message)
        self.decision = decision


class SourceError(GeoDinoError, OSError):
    """A raster source is not allowed or cannot be read safely."""


class CRSMismatchError(GeoDinoError, ValueError):
    """Two objects in different CRSs or on different grids were combined."""


class CheckpointError(GeoDinoError, ValueError):
    """A checkpoint is missing, tampered, of an unknown layout, or does not match the architecture."""


class OutputError(GeoDinoError, OSError):
    """An output failed verification after writing, or would be written outside the run folder."""


class LicenceError(GeoDinoError, PermissionError):
    """Weights under a gated licence were asked for without an explicit acceptance of that licence."""


class LabelError(GeoDinoError, ValueError):
    """Labels are unusable: unknown class, missing attribute, bad geometry, no CRS, nothing on the grid."""


class CubeError(GeoDinoError, ValueError):
    """A path is not a (complete) geo_dino feature cube, or a write does not fit the cube."""


class STACError(GeoDinoError, ValueError):
    """A STAC document could not be built or does not validate against its (bundled) schemas."""


class GovernanceError(GeoDinoError, ValueError):
    """A deployment record that is incomplete where the governance policy requires it, or a bad governance
    file or policy."""
