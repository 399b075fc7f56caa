"""benchmarks/sdxl_gpu.py --tiny: the GPU benchmark's code runs end to end on CPU and writes its JSON
(the keys a GPU run fills in; ratios and throughputs positive and finite; no timing thresholds)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from dmd2.sampling import bf16_is_native

ROOT = Path(__file__).resolve().parent.parent


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_sdxl_gpu_benchmark_tiny_writes_its_json(tmp_path):
    out = tmp_path / "sdxl_gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/sdxl_gpu.py"), "--tiny", "--json", str(out),
                           "--workdir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| lora |" in proc.stdout and "teacher 50-step DDIM + CFG" in proc.stdout  # the printed tables
    r = json.loads(out.read_text())
    assert r["tiny"] is True and r["resolution"] == 64 and r["batch_size"] == 2 and r["unet_params"] > 0
    assert set(r["modes"]) == {"lora", "full"}
    assert r["precision"] == ("bf16" if bf16_is_native("cpu") else "fp32")
    for name, m in r["modes"].items():
        assert m["ok"] and m["error"] is None, (name, m)
        for key in ("critic_step_ratio", "generator_step_ratio", "critic_step_ms", "generator_step_ms", "peak_rss_gib"):
            assert positive(m[key]), (name, key, m[key])
        assert all(positive(v) for v in m["passes_ms"].values()), m["passes_ms"]
        assert {"generator fwd+bwd", "fake score fwd+bwd", "real + fake score forwards"} <= set(m["passes_ms"])
        # the presets' bf16 frozen parts, or fp32 on a CPU that would only emulate bf16 (many times slower)
        assert m["gradient_checkpointing"] and m["frozen_dtype"] == ("bf16" if r["precision"] == "bf16" else "fp32")
    assert r["modes"]["lora"]["lora_rank"] == 64 and r["modes"]["full"]["lora_rank"] == 0
    s = r["sampling"]
    for key in ("teacher_50step_cfg_images_per_s", "student_4step_images_per_s", "student_1step_images_per_s",
                "student_4step_speedup_vs_teacher", "student_1step_speedup_vs_teacher"):
        assert positive(s[key]), (key, s[key])
    assert positive(r["seconds"])
