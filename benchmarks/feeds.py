"""The UNet input the benchmarks time: a captured mid-denoising call, not pure noise."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def captured_feed(calibration_dir: Path, component: str = "unet") -> dict[str, np.ndarray]:
    """The second recorded call of `component` (the first if only one was captured).

    Raises exporters.errors.SourceError when nothing was captured (run 'diffprism calibrate').
    """
    from exporters.calibration import load_feeds

    feeds = load_feeds(Path(calibration_dir), component)
    return feeds[min(1, len(feeds) - 1)]
