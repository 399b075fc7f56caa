"""Sample requests for the same class model that wait at the same time run as one batch, same images as alone.

On a CPU a small UNet at 4 images is far from its best images per second, and a crowd of Arena rounds
waits for the same two or three models. `Batcher.sample` queues each request under its model; a caller
that finds a free slot takes every request waiting for one of its models (up to `max_images` images) and
samples them in one forward batch, each with its own labels and seed, then hands every caller its own
images. Callers run the batches themselves (no worker threads), so at most `slots` batches run at once.

An image stays a function of its own (model, labels, seed): each request's starting noise is
`initial_noise(family, n, seed)` and a student's re-noising noise comes from its own generator seeded by
`seed`, drawn in the order `student_sample` draws it. What the batch can change is only how a kernel
splits the work, which on this CPU gives bit-identical images (tests/test_arena_batching.py checks it).
Models whose sampling is not plain pixel DDIM or a plain few-step student (text models, guidance-conditioned
students) are sampled per request with `LoadedModel.generate`.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from dmd2.images import to_uint8
from dmd2.sampling import ddim_sample, initial_noise, renoise_seed, student_sample

MAX_IMAGES = 48     # images per batch at most: the MNIST teacher's seconds per image stop falling near 32-48


@dataclass(eq=False)
class Request:
    """One caller's images from one model: `labels` (one image each) from `seed`; `images` or `error` when done."""

    model: object                  # a registry.LoadedModel
    labels: list[int]
    seed: int
    autocast: bool = False
    guidance: float | None = None  # a guidance-conditioned student's w (such students sample per request)
    images: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False
    order: int = field(default=0, repr=False)


def batchable(model) -> bool:
    """Can `model`'s requests share a batch here: a pixel-family teacher, or a pixel student without a w input."""
    if model.conditioning != "class" or model.spec.family != "pixel":
        return False
    return model.spec.kind == "teacher" or getattr(model.unet.config, "time_cond_proj_dim", None) is None


def sample_batch(requests: list[Request]) -> list[np.ndarray]:
    """Each request's uint8 images, from one batch of its shared model (what `model.generate` gives alone)."""
    model, autocast = requests[0].model, requests[0].autocast
    if not batchable(model):
        return [model.generate(r.labels, r.seed, autocast=autocast, guidance=r.guidance).images for r in requests]
    family = model.family
    sizes = [len(r.labels) for r in requests]
    noise = torch.cat([initial_noise(family, n, r.seed) for n, r in zip(sizes, requests)])
    cond = family.condition(np.concatenate([np.asarray(r.labels, dtype=np.int64) for r in requests]))
    if model.spec.kind == "teacher":
        g = model.spec.guidance if model.spec.guidance is not None else family.default_guidance
        x = ddim_sample(family, model.unet, cond, noise, model.spec.steps, float(g), autocast)
    else:
        x = student_sample(family, model.unet, cond, noise, list(model.timesteps), autocast=autocast,
                           request_seeds=[(renoise_seed(r.seed), n) for r, n in zip(requests, sizes)],
                           renoise=model.renoise)
    return np.split(to_uint8(family.decode(x)), np.cumsum(sizes)[:-1])


class Batcher:
    """Coalesces concurrent `Request`s for the same model into batches of at most `max_images` images,
    running at most `slots` batches at once (one per core group, like the app's generation slots)."""

    def __init__(self, slots: int = 1, max_images: int = MAX_IMAGES):
        if slots < 1 or max_images < 1:
            raise ValueError(f"slots and max_images must be >= 1, got {slots} and {max_images}")
        self.slots, self.max_images = slots, max_images
        self._free = slots
        self._waiting: dict[tuple, list[Request]] = {}
        self._cv = threading.Condition()
        self._count = itertools.count()
        self.batches: list[int] = []        # requests per batch run so far (for benchmarks and tests)

    @staticmethod
    def _key(r: Request) -> tuple:
        return id(r.model), r.autocast, r.guidance

    def sample(self, requests: list[Request]) -> list[Request]:
        """Run `requests` (each alone or batched with others' waiting ones); returns them with images or error."""
        with self._cv:
            for r in requests:
                r.order = next(self._count)
                self._waiting.setdefault(self._key(r), []).append(r)
            while not all(r.done for r in requests):
                batch = self._take(requests) if self._free else None
                if batch is None:
                    self._cv.wait()
                    continue
                self._free -= 1
                self._cv.release()
                try:
                    self._run(batch)
                finally:
                    self._cv.acquire()
                    self._free += 1
                    for r in batch:
                        r.done = True
                    self._cv.notify_all()
        return requests

    def _take(self, mine: list[Request]) -> list[Request] | None:
        """The oldest waiting requests of the model of one of `mine` still waiting, up to max_images images."""
        keys = {self._key(r) for r in mine if not r.done and r in self._waiting.get(self._key(r), ())}
        if not keys:
            return None
        key = min(keys, key=lambda k: self._waiting[k][0].order)
        queue, batch, images = self._waiting[key], [], 0
        while queue and (not batch or images + len(queue[0].labels) <= self.max_images):
            images += len(queue[0].labels)
            batch.append(queue.pop(0))
        if not queue:
            del self._waiting[key]
        return batch

    def _run(self, batch: list[Request]) -> None:
        """Sample `batch`; a failure is every request's error (they share the model that failed)."""
        self.batches.append(len(batch))
        try:
            for r, images in zip(batch, sample_batch(batch)):
                r.images = images
        except Exception as e:     # noqa: BLE001 - handed to each caller, who reports it per side
            for r in batch:
                r.error = e
