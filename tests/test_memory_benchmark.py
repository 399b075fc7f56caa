"""benchmarks/memory.py runs in CI (issue 17): the per-GPU bytes of each SD preset from the real-size models'
parameter counts, checked against arithmetic that does not depend on the script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 2 ** 30


def test_memory_table_of_the_real_size_presets(tmp_path):
    out = tmp_path / "memory.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks/memory.py"), "--gpus", "1", "8", "--json", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "activations not included" in p.stdout
    rows = {(r["preset"], r["mode"]): r for r in json.loads(out.read_text())}
    full, sharded = rows[("sdxl-4step", "full")], rows[("sdxl-4step", "full, FSDP/8")]
    assert full["unet_params"] == 2_567_463_684                       # SDXL-base's UNet (the public config)
    # AdamW keeps two fp32 moments of the trained generator and fake score (+ GAN head): at least 2 x 4 bytes x 2 UNets
    assert full["optimizer_bytes"] >= 2 * 4 * 2 * full["unet_params"]
    assert sharded["optimizer_bytes"] * 8 == full["optimizer_bytes"]  # FSDP over 8 shards the moments 8 ways
    assert sharded["total_bytes"] < full["total_bytes"]
    for r in rows.values():
        assert r["total_bytes"] == sum(r[k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes",
                                                      "fsdp_gather_bytes"))
