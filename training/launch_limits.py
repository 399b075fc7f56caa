"""What a launch from the app may ask for: bounds on the numeric knobs and where its paths may point.

The command line trusts its user; the app's Train tab is reachable by whoever holds the admin token, so
its launches are confined (issue 16): numbers within the bounds below, the family one of the app's
presets, and every path inside the project, the runs folder, the Hugging Face cache, our latent cache
or a folder listed in $DMD2_DATA_ROOTS (os.pathsep-separated).
"""

from __future__ import annotations

import os
from pathlib import Path

from training.config import DistillConfig

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOTS_ENV = "DMD2_DATA_ROOTS"
# config key -> (lowest, highest) a launch from the app may set; each refusal names the key and the bound.
BOUNDS = {
    "iterations": (1, 1_000_000), "batch_size": (1, 1024), "ttur": (1, 100), "student_steps": (1, 8),
    "generator_lr": (1e-9, 1e-2), "critic_lr": (1e-9, 1e-2), "warmup_steps": (0, 1_000_000),
    "weight_decay": (0.0, 1.0), "grad_clip": (1e-3, 1e4), "dm_weight": (0.0, 10.0), "real_guidance": (0.0, 20.0),
    "gan_generator_weight": (0.0, 10.0), "gan_critic_weight": (0.0, 10.0), "regression_weight": (0.0, 10.0),
    "lora_rank": (0, 1024), "lora_alpha": (1e-3, 1e4), "resolution": (8, 2048), "eval_num": (0, 50_000),
    "keep_checkpoints": (1, 100), "log_every": (0, 1_000_000), "sample_every": (0, 1_000_000), "eval_every": (0, 1_000_000),
    "checkpoint_every": (0, 1_000_000),
}
PATH_KEYS = ("teacher", "data", "generator_init", "latent_cache_dir", "prompts", "regression_pairs")


class LaunchRefused(ValueError):
    """A launch asks for more than the app allows; the message names the key and the bound."""


def allowed_roots(runs_root: Path) -> list[Path]:
    """The folders a launch's paths may point into."""
    from huggingface_hub.constants import HF_HUB_CACHE

    extra = [Path(p) for p in os.environ.get(DATA_ROOTS_ENV, "").split(os.pathsep) if p]
    roots = [ROOT, Path(runs_root), Path(HF_HUB_CACHE), Path("~/.cache/dmd2").expanduser(), *extra]
    return [r.expanduser().resolve() for r in roots]


def _is_hub_source(key: str, value: str) -> bool:
    """Values that are not local paths: the embedded data set, an `hf:` data set, a Hub repo id teacher."""
    from dmd2.hub import is_repo_id

    if key == "data" and (value == "mnist5k" or value.startswith("hf:")):
        return True
    return key == "teacher" and not (ROOT / value).exists() and not Path(value).exists() and is_repo_id(value)


def check_launch(cfg: DistillConfig, runs_root: Path, families: set[str]) -> None:
    """LaunchRefused unless `cfg` keeps within BOUNDS, its family is one of `families` and its paths lie
    inside `allowed_roots(runs_root)`."""
    if cfg.family not in families:
        raise LaunchRefused(f"family={cfg.family!r}: this app trains only {', '.join(sorted(families))}")
    for key, (low, high) in BOUNDS.items():
        value = getattr(cfg, key)
        if value is not None and not low <= value <= high:
            raise LaunchRefused(f"{key}={value!r} is outside the app's bounds {low:g}..{high:g}")
    if cfg.real_guidance_above is not None:     # its w is a real-score CFG scale like real_guidance
        low, high = BOUNDS["real_guidance"]
        if not low <= cfg.real_guidance_above[1] <= high:
            raise LaunchRefused(f"real_guidance_above={cfg.real_guidance_above!r}: its w is outside the app's bounds "
                                f"{low:g}..{high:g}")
    roots = allowed_roots(runs_root)
    for key in PATH_KEYS:
        value = getattr(cfg, key)
        if value is None or _is_hub_source(key, str(value)):
            continue
        path = Path(str(value)).expanduser()
        path = (path if path.is_absolute() else ROOT / path).resolve()    # the trainer runs in ROOT
        if not any(path == r or r in path.parents for r in roots):
            raise LaunchRefused(f"{key}={value!r} points outside the folders the app may read or write "
                                f"(the project, the runs folder, the Hugging Face cache, ~/.cache/dmd2, "
                                f"or ${DATA_ROOTS_ENV})")
