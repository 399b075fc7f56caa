"""The mean of the weights of several pixel students or checkpoints, written as a student folder.

`python -m training export --run RUN --step ...` averages the checkpoints of one run; this script also mixes
runs (a "model soup") and can take a checkpoint's raw generator instead of its EMA (README, *Results*):

    python scripts/average_weights.py --like assets/mnist/dmd2-4step --out runs/soup \\
        runs/gan-t30/checkpoints/step-00000500 runs/gan-t100/checkpoints/step-00000500

SOURCE: a student folder, or a checkpoint folder (its EMA; `FOLDER:generator` for its raw generator).
--weights W1 W2 ...: a weighted mean (normalised to sum 1), e.g. to weigh a run's start more.
--like: the student whose timesteps, family and teacher the result gets (its weights are not used).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dmd2.families.pixel import PixelFamily, load_pixel_unet
from training.export import mean_state_dict


def load_weights(source: str) -> dict[str, torch.Tensor]:
    """A state dict from a student folder or a checkpoint folder (`:generator` for the raw generator)."""
    folder, _, key = source.partition(":")
    path = Path(folder)
    if (path / "state.pt").is_file():
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        key = key or "ema"
        if state.get(key) is None:
            raise ValueError(f"{source}: the checkpoint has no {key!r} weights")
        return state[key]
    if key:
        raise ValueError(f"{source}: ':{key}' only applies to a checkpoint folder (with state.pt)")
    return load_pixel_unet(path).state_dict()


def average(sources: list[str], like: str | Path, out: str | Path, weights: list[float] | None = None) -> Path:
    """Write the mean of `sources`' weights (weighted by `weights`, normalised to sum 1) to the new folder
    `out`, with `like`'s student metadata."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new --out")
    if not sources:
        raise ValueError("no source to average")
    if weights is not None and (len(weights) != len(sources) or min(weights) < 0 or sum(weights) <= 0):
        raise ValueError(f"--weights needs one non-negative number per source ({len(sources)}) with a positive sum, "
                         f"got {weights}")
    unet = load_pixel_unet(like)
    meta = json.loads((Path(like) / "dmd2.json").read_text())
    names = set(unet.state_dict())

    def each():
        for source in sources:
            state = load_weights(source)
            if set(state) != names:
                raise ValueError(f"{source}: its network differs from {like}'s")
            yield state

    unet.load_state_dict(mean_state_dict(each(), weights))
    # `like`'s dmd2.json whole (timesteps, family, teacher, and what else it records: how it moves between steps,
    # a guidance range, a flow shift), so the average samples as `like` does
    PixelFamily.from_unet(unet, like).save_student(unet, out, **{"family": "pixel", **meta})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sources", nargs="+", help="student folders or checkpoint folders (FOLDER:generator: raw generator)")
    p.add_argument("--like", required=True, help="student folder whose timesteps/family/teacher the result gets")
    p.add_argument("--out", required=True, help="new student folder")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per source (default: equal weights)")
    a = p.parse_args(argv)
    print(f"the mean of {len(a.sources)} written to {average(a.sources, a.like, a.out, a.weights)}")


if __name__ == "__main__":
    main()
