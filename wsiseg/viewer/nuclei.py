"""Nucleus outlines from ``nuclei.geojson``, held as flat arrays for box queries and id look-ups.

Coordinates are **slide level-0 px** throughout (the GeoJSON's frame: pixel corners at integers).
The file is read once, feature by feature where it has wsiseg's one-feature-per-line layout
(any other GeoJSON is parsed whole); what is kept per nucleus is its label id, type, bounding
box, outer and inner rings as float32 vertices, and its numeric measurements.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

# Colours for types whose features carry none (the first is QuPath's red for "Nucleus").
FALLBACK_COLORS = [(255, 0, 0), (0, 160, 255), (0, 200, 0), (255, 200, 0), (200, 0, 255), (0, 220, 220)]
MAX_MEASUREMENTS = 32  # numeric measurement names kept for the read-out


def _iter_features(path: Path) -> Iterator[dict]:
    """The features of a GeoJSON file. wsiseg writes ``{"type":"FeatureCollection","features":[``,
    then one feature per line (``,`` at its end), then ``]}``; such a file is read line by line so
    memory holds one feature's text at a time. Any other layout is parsed with ``json.load``."""
    with open(path, encoding="utf-8") as f:
        head = f.readline().strip()
        if head == '{"type":"FeatureCollection","features":[':
            for line in f:
                line = line.strip().rstrip(",")
                if line in ("", "]}"):
                    continue
                yield json.loads(line)
            return
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    yield from data.get("features", []) if isinstance(data, dict) else data


def _rings(geometry: dict | None) -> list[list]:
    """Every ring (exteriors and holes) of a Polygon or MultiPolygon, as lists of [x, y]."""
    if not geometry:
        return []
    if geometry.get("type") == "Polygon":
        return list(geometry.get("coordinates") or [])
    if geometry.get("type") == "MultiPolygon":
        return [r for poly in geometry.get("coordinates") or [] for r in poly]
    return []


@dataclass
class NucleusIndex:
    """All nuclei of one run: arrays of length N (one row per feature) and the rings' vertices.

    ``labels`` (N,) int64 label ids (the label image's values; -1 where a feature has none),
    ``types`` (N,) int16 indices into ``type_names``, ``bbox`` (N, 4) float32 ``x0, y0, x1, y1``,
    ``ring_start`` (N + 1,) int64 first ring of each feature, ``vertex_start`` (R + 1,) int64
    first vertex of each ring, ``vertices`` (V, 2) float32 ``x, y``; ``measurements`` name ->
    (N,) float32 (NaN where a feature lacks it); ``type_colors`` [r, g, b] per type.
    """

    labels: np.ndarray
    types: np.ndarray
    bbox: np.ndarray
    ring_start: np.ndarray
    vertex_start: np.ndarray
    vertices: np.ndarray
    measurements: dict[str, np.ndarray]
    type_names: list[str]
    type_colors: list[list[int]]

    @classmethod
    def read(cls, path: Path) -> "NucleusIndex":
        labels, types, bbox, ring_start, vertex_start = [], [], [], [0], [0]
        verts: list[np.ndarray] = []
        names: list[str] = []
        colors: list[list[int]] = []
        meas: dict[str, list[tuple[int, float]]] = {}
        n_vertices = 0
        for feat in _iter_features(path):
            props = feat.get("properties") or {}
            rings = [np.asarray(r, np.float32).reshape(-1, 2) for r in _rings(feat.get("geometry")) if len(r) >= 3]
            if not rings:
                continue
            i = len(labels)
            cls_ = props.get("classification") or {}
            name = str(cls_.get("name") or "Unclassified")
            if name not in names:
                names.append(name)
                c = cls_.get("color")
                colors.append([int(v) for v in c[:3]] if isinstance(c, (list, tuple)) and len(c) >= 3
                              else list(FALLBACK_COLORS[(len(names) - 1) % len(FALLBACK_COLORS)]))
            types.append(names.index(name))
            m = props.get("measurements") or {}
            label = props.get("label", m.get("Label", -1))
            labels.append(int(label) if isinstance(label, (int, float)) else -1)
            numeric = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if "area_um2" in props and isinstance(props["area_um2"], (int, float)):
                numeric.setdefault("area_um2", props["area_um2"])
            for k, v in numeric.items():
                if k in meas or len(meas) < MAX_MEASUREMENTS:
                    meas.setdefault(k, []).append((i, float(v)))
            allv = np.concatenate(rings)
            bbox.append((*allv.min(0), *allv.max(0)))
            for r in rings:
                verts.append(r)
                n_vertices += len(r)
                vertex_start.append(n_vertices)
            ring_start.append(len(vertex_start) - 1)
        n = len(labels)
        columns = {}
        for k, pairs in meas.items():
            col = np.full(n, np.nan, np.float32)
            idx, val = zip(*pairs)
            col[list(idx)] = val
            columns[k] = col
        return cls(
            labels=np.asarray(labels, np.int64), types=np.asarray(types, np.int16),
            bbox=np.asarray(bbox, np.float32).reshape(n, 4), ring_start=np.asarray(ring_start, np.int64),
            vertex_start=np.asarray(vertex_start, np.int64),
            vertices=np.concatenate(verts) if verts else np.zeros((0, 2), np.float32),
            measurements=columns, type_names=names, type_colors=colors)

    def __len__(self) -> int:
        return len(self.labels)

    def type_counts(self) -> list[int]:
        return np.bincount(self.types, minlength=len(self.type_names)).tolist()

    def in_box(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Rows whose bounding box meets the level-0 px box [x0, x1] x [y0, y1]."""
        b = self.bbox
        return np.flatnonzero((b[:, 0] <= x1) & (b[:, 2] >= x0) & (b[:, 1] <= y1) & (b[:, 3] >= y0))

    def outlines(self, rows: np.ndarray) -> list[list]:
        """``[label, type index, ring, ring, ...]`` per row, each ring a flat ``[x, y, x, y, ...]``
        list in level-0 px rounded to 0.1 px (what the page draws)."""
        out = []
        v, vs, rs = self.vertices, self.vertex_start, self.ring_start
        for i in rows.tolist():
            rings = [np.round(v[vs[r]:vs[r + 1]], 1).ravel().tolist() for r in range(rs[i], rs[i + 1])]
            out.append([int(self.labels[i]), int(self.types[i]), *rings])
        return out

    def __post_init__(self) -> None:
        self._by_label = np.argsort(self.labels, kind="stable")  # rows in label order, for look-ups

    def row_of_label(self, label: int) -> int | None:
        """The row of label id ``label``, or None."""
        k = int(np.searchsorted(self.labels, label, sorter=self._by_label))
        if k < len(self.labels) and self.labels[self._by_label[k]] == label:
            return int(self._by_label[k])
        return None

    def row_at(self, x: float, y: float) -> int | None:
        """The row whose outline holds the level-0 point (x, y) (even-odd rule over its rings), or
        None: the look-up for runs without a label image."""
        for i in self.in_box(x, y, x, y).tolist():
            inside = False
            for r in range(self.ring_start[i], self.ring_start[i + 1]):
                p = self.vertices[self.vertex_start[r]:self.vertex_start[r + 1]]
                xa, ya, xb, yb = p[:, 0], p[:, 1], np.roll(p[:, 0], -1), np.roll(p[:, 1], -1)
                cross = (ya > y) != (yb > y)
                with np.errstate(divide="ignore", invalid="ignore"):
                    xs = xa + (y - ya) * (xb - xa) / (yb - ya)
                inside ^= bool(np.count_nonzero(cross & (x < xs)) % 2)
            if inside:
                return i
        return None

    def describe(self, row: int) -> dict:
        """What the read-out shows for one nucleus: id, type and its numeric measurements."""
        m = {k: round(float(v[row]), 4) for k, v in self.measurements.items() if np.isfinite(v[row])}
        area = m.get("area_um2", m.get("Area µm^2"))
        return {"id": int(self.labels[row]), "type": self.type_names[self.types[row]], "area_um2": area,
                "measurements": m}
