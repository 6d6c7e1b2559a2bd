"""wsiseg: whole-slide nuclei segmentation and tumour cellularity."""
from __future__ import annotations

__version__ = "0.1.0"
