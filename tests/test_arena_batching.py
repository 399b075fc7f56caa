"""dmd2/batching.py: concurrent Arena requests for one model share a batch, and every image stays what it is alone."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from conftest import make_tiny_students, tiny_pixel_unet, write_broken_model
from dmd2 import batching, registry
from dmd2.arena import VoteStore
from dmd2.batching import Batcher, Request, sample_batch
from dmd2.families.pixel import save_pixel_unet
from dmd2.ui.arena import Arena

# (class, seed) of the requests that share a batch: different labels, seeds and sizes
REQUESTS = [(3, 11, 4), (7, 12345, 4), (0, 99, 2), (3, 5, 3)]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny teacher (10 DDIM steps), tiny 1- and 2-step students, and a folder that fails to load."""
    root = tmp_path_factory.mktemp("models")
    save_pixel_unet(tiny_pixel_unet(1), root / "tiny-teacher")
    students = make_tiny_students(root)
    registry.BUILTIN["tiny-teacher-10"] = registry.ModelSpec("tiny-teacher-10", root / "tiny-teacher", "teacher",
                                                             steps=10)
    registry.BUILTIN["tiny-teacher-cfg"] = registry.ModelSpec("tiny-teacher-cfg", root / "tiny-teacher", "teacher",
                                                              steps=10, guidance=2.0)
    yield ["tiny-teacher-10", *students, str(write_broken_model(root / "broken", like=root / "tiny-1step"))]
    registry.BUILTIN.pop("tiny-teacher-10")
    registry.BUILTIN.pop("tiny-teacher-cfg")


def test_a_teacher_with_cfg_batches_to_the_same_images(tiny_models):
    """CFG doubles the batch with null labels: each request still gets its images alone."""
    model = registry.load("tiny-teacher-cfg")
    requests = [Request(model, [label] * n, seed, True) for label, seed, n in REQUESTS]
    for r, images in zip(requests, sample_batch(requests)):
        assert np.array_equal(images, model.generate(r.labels, r.seed, autocast=True).images)


@pytest.mark.parametrize("name", ["mnist-teacher", "mnist-dmd2-1step", "mnist-dmd2-4step"])
@pytest.mark.parametrize("bf16", [True, False])
def test_a_batch_gives_each_request_the_images_it_gets_alone(name, bf16):
    """The embedded models (teacher at its default 50 steps), bf16 autocast as the Arena and fp32: bit-identical."""
    model = registry.load(name)
    requests = [Request(model, [label] * n, seed, bf16) for label, seed, n in REQUESTS]
    batched = sample_batch(requests)
    for r, images in zip(requests, batched):
        alone = model.generate(r.labels, r.seed, autocast=bf16).images
        assert images.shape == alone.shape and np.array_equal(images, alone), (name, r.labels[0], r.seed)


def test_concurrent_requests_share_batches_and_each_gets_its_own_images(tiny_models, monkeypatch):
    teacher, student = registry.load(tiny_models[0]), registry.load(tiny_models[2])
    batcher, started, release = Batcher(slots=1), threading.Event(), threading.Event()
    real = batching.sample_batch

    def first_waits(batch):
        if not started.is_set():        # hold the only slot until every other request is queued
            started.set()
            assert release.wait(30)
        return real(batch)
    monkeypatch.setattr(batching, "sample_batch", first_waits)
    rounds = [[Request(teacher, [c] * 4, s), Request(student, [c] * 4, s)] for c, s, _ in REQUESTS]
    threads = [threading.Thread(target=batcher.sample, args=(rounds[0],))]
    threads[0].start()
    assert started.wait(30)
    threads += [threading.Thread(target=batcher.sample, args=(r,)) for r in rounds[1:]]
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 30
    while sum(len(q) for q in batcher._waiting.values()) < 2 * len(rounds) - 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join(60)
    # the first batch alone, then the 7 waiting requests in one batch per model
    assert sorted(batcher.batches) == [1, 3, 4], batcher.batches
    for r in (r for pair in rounds for r in pair):
        assert r.done and r.error is None
        assert np.array_equal(r.images, r.model.generate(r.labels, r.seed).images)


def test_batches_respect_the_slots_and_the_image_cap(tiny_models, monkeypatch):
    student = registry.load(tiny_models[1])
    batcher, lock, running, peak, sizes = Batcher(slots=2, max_images=8), threading.Lock(), [0], [0], []
    real = batching.sample_batch

    def counting(batch):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            sizes.append(sum(len(r.labels) for r in batch))
        time.sleep(0.05)
        try:
            return real(batch)
        finally:
            with lock:
                running[0] -= 1
    monkeypatch.setattr(batching, "sample_batch", counting)
    requests = [Request(student, [i % 10] * 3, i) for i in range(12)]
    threads = [threading.Thread(target=batcher.sample, args=([r],)) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r.done and r.images.shape[0] == 3 for r in requests)
    assert peak[0] <= 2 and max(sizes) <= 8 and sum(sizes) == 36
    with pytest.raises(ValueError, match="slots and max_images must be >= 1"):
        Batcher(slots=0)


def test_a_failing_batch_is_each_of_its_requests_error_and_the_batcher_goes_on(tiny_models, monkeypatch):
    student = registry.load(tiny_models[1])
    batcher = Batcher(slots=1)
    monkeypatch.setattr(batching, "sample_batch", lambda batch: (_ for _ in ()).throw(RuntimeError("out of memory")))
    failed = batcher.sample([Request(student, [1] * 4, 0), Request(student, [2] * 4, 1)])
    assert all(r.done and r.images is None and "out of memory" in str(r.error) for r in failed)
    monkeypatch.undo()
    ok = batcher.sample([Request(student, [1] * 4, 0)])[0]
    assert ok.error is None and ok.images.shape == (4, 32, 32, 1)


def test_arena_rounds_with_a_batcher_are_the_rounds_without(tiny_models, tmp_path):
    """Same draws (rng seed), same images, from concurrent rounds; a broken side still fails on its own."""
    with VoteStore(tmp_path / "votes.sqlite") as store:
        plain = Arena(tiny_models[:3], store, rng=np.random.default_rng(4), bf16=False)
        batched = Arena(tiny_models[:3], store, rng=np.random.default_rng(4), bf16=False, batcher=Batcher(slots=2))
        want = [plain.new_round() for _ in range(6)]
        got = []
        threads = [threading.Thread(target=lambda: got.append(batched.new_round())) for _ in range(6)]
        for t in threads:        # the draws take the arena's rng in turn: the same six battles as `plain`
            t.start()
        for t in threads:
            t.join(60)
        assert len(got) == 6 and all(r.votable for r in got)
        by_prompt_seed = {(r.prompt, batched.book.verify(r.token)["seed"]): r for r in got}
        for w in want:
            b = plain.book.verify(w.token)
            g = by_prompt_seed[(w.prompt, b["seed"])]
            pair = batched.book.verify(g.token)
            assert (pair["model_a"], pair["model_b"]) == (b["model_a"], b["model_b"])
            assert np.array_equal(g.image_a, w.image_a) and np.array_equal(g.image_b, w.image_b)
        broken = Arena([tiny_models[1], tiny_models[3]], store, rng=np.random.default_rng(0),
                       batcher=Batcher(slots=2)).new_round("1")
        assert not broken.votable and "failed to generate" in broken.message
        assert (broken.image_a is None) != (broken.image_b is None)
