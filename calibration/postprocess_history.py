"""Replacing a bundle's post-processing section the one way every calibration tool does it.

The section replaced goes to ``postprocess_history`` with its version number, the time and what
replaced it; versions count sections (the first is 1, so the current one is
``len(postprocess_history) + 1``, also kept in ``provenance.postprocess_version``). A tool that
changes what the absolute ``min_residual`` floor was calibrated on (k1 / k2, the residual
window) resets the floor to 0 through :func:`reset_floor`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from inspector.bundle import BundleSpec

log = logging.getLogger(__name__)


def replace_postprocess(spec: BundleSpec, new_pp: dict[str, Any], replaced_by: str, when: str,
                        **entry: Any) -> dict[str, Any]:
    """The spec update (``postprocess``, ``postprocess_history``, ``provenance``) that makes
    ``new_pp`` the bundle's section; ``entry`` adds keys to the history record of the old one."""
    old_version = len(spec.postprocess_history) + 1
    history = list(spec.postprocess_history) + [{
        **spec.postprocess.model_dump(mode="json"), "version": old_version, "replaced": when,
        "replaced_by": replaced_by, **entry}]
    prov = dict(spec.provenance)
    prov["postprocess_version"] = old_version + 1
    return {"postprocess": new_pp, "postprocess_history": history, "provenance": prov}


def reset_floor(spec: BundleSpec, bundle_yaml: Path, why: str) -> dict[str, Any] | None:
    """The post-processing section with ``min_residual`` 0, or None when there is no floor: it
    was calibrated on components the change (``why``) no longer makes. Nothing is said here:
    the caller calls :func:`warn_floor_reset` once the bundle is written (the warning used to
    come first, and stood alone when the write then failed)."""
    if not spec.postprocess.min_residual:
        return None
    return {**spec.postprocess.model_dump(mode="json"), "min_residual": 0.0}


def warn_floor_reset(spec: BundleSpec, bundle_yaml: Path, why: str) -> None:
    """Say that the floor of ``spec`` (the section before the write) was reset in ``bundle_yaml``."""
    log.warning("%s: min_residual %.4g reset to 0 (%s); run `inspector calibrate thresholds` again",
                bundle_yaml, spec.postprocess.min_residual, why)
