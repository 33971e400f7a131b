"""Write the golden checkpoint of the current format version into tests/golden/v<N>/.

Run once when a new format version is introduced; never regenerate an existing version's folder: every later
ckptkit must keep reading it (tests/test_schema.py loads each one).

    python tests/golden/make_golden.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from golden_model import build, fill

import ckptkit
from ckptkit.schema import FORMAT_VERSION, DataSegment, Progress

out = Path(__file__).parent / f"v{FORMAT_VERSION}"
if out.exists():
    sys.exit(f"{out} exists: golden checkpoints are never regenerated")
model, opt, sched, scaler = build()
fill(model, opt, sched, scaler)
ckptkit.save(
    str(out), {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler,
               "extras": {"tuple": (1, 2.5), "nan": float("nan"), "bytes": b"ck", "ints": {3: "three"}}},
    "golden", rng=True, progress=Progress(epoch=2, global_step=40, step_in_epoch=8, samples_seen=1280),
    metrics={"loss": 0.125, "diverged": float("inf")}, hparams={"lr": 0.01, "betas": [0.9, 0.99]},
    data=[DataSegment(name="toy", uri="memory://toy", fingerprint="abc", size=64, split="train",
                      samples_consumed=1280)],
)  # fmt: skip
print(f"wrote {out}")
