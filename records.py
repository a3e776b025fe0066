"""The Record every reader, split, sampler and report passes around, and the attribute names.

Kept apart from data.py so that the readers (readers.py) and the synthetic images (synth.py) can
import it without importing data.py, which imports both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from mgiqa import FAMILY_TO_ATTRIBUTE, LABELLED  # noqa: F401


@dataclass
class Record:
    image: str                      # root joined with the listed name
    dataset: str
    domain: str                     # synthetic | authentic | aigc
    split: str = "all"              # train | val | test | all (no official split)
    mos: float = math.nan           # higher is better, the dataset's own scale
    attributes: dict[str, float] = field(default_factory=dict)
    ref: str | None = None
    family: str | None = None       # None with level 0 = a clean image
    level: int | None = None
    extra: dict = field(default_factory=dict)
