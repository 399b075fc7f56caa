"""Real images: the bundled MNIST 5k, folders of class images, and the resumable batch sampler."""

import io

import numpy as np
import pytest
import torch

from training.data import DataError, InfiniteSampler, load_dataset, load_image_folder, load_mnist5k

from conftest import write_png


@pytest.fixture(scope="module")
def mnist():
    return load_mnist5k()  # ~3 s: load once per module


def test_mnist5k_shapes_range_and_balance(mnist):
    images, labels = mnist
    assert images.shape == (5000, 1, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (5000,) and labels.dtype == torch.int64
    assert images.min() == -1.0 and images.max() == 1.0
    assert (images[:, :, :2, :] == -1).all() and (images[:, :, :, -2:] == -1).all()  # 28 -> 32 padding
    assert torch.bincount(labels, minlength=10).tolist() == [500] * 10
    # digits are mostly background with some ink, not noise or a constant
    ink = (images > 0).float().mean()
    assert 0.05 < ink < 0.3


def _make_folder(root):
    """a_bright: 2 white images; b_dark: 3 black images (one non-square); plus files that are not images."""
    for i in range(2):
        write_png(root / "a_bright" / f"{i}.png", np.full((12, 12), 255))
    for i in range(3):
        write_png(root / "b_dark" / f"{i}.png", np.zeros((20, 10) if i == 0 else (12, 12)))
    (root / "b_dark" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("a file at the root is not a class")


def test_image_folder_labels_by_sorted_class_name(tmp_path):
    _make_folder(tmp_path)
    images, labels, classes = load_image_folder(tmp_path, image_size=8)
    assert classes == ["a_bright", "b_dark"]
    assert images.shape == (5, 1, 8, 8) and images.dtype == torch.float32
    assert labels.tolist() == [0, 0, 1, 1, 1]
    assert (images[:2] == 1.0).all() and (images[2:] == -1.0).all()


def test_image_folder_rgb(tmp_path):
    red = np.zeros((9, 9, 3))
    red[..., 0] = 255
    write_png(tmp_path / "red" / "r.png", red)
    write_png(tmp_path / "grey" / "g.png", np.full((9, 9), 255))
    images, labels, classes = load_image_folder(tmp_path, image_size=4, channels=3)
    assert classes == ["grey", "red"] and labels.tolist() == [0, 1]
    assert images.shape == (2, 3, 4, 4)
    assert (images[0] == 1).all()  # grey converted to RGB: all channels white
    assert (images[1, 0] == 1).all() and (images[1, 1:] == -1).all()


def test_load_dataset_folder(two_class_folder):
    images, labels = load_dataset(str(two_class_folder), image_size=16)
    assert images.shape == (12, 1, 16, 16)
    assert torch.bincount(labels).tolist() == [6, 6]
    # 'left' images are bright on the left, 'right' ones on the right
    assert images[0, 0, :, :8].mean() > images[0, 0, :, 8:].mean()
    assert images[-1, 0, :, 8:].mean() > images[-1, 0, :, :8].mean()


def test_missing_folder_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="not found") as e:
        load_image_folder(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    with pytest.raises(DataError):
        load_dataset(str(tmp_path / "nope"))
    assert issubclass(DataError, ValueError)


def test_folder_without_class_folders_raises_data_error(tmp_path):
    write_png(tmp_path / "loose.png", np.zeros((4, 4)))
    with pytest.raises(DataError, match="no class sub-folders") as e:
        load_image_folder(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_class_folders_without_images_raise_data_error(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "list.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_image_raises_data_error_naming_the_file(tmp_path, damage):
    write_png(tmp_path / "ok" / "0.png", np.zeros((8, 8)))
    bad = tmp_path / "ok" / "1.png"
    if damage == "garbage":
        bad.write_bytes(b"definitely not a png")
    else:
        write_png(bad, np.random.default_rng(0).integers(0, 256, (64, 64)))
        bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataError, match="cannot read image") as e:
        load_image_folder(tmp_path)
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("n,batch_size", [(10, 3), (10, 10), (7, 4), (3, 7)])
def test_infinite_sampler_covers_each_index_once_per_epoch(n, batch_size):
    sampler = InfiniteSampler(n, batch_size, seed=0)
    epochs = 4
    batches = [sampler.next() for _ in range(epochs * n // batch_size + 1)]
    assert all(len(b) == batch_size for b in batches)
    flat = torch.cat(batches)
    for e in range(epochs):
        assert sorted(flat[e * n:(e + 1) * n].tolist()) == list(range(n))
    orders = {tuple(flat[e * n:(e + 1) * n].tolist()) for e in range(epochs)}
    if n >= 7:
        assert len(orders) > 1  # epochs are reshuffled


def test_infinite_sampler_seeds():
    a = InfiniteSampler(50, 10, seed=1).next()
    assert torch.equal(a, InfiniteSampler(50, 10, seed=1).next())
    assert not torch.equal(a, InfiniteSampler(50, 10, seed=2).next())
    with pytest.raises(ValueError):
        InfiniteSampler(10, 0)


def test_infinite_sampler_state_round_trip_reproduces_next_batches():
    sampler = InfiniteSampler(10, 4, seed=3)
    for _ in range(4):  # stop mid-epoch, past one reshuffle
        sampler.next()
    buf = io.BytesIO()
    torch.save(sampler.state_dict(), buf)  # as a checkpoint would
    expected = [sampler.next() for _ in range(8)]  # crosses several epoch boundaries

    resumed = InfiniteSampler(10, 4, seed=999)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert all(torch.equal(resumed.next(), e) for e in expected)


def test_state_dict_is_a_snapshot_not_a_live_view():
    sampler = InfiniteSampler(6, 4, seed=0)
    state = sampler.state_dict()
    expected = [sampler.next() for _ in range(5)]
    resumed = InfiniteSampler(6, 4, seed=1)
    resumed.load_state_dict(state)  # taken before those 5 batches: must replay them
    assert all(torch.equal(resumed.next(), e) for e in expected)
