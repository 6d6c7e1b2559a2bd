"""Validation splits by source (image, slide or patient), never by tile: one place for every data set.

The trainers, ``wsiseg eval`` and the cellularity regressors all hold out whole sources:
:func:`every_nth` picks every n-th source in natural order (``img2`` before ``img10``), and
:func:`split_by` cuts any list by a key into (train, val).
"""
from __future__ import annotations

import re
from typing import Callable, Collection, Iterable, TypeVar

T = TypeVar("T")


def natural_key(s: str) -> list:
    """``"train_10"`` sorts after ``"train_9"``: digit runs compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def every_nth(groups: Iterable[str], every: int) -> set[str]:
    """Every ``every``-th of the distinct ``groups`` in natural order, the first one included."""
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    return set(sorted(set(groups), key=natural_key)[::every])


def split_by(items: Iterable[T], key: Callable[[T], str], val: Collection[str]) -> tuple[list[T], list[T]]:
    """``(train, val)``: the items whose ``key`` is in ``val`` go to val, the rest to train (order kept)."""
    val = set(val)
    train_, val_ = [], []
    for it in items:
        (val_ if key(it) in val else train_).append(it)
    return train_, val_
