"""Screenshots of the HTML pages in headless Chromium, and counting what they show: connected regions of one
exact colour (a graph node's fill, a table row's badge), so a test checks the drawing, not only that a page
rendered."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any


def screenshot(page: Path, shot: Path, profile: Path, size: str = "1300,4000") -> Any:
    """Open ``page`` in headless Chromium (a fresh profile under ``profile``, no network), save a screenshot of a
    window of ``size`` pixels (``"WIDTH,HEIGHT"``) to ``shot`` and return it as a PIL image."""
    from PIL import Image

    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", f"--screenshot={shot}", f"--window-size={size}", page.as_uri()]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    return Image.open(shot)


def blobs(img: Any, color: str) -> int:
    """Connected regions of exactly ``color`` (#rrggbb) in an RGB screenshot, ignoring specks under 40 pixels."""
    import numpy as np

    rgb = np.asarray(img.convert("RGB")).astype(int)
    want = [int(color[i:i + 2], 16) for i in (1, 3, 5)]
    mask = (np.abs(rgb - want).max(axis=2) <= 2)
    seen = np.zeros_like(mask)
    count = 0
    height, width = mask.shape
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        stack, size = [(y, x)], 0
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            size += 1
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        count += size >= 40
    return count
