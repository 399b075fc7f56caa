"""Text-to-image metrics: the FID Inception (pytorch-fid's network: TF pooling, same features as its
InceptionV3, weight loading, clear errors), centre patches,
FID / patch FID with a small injected feature network, and CLIP score with a random open_clip model
and a hand-built one (no pretrained weights exist offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_fid.inception import FIDInceptionA, FIDInceptionE_1, FIDInceptionE_2, InceptionV3

from dmd2.families.base import ModelLoadError
from dmd2.metrics import inception
from dmd2.metrics.clip_score import ClipScorer, load_clip_scorer
from dmd2.metrics.frechet import feature_stats, frechet_distance
from dmd2.metrics.inception import FIDInception, load_fid_inception
from dmd2.metrics.text_to_image import (TextToImageMetrics, center_crop, image_features, iter_image_batches,
                                        image_files, reference_stats)


# --- the FID Inception (pytorch-fid's blocks, our loading and resize) -------------------------------------
def test_tf_average_pool_excludes_the_padding():
    """On a constant input, TF's pool branch is constant up to the border; torch's default pool is not."""
    torch.manual_seed(0)
    block = FIDInceptionA(4, pool_features=3).eval()
    x = torch.full((1, 4, 6, 6), 0.7)
    with torch.no_grad():
        pool_branch = block(x)[:, -3:]                    # the last pool_features channels
        inside = block.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
        torch_default = block.branch_pool(F.avg_pool2d(x, 3, 1, 1))
    torch.testing.assert_close(pool_branch, inside)
    assert torch.allclose(pool_branch, pool_branch[..., :1, :1].expand_as(pool_branch))     # no border effect
    assert (torch_default[..., 0, 0] - pool_branch[..., 0, 0]).abs().max() > 1e-3      # which torch's has


def test_last_block_max_pools_its_pool_branch():
    torch.manual_seed(0)
    last, before = FIDInceptionE_2(8).eval(), FIDInceptionE_1(8).eval()
    before.load_state_dict(last.state_dict())
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(last(x)[:, -192:], last.branch_pool(F.max_pool2d(x, 3, 1, 1)))
        torch.testing.assert_close(before(x)[:, -192:],
                                   before.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)))
        torch.testing.assert_close(last(x)[:, :-192], before(x)[:, :-192])   # the other branches agree


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A randomly initialised FID Inception saved like pytorch-fid's file (a plain state dict). Variance-keeping
    conv weights and non-trivial batch-norm statistics, so that its features depend on the input (with
    torch's default init they shrink to constants by the last block)."""
    torch.manual_seed(0)
    net = FIDInception()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.8, 1.2), m.bias.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.net.state_dict(), path)
    return path, net


def test_inception_loads_a_state_dict_and_gives_pool3_features(inception_file):
    path, net = inception_file
    state = torch.load(path, weights_only=True)
    assert state["fc.weight"].shape == (1008, 2048) and "AuxLogits.fc.weight" not in state   # TF's 1008 classes
    loaded = load_fid_inception(path)
    images = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        feats = loaded(images)
        torch.testing.assert_close(feats, net(images))
        # any size is resized to 299 x 299 first, with an antialiased bicubic filter
        big = F.interpolate(images, size=(299, 299), mode="bicubic", align_corners=False, antialias=True)
        torch.testing.assert_close(loaded(big), feats)
    assert feats.shape == (2, 2048) and (feats >= 0).all()       # pool3: average of ReLU outputs


def test_inception_gives_pytorch_fid_features_and_fid(inception_file, tmp_path, monkeypatch):
    """Our network from a weights path == pytorch-fid's own InceptionV3 (which loads the same file from the
    torch.hub cache, the only place it looks), fed our antialiased resize: same features, so the same FID."""
    path, _ = inception_file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    inception.default_weights_path().parent.mkdir(parents=True)
    inception.default_weights_path().write_bytes(path.read_bytes())
    library = InceptionV3([3], resize_input=False, normalize_input=True).eval()      # no network: file is cached
    ours = load_fid_inception(path)
    rng = np.random.default_rng(0)
    sets = [np.clip(rng.integers(40, 200, (3, 1, 1, 3)) + shift + rng.normal(0, 40, (3, 64, 48, 3)), 0, 255)
            .astype(np.uint8) for shift in (0, 30)]

    def library_net(x):
        x = F.interpolate(x, size=(299, 299), mode="bicubic", align_corners=False, antialias=True)
        return library(x)[0].flatten(1)

    with torch.no_grad():
        mine = [image_features(a, ours) for a in sets]
        theirs = [image_features(a, library_net) for a in sets]
    for m, t in zip(mine, theirs):
        np.testing.assert_allclose(m, t, rtol=0, atol=1e-6)
    assert np.abs(mine[0] - mine[1]).mean() > 1e-3                 # the features do depend on the images
    fid = [frechet_distance(*feature_stats(f[0][:, :64]), *feature_stats(f[1][:, :64])) for f in (mine, theirs)]
    assert fid[0] > 1e-3 and fid[0] == pytest.approx(fid[1], rel=1e-9, abs=1e-12)   # 64 dims: 2048 take a minute


def test_inception_weight_errors_say_what_to_download(inception_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    default = tmp_path / "torch-home" / "hub" / "checkpoints" / inception.WEIGHTS_FILE
    assert inception.default_weights_path() == default
    for kwargs in (dict(path=tmp_path / "absent.pth"), dict(download=False)):
        with pytest.raises(ModelLoadError) as e:
            load_fid_inception(**kwargs)
        msg = str(e.value)
        assert "not found" in msg and inception.WEIGHTS_URL in msg and str(default) in msg
        assert "--inception-weights" in msg
    default.parent.mkdir(parents=True)
    default.write_bytes(b"not the weights")
    with pytest.raises(ModelLoadError, match="damaged"):
        load_fid_inception()
    path, _ = inception_file
    state = torch.load(path, weights_only=True)
    state.pop("Mixed_7c.branch_pool.conv.weight")
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ModelLoadError, match=r"not the FID Inception: 1 missing keys \['Mixed_7c.branch_pool"):
        load_fid_inception(tmp_path / "partial.pth")
    state = torch.load(path, weights_only=True)
    state["fc.weight"] = state["fc.weight"][:1000]                 # torchvision's 1000-class head
    torch.save(state, tmp_path / "imagenet1k.pth")
    with pytest.raises(ModelLoadError, match="not the FID Inception"):
        load_fid_inception(tmp_path / "imagenet1k.pth")


# --- centre patches and FID with a small feature network ----------------------------------------------
def test_center_crop_takes_the_exact_centre_pixels():
    h, w = 301, 310
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    images = np.stack([rows * 1000 + cols, -(rows * 1000 + cols)])[..., None]     # each pixel knows where it is
    patch = center_crop(images, 299)
    assert patch.shape == (2, 299, 299, 1)
    top, left = 1, 5                                                  # (301 - 299) // 2, (310 - 299) // 2
    assert patch[0, 0, 0, 0] == top * 1000 + left and patch[0, -1, -1, 0] == (top + 298) * 1000 + left + 298
    np.testing.assert_array_equal(patch[1], images[1, top:top + 299, left:left + 299])
    assert np.array_equal(center_crop(images[:, :299, :299], 299), images[:, :299, :299])   # no resize, ever
    with pytest.raises(ValueError, match="at least 299 x 299"):
        center_crop(images[:, :298], 299)


class SmallFeatures(torch.nn.Module):
    """A fixed random conv net: float images in [0, 1] -> 8 features (channel means and spatial contrast)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return torch.cat([y.mean((2, 3)), y.std((2, 3))], 1)


def _random_images(n, size=24, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, size=(n, 1, 1, 3))
    return np.clip(base + rng.normal(0, 30, size=(n, size, size, 3)), 0, 255).astype(np.uint8)


def _write_folder(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    return folder


def test_fid_and_patch_fid_against_a_reference_folder(tmp_path):
    net = SmallFeatures().eval()
    real = _random_images(64)
    ref = reference_stats(_write_folder(tmp_path / "ref", real), net, patch_size=8, batch_size=10)
    assert ref["n"] == 64 and ref["mu"].shape == (8,) and ref["patch_sigma"].shape == (8, 8)

    def evaluate(images):
        m = TextToImageMetrics(net, patch_size=8, batch_size=10)
        for i in range(0, len(images), 20):
            m.add(images[i:i + 20])
        return m.result(ref)

    same = evaluate(real)
    assert same["n"] == 64 and same["fid"] < 1e-6 and same["patch_fid"] < 1e-6     # PNGs are lossless
    fids = [evaluate(np.clip(real.astype(int) + s, 0, 255).astype(np.uint8)) for s in (10, 30, 60)]
    assert 0 < fids[0]["fid"] < fids[1]["fid"] < fids[2]["fid"]
    assert 0 < fids[0]["patch_fid"] < fids[1]["patch_fid"] < fids[2]["patch_fid"]
    # a change outside the centre 8 x 8 moves FID but not patch FID
    framed = real.copy()
    framed[:, :4] = 255
    result = evaluate(framed)
    assert result["patch_fid"] < 1e-6 < result["fid"]


def test_patch_features_are_the_centre_crop_features_and_small_images_skip_patch_fid():
    net = SmallFeatures().eval()
    images = _random_images(6, size=20)
    m = TextToImageMetrics(net, patch_size=8)
    m.add(images)
    np.testing.assert_allclose(m.patch_features[0], image_features(images[:, 6:14, 6:14], net))
    small = TextToImageMetrics(net, patch_size=299)
    small.add(images)
    result = small.result(dict(mu=np.zeros(8), sigma=np.eye(8)))
    assert result["patch_fid"] is None and "smaller than the 299 x 299 patch" in result["patch_fid_skipped"]
    with pytest.raises(ValueError, match="uint8"):
        m.add(images.astype(np.float32))


def test_reference_folder_errors_and_mixed_sizes(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        image_files(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        image_files(tmp_path / "empty")
    folder = _write_folder(tmp_path / "mixed", list(_random_images(3, size=16)) + list(_random_images(2, size=12)))
    assert [b.shape[:3] for b in iter_image_batches(image_files(folder), batch_size=2)] == \
        [(2, 16, 16), (1, 16, 16), (2, 12, 12)]
    with pytest.raises(ValueError, match="at least 2 reference images"):
        reference_stats(folder, SmallFeatures(), limit=1)


# --- CLIP score ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_clip():
    """A tiny randomly initialised open_clip CLIP with ViT-g-14's tokenizer (shipped with open_clip)."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16,
                                                          patch_size=8),
                           text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    return ClipScorer(model, open_clip.image_transform(32, is_train=False), open_clip.get_tokenizer("ViT-g-14"),
                      batch_size=3)


def test_clip_score_is_100_times_the_clamped_cosine(random_clip):
    images = _random_images(5, size=40, seed=1)
    prompts = ["a red cat", "a photo of a dog", "blue sky over the sea", "an astronaut", "a bowl of soup"]
    scores = random_clip.scores(images, prompts)
    with torch.no_grad():   # by hand: the model's own preprocessing, tokenizer and encoders
        img = torch.stack([random_clip.preprocess(Image.fromarray(i)) for i in images])
        a = random_clip.model.encode_image(img)
        b = random_clip.model.encode_text(random_clip.tokenizer(prompts))
    cos = F.cosine_similarity(a, b).numpy()
    np.testing.assert_allclose(scores, 100 * np.maximum(cos, 0), atol=1e-4)
    assert len(set(np.round(cos, 4))) == 5                       # the pairs really differ
    with pytest.raises(ValueError, match="one prompt per image"):
        random_clip.scores(images, prompts[:4])


class ColourClip(torch.nn.Module):
    """A hand-built CLIP: images embed as their mean (R, G, B) minus grey; the 'tokenizer' counts the
    colour words of a prompt and the text embedding is that count minus 0.2."""

    WORDS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1)}

    @classmethod
    def tokenize(cls, prompts):
        return torch.tensor([[float(sum(cls.WORDS[w][c] for w in p.split() if w in cls.WORDS)) for c in range(3)]
                             for p in prompts])

    def encode_image(self, x):
        return x.mean((2, 3)) - 0.5

    def encode_text(self, tokens):
        return tokens - 0.2


def test_clip_score_is_higher_for_matched_pairs():
    import torchvision.transforms.functional as TF

    scorer = ClipScorer(ColourClip(), TF.to_tensor, ColourClip.tokenize)
    colours = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}
    images = np.stack([np.full((8, 8, 3), c, np.uint8) for c in colours.values()])
    prompts = [f"a {name} square" for name in colours]
    matched = scorer.scores(images, prompts)
    shuffled = scorer.scores(images, prompts[1:] + prompts[:1])
    assert matched.min() > 50 and shuffled.max() == 0.0           # opposite colours: cos < 0, clamped to 0
    img = (np.array([230, 20, 20]) / 255 - 0.5)
    txt = np.array([0.8, -0.2, -0.2])
    assert matched[0] == pytest.approx(100 * img @ txt / np.linalg.norm(img) / np.linalg.norm(txt), abs=1e-4)


def test_metrics_accumulate_clip_scores_and_need_prompts(random_clip):
    m = TextToImageMetrics(clip=random_clip)
    images = _random_images(4, size=32)
    m.add(images[:2], ["a", "b"])
    m.add(images[2:], ["c", "d"])
    result = m.result()
    expected = random_clip.scores(images, ["a", "b", "c", "d"])
    assert result["n"] == 4 and "fid" not in result
    assert result["clip_score"] == pytest.approx(expected.mean())
    with pytest.raises(ValueError, match="needs the prompts"):
        m.add(images)


def test_clip_weights_missing_offline_say_what_to_download(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="CLIP weights not found: .*absent.bin"):
        load_clip_scorer(tmp_path / "absent.bin")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_clip_scorer(cache_dir=tmp_path / "empty-cache")
    msg = str(e.value)
    assert "hf download laion/CLIP-ViT-g-14-laion2B-s12B-b42K open_clip_model.safetensors" in msg
    assert "--clip-weights" in msg and "ViT-g-14" in msg
