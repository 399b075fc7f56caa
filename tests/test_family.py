"""PixelFamily: conditioning, denoise with CFG, the bottleneck, and saving/loading weights."""

import json

import pytest
import torch
from diffusers import UNet2DModel

from dmd2.families.base import ModelLoadError
from dmd2.families.pixel import PixelFamily, load_pixel_unet

from conftest import TINY_UNET


def _inputs(family, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(family.latent_shape(n), generator=g)


def test_shapes(family, unet):
    x = _inputs(family)
    t = torch.tensor([10, 500, 999])
    cond = family.condition([0, 1, 2])
    assert family.latent_shape(3) == (3, 1, 8, 8)
    assert family.model_output(unet, x, t, cond).shape == x.shape
    assert family.denoise(unet, x, 500, cond).shape == x.shape  # scalar t is expanded to the batch
    assert family.denoise(unet, x, t, cond, guidance=3.0).shape == x.shape
    feats = family.bottleneck(unet, x, t, cond)
    assert feats.shape == (3, family.bottleneck_channels(unet), 4, 4)
    assert family.bottleneck_channels(unet) == 16


def test_denoise_without_guidance_is_the_conditional_x0(family, unet):
    x = _inputs(family)
    t = torch.tensor([999, 600, 20])
    cond = family.condition([2, 0, 1])
    v = family.model_output(unet, x, t, cond)
    expected = family.schedule.v_to_x0(x, v, t)
    assert torch.equal(family.denoise(unet, x, t, cond, guidance=1.0), expected)


@pytest.mark.parametrize("g", [0.0, 2.0, 4.5])
def test_denoise_guidance_is_uncond_plus_g_times_difference(family, unet, g):
    x = _inputs(family)
    t = torch.tensor([999, 400, 50])
    cond = family.condition([0, 1, 2])
    x0_cond = family.schedule.v_to_x0(x, family.model_output(unet, x, t, cond), t)
    x0_uncond = family.schedule.v_to_x0(x, family.model_output(unet, x, t, family.null_condition(3)), t)
    assert (x0_cond - x0_uncond).abs().max() > 1e-3  # the label must matter, or this test proves nothing
    expected = x0_uncond + g * (x0_cond - x0_uncond)
    torch.testing.assert_close(family.denoise(unet, x, t, cond, guidance=g), expected, atol=1e-5, rtol=1e-5)


def test_bottleneck_is_the_mid_block_output_and_skips_the_decoder(family, unet):
    x = _inputs(family)
    t = torch.tensor([999, 500, 1])
    cond = family.condition([1, 2, 0])
    mid_out, up_calls = [], []
    h_mid = unet.mid_block.register_forward_hook(lambda m, i, o: mid_out.append(o))
    h_up = unet.up_blocks[0].register_forward_hook(lambda m, i, o: up_calls.append(1))
    h_out = unet.conv_out.register_forward_hook(lambda m, i, o: up_calls.append(2))
    try:
        with torch.no_grad():
            family.model_output(unet, x, t, cond)
            assert len(mid_out) == 1 and up_calls == [1, 2]  # the hooks do fire in a full forward
            up_calls.clear()
            feats = family.bottleneck(unet, x, t, cond)
    finally:
        h_mid.remove(), h_up.remove(), h_out.remove()
    assert up_calls == []  # the decoder half never ran
    assert len(mid_out) == 2
    torch.testing.assert_close(feats, mid_out[0], atol=1e-6, rtol=1e-6)
    # and it depends on the label (the class embedding is added, not skipped)
    other = family.bottleneck(unet, x, t, family.condition([0, 0, 0]))
    assert (other - feats).abs().max() > 1e-4


def test_bottleneck_carries_gradients(family, unet):
    x = _inputs(family)
    unet.requires_grad_(True)
    family.bottleneck(unet, x, torch.tensor([3, 4, 5]), family.condition([0, 1, 2])).square().mean().backward()
    assert unet.mid_block.resnets[0].conv1.weight.grad is not None
    assert unet.conv_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in unet.up_blocks.parameters())


def test_condition_validates_labels(family):
    assert torch.equal(family.condition([0, 2, 1]), torch.tensor([0, 2, 1]))
    assert family.condition(torch.tensor([1])).dtype == torch.long
    for bad in ([3], [-1], [0, 1, 7]):
        with pytest.raises(ValueError, match="0..2"):
            family.condition(bad)


def test_null_condition_is_the_extra_class(family, unet):
    null = family.null_condition(5)
    assert null.dtype == torch.long and torch.equal(null, torch.full((5,), 3))
    assert unet.config.num_class_embeds == family.num_classes + 1
    with pytest.raises(ValueError):
        family.condition(null)  # a user label may not be the null class
    x = _inputs(family, n=5)
    assert family.denoise(unet, x, 999, null).isfinite().all()


def test_from_unet_matches_the_config(unet):
    fam = PixelFamily.from_unet(unet)
    assert (fam.num_classes, fam.image_size, fam.channels) == (3, 8, 1)


def test_decode_clamps_and_encode_is_identity(family):
    x = torch.tensor([-3.0, -0.5, 0.0, 2.0])
    assert torch.equal(family.encode(x), x)
    assert torch.equal(family.decode(x), torch.tensor([-1.0, -0.5, 0.0, 1.0]))


def test_save_load_round_trip_also_in_plain_diffusers(family, make_unet, tmp_path):
    unet = make_unet(seed=7)
    out = tmp_path / "student"
    family.save_student(unet, out, timesteps=[999, 749, 499, 249])
    assert (out / "config.json").is_file()
    assert (out / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((out / "dmd2.json").read_text()) == {"timesteps": [999, 749, 499, 249]}

    loaded = family.load_student(out)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    ref, got = unet.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)

    plain = UNet2DModel.from_pretrained(out).eval()
    x, t, cond = _inputs(family), torch.tensor([999, 500, 0]), family.condition([0, 1, 2])
    with torch.no_grad():
        expected = family.denoise(unet, x, t, cond, guidance=2.0)
        assert torch.equal(family.denoise(loaded, x, t, cond, guidance=2.0), expected)
        assert torch.equal(family.denoise(plain, x, t, cond, guidance=2.0), expected)
    assert family.load_teacher(out).config.block_out_channels == list(TINY_UNET["block_out_channels"])


def test_save_without_extra_config_writes_no_dmd2_json(family, unet, tmp_path):
    family.save_student(unet, tmp_path / "s")
    assert not (tmp_path / "s" / "dmd2.json").exists()


def test_missing_folder_raises_model_load_error(tmp_path):
    path = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError, match="not found") as e:
        load_pixel_unet(path)
    assert str(path) in str(e.value)


def test_folder_without_config_raises_model_load_error(tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    with pytest.raises(ModelLoadError, match="config.json") as e:
        load_pixel_unet(path)
    assert str(path) in str(e.value)


def test_folder_without_weights_raises_model_load_error(family, unet, tmp_path):
    path = tmp_path / "noweights"
    family.save_student(unet, path)
    (path / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="safetensors") as e:
        load_pixel_unet(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors_raises_model_load_error(family, unet, tmp_path, damage):
    path = tmp_path / "corrupt"
    family.save_student(unet, path)
    weights = path / "diffusion_pytorch_model.safetensors"
    if damage == "garbage":
        weights.write_bytes(b"this is not a safetensors file" * 10)
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError) as e:
        load_pixel_unet(path)
    assert str(path) in str(e.value)


def test_corrupt_config_raises_model_load_error(family, unet, tmp_path):
    path = tmp_path / "badconfig"
    family.save_student(unet, path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as e:
        load_pixel_unet(path)
    assert str(path) in str(e.value)


def test_saved_scheduler_config_loads_in_diffusers_with_our_schedule(family, unet, tmp_path):
    from diffusers import DDIMScheduler

    family.save_student(unet, tmp_path / "m")
    sched = DDIMScheduler.from_pretrained(tmp_path / "m")
    assert sched.config.prediction_type == family.prediction_type
    assert torch.allclose(sched.alphas_cumprod, family.schedule.alphas_cumprod, atol=1e-6)
