"""Segmentation networks and the registry that builds them from a JSON sidecar."""
from __future__ import annotations

from wsiseg.models.registry import LoadedModel, build_model, list_models, load_model

__all__ = ["LoadedModel", "build_model", "list_models", "load_model"]
