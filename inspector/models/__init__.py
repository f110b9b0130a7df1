"""Model kinds: one adapter per kind (input preparation and output decoding)."""

from __future__ import annotations

from inspector.bundle import BUNDLE_FILE, Bundle
from inspector.engines.base import Engine
from inspector.errors import BundleError
from inspector.models.base import ModelAdapter, ModelOutput


def make_adapter(bundle: Bundle, engine: Engine, max_batch: int = 0) -> ModelAdapter:
    kind = bundle.spec.kind
    if kind == "arcd":
        from inspector.models.arcd import ArcdAdapter
        return ArcdAdapter(bundle, engine, max_batch)
    if kind == "clgan":
        from inspector.models.clgan import ClganAdapter
        return ClganAdapter(bundle, engine, max_batch)
    if kind == "fuzzymask":
        from inspector.models.fuzzymask import FuzzymaskAdapter
        return FuzzymaskAdapter(bundle, engine, max_batch)
    raise BundleError(f"{bundle.path / BUNDLE_FILE}: kind: '{kind}' has no runtime adapter in this "
                      f"version (available: arcd, clgan, fuzzymask)")


__all__ = ["ModelAdapter", "ModelOutput", "make_adapter"]
