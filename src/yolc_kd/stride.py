"""BOX_STRIDE: the stride of YOLC's box maps (coarse, refine and patch refine) over their input frame, which is
also the cell size of the refine grid (YOLCHead regresses at 1/4 of its full-resolution heatmap).

It lives at the package root, below every layer (data/, models/, kd/, cache/ and the stages may all import it),
because data/ must not import models/."""
from __future__ import annotations

BOX_STRIDE: int = 4
