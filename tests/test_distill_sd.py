"""The DMD2 trainer on tiny random SDXL and SD1.5 pipelines (saved with save_pretrained, loaded through
our loader): 1-step at t=399, 4-step with backward simulation, LoRA, SD1.5; the real score's CFG on
SDXL conditioning; exports that plain diffusers loads; exact resume; presets and accelerate configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from dmd2.sampling import initial_noise
from training.config import DistillConfig, load_config
from training.distill import distill
from training.trainer import DMD2Trainer
from training.export import export_checkpoint
from training.runs import RunError
from training.simulate import backward_simulate

import tiny_sd
from conftest import make_caption_folder

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny SDXL and SD1.5 pipelines, a captioned image folder, a prompt file, one latent cache folder."""
    root = tmp_path_factory.mktemp("sd-world")
    (root / "prompts.txt").write_text("a photo of a dog\na blue cat\na red photo\n")
    return {"sdxl": tiny_sd.make_tiny_sdxl(root / "sdxl"), "sd15": tiny_sd.make_tiny_sd15(root / "sd15"),
            "data": make_caption_folder(root / "data"), "prompts": root / "prompts.txt", "cache": root / "cache"}


def sd_config(world, family="sdxl", **overrides) -> DistillConfig:
    return tiny_sd.text_config(world, family, 8.0 if family == "sdxl" else 1.75, **overrides)


snapshot, moved = tiny_sd.snapshot, tiny_sd.moved


def same_outputs(a, b, fam, atol=1e-5):
    """Two UNets give the same eps on the same noisy latents and prompts."""
    x, t = initial_noise(fam, 2, seed=3), torch.tensor([999, 399])
    cond = fam.condition(["a photo of a cat", "a red dog"])
    with torch.no_grad():
        torch.testing.assert_close(fam.model_output(a, x, t, cond), fam.model_output(b, x, t, cond), atol=atol, rtol=1e-4)


def test_sdxl_1step_at_t399_trains_and_exports_a_diffusers_unet(world, tmp_path):
    run = distill(sd_config(world, student_steps=1, first_timestep=399), tmp_path / "run")
    tr = run.trainer
    assert tr.timesteps == [399] and tr.generator_updates == 2
    last = run.metrics()[-1]
    assert {"generator/dm", "generator/gan_generator", "critic/fake_denoise", "critic/gan_critic"} <= set(last)
    assert all(torch.isfinite(torch.tensor(v)) for v in last.values())
    assert moved(snapshot(tr.real_unet), tr.generator_module)  # the generator left the teacher
    assert (run.samples / "latest.png").is_file()
    card = (run.student / "MODEL_CARD.md").read_text()
    assert "timesteps=[399]" in card and "UNet2DConditionModel.from_pretrained" in card

    plain = UNet2DConditionModel.from_pretrained(run.student)  # plain diffusers
    for (k, v), w in zip(tr.student().state_dict().items(), plain.state_dict().values()):
        assert torch.equal(v, w), k
    fam = tr.family
    assert fam.timesteps_of(run.student) == (399,)
    same_outputs(tr.student(), fam.load_student(run.student), fam)


def test_sdxl_4step_backward_simulation_runs_the_generators_own_steps(world, tmp_path):
    cfg = sd_config(world, student_steps=4, backward_simulation=True, ttur=2, iterations=4, checkpoint_every=4)
    tr = DMD2Trainer(cfg)
    assert tr.timesteps == [999, 749, 499, 249]
    fam, gen = tr.family, tr.generator_module
    cond = fam.condition(["a red dog", "a photo of a cat"])
    noise = initial_noise(fam, 2, seed=5)
    got = backward_simulate(fam, gen, cond, tr.timesteps, 3, noise, torch.Generator().manual_seed(1))
    rng, x = torch.Generator().manual_seed(1), noise
    with torch.no_grad():
        for i in range(3):  # by hand: denoise, re-noise to the next student timestep with fresh noise
            x0 = fam.denoise(gen, x, tr.timesteps[i], cond)
            x = fam.schedule.add_noise(x0, torch.randn(x0.shape, generator=rng), torch.tensor([tr.timesteps[i + 1]]))
    torch.testing.assert_close(got, x)
    kinds = []
    for _ in range(4):
        stats = tr.train_step()
        kinds.append("G" if "generator/dm" in stats else "C")
    assert kinds == ["C", "G", "C", "G"] and tr.generator_updates == 2


def test_real_score_cfg_on_sdxl_conditioning_uses_zero_embeddings(world):
    tr = DMD2Trainer(sd_config(world))
    fam, unet, g = tr.family, tr.real_unet, tr.cfg.real_guidance
    assert g == 8.0
    x, t = initial_noise(fam, 2, seed=1), torch.tensor([600, 200])
    cond = fam.condition(["a photo of a cat", "a blue dog"])

    def x0(prompt_embeds, text_embeds):
        ab = fam.schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        eps = unet(x, t, encoder_hidden_states=prompt_embeds,
                   added_cond_kwargs={"text_embeds": text_embeds, "time_ids": cond["time_ids"]}).sample
        return (x - (1 - ab).sqrt() * eps) / ab.sqrt()

    with torch.no_grad():
        c = x0(cond["prompt_embeds"], cond["text_embeds"])
        u = x0(torch.zeros_like(cond["prompt_embeds"]), torch.zeros_like(cond["text_embeds"]))
        guided = fam.denoise(unet, x, t, cond, guidance=g)
    assert (c - u).abs().max() > 1e-3
    torch.testing.assert_close(guided, u + g * (c - u), atol=1e-3, rtol=1e-4)


def test_sdxl_lora_trains_only_the_adapter_and_loads_in_plain_diffusers(world, tmp_path):
    cfg = sd_config(world, lora_rank=4, lora_alpha=2.0, student_steps=4, ema_decay=0.5, checkpoint_every=1)
    tr = DMD2Trainer(cfg)
    gen = tr.generator_module
    lora = {n for n, p in gen.named_parameters() if p.requires_grad}
    assert lora and all(".lora_A." in n or ".lora_B." in n for n in lora)
    assert any("attn1.to_q.lora_A" in n for n in lora) and any("resnets.0.conv1.lora_B" in n for n in lora)
    assert {id(p) for g in tr.opt_g.param_groups for p in g["params"]} == {id(p) for n, p in gen.named_parameters()
                                                                          if n in lora}
    real, real_cond = tr.real_batch()
    cond = tr.generator_condition(real_cond)
    before_g, before_c = snapshot(gen), snapshot(tr.critic_module)
    tr.critic_step(real, cond, real_cond)
    assert not moved(before_g, gen) and moved(before_c, tr.critic_module)  # the fake score is a full copy
    before_c = snapshot(tr.critic_module)
    tr.generator_step(real, cond)
    changed = moved(before_g, gen)
    assert changed and all(".lora_" in k for k in changed)  # only LoRA matrices moved
    assert not moved(before_c, tr.critic_module)

    run = distill(cfg, tmp_path / "run")
    student = run.trainer.student()
    assert sorted(p.name for p in run.student.iterdir()) == ["MODEL_CARD.md", "dmd2.json",
                                                            "pytorch_lora_weights.safetensors"]
    assert "load_lora_weights" in (run.student / "MODEL_CARD.md").read_text()
    pipe = StableDiffusionXLPipeline.from_pretrained(world["sdxl"])  # plain diffusers, with peft
    pipe.load_lora_weights(run.student)
    fam = run.trainer.family
    delta = fam.model_output(student, initial_noise(fam, 1, 0), torch.tensor([999]), fam.condition(["a cat"]))
    with torch.no_grad():
        assert (delta - fam.model_output(fam.load_teacher(), initial_noise(fam, 1, 0), torch.tensor([999]),
                                         fam.condition(["a cat"]))).abs().max() > 1e-6  # the LoRA does something
    same_outputs(student, pipe.unet, fam)
    same_outputs(student, fam.load_student(run.student), fam)  # our loader fuses it with the same alpha
    with pytest.raises(RunError, match="average the LoRA factors"):  # the mean of B@A is not B-mean @ A-mean
        export_checkpoint(run.path, tmp_path / "mean", step=[1, 2])
    assert not (tmp_path / "mean").exists()


def test_bf16_frozen_parts_under_bf16_autocast_with_lora_and_checkpointing(world, tmp_path):
    cfg = sd_config(world, lora_rank=4, mixed_precision="bf16", frozen_dtype="bf16", gradient_checkpointing=True,
                    ema_decay=0.5)
    run = distill(cfg, tmp_path / "run")
    tr = run.trainer
    assert tr.real_unet.dtype == tr.family.vae.dtype == tr.family.text_encoder_2.dtype == torch.bfloat16
    dtypes = {(".lora_" in n, p.dtype) for n, p in tr.generator_module.named_parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}  # bf16 frozen base, fp32 LoRA
    assert {p.dtype for p in tr.critic_module.parameters()} == {torch.float32}  # the fake score trains in fp32
    assert all(torch.isfinite(torch.tensor(v)) for v in run.metrics()[-1].values())
    assert (run.samples / "latest.png").is_file() and (run.student / "pytorch_lora_weights.safetensors").is_file()


def test_sd15_1step_trains_and_exports(world, tmp_path):
    run = distill(sd_config(world, family="sd15", ttur=2, gradient_checkpointing=True), tmp_path / "run")
    tr = run.trainer
    assert tr.family.name == "sd15" and tr.timesteps == [999] and tr.generator_updates == 1
    assert tr.generator_module.is_gradient_checkpointing and tr.critic_module.fake_unet.is_gradient_checkpointing
    assert moved(snapshot(tr.real_unet), tr.generator_module)
    plain = UNet2DConditionModel.from_pretrained(run.student)
    same_outputs(tr.student(), plain, tr.family, atol=0)


def test_text_family_resume_is_bit_identical(world, tmp_path):
    cfg = sd_config(world, iterations=4, ttur=2, checkpoint_every=2, sample_every=0, ema_decay=0.9, prompts=None)
    straight = distill(cfg, tmp_path / "straight").trainer.state_dict()
    distill(cfg, tmp_path / "split", stop_after=2)
    resumed = distill(cfg, tmp_path / "split", resume=True).trainer.state_dict()
    for key in ("generator", "ema", "critic"):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), f"{key}.{name} differs after resume"
    assert straight["prompt_sampler"]["pos"] == resumed["prompt_sampler"]["pos"]


def test_bad_family_and_wrong_teacher_fail_clearly(world):
    with pytest.raises(ValueError, match="text_time"):
        DMD2Trainer(sd_config(world, teacher=str(world["sd15"])))  # an SD1.5 folder as an SDXL teacher
    with pytest.raises(ValueError, match="resolution 18: must be a multiple of 4"):
        DMD2Trainer(sd_config(world, resolution=18))


@pytest.mark.parametrize("name", ["sdxl-4step", "sdxl-4step-lora", "sdxl-1step", "sd15-1step"])
def test_presets_carry_the_official_hyperparameters(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    header = (ROOT / "configs" / f"{name}.yaml").read_text().split("\nfamily:")[0]
    assert "training distill" in header and "GiB" in header  # the command and the computed memory
    if name.startswith("sdxl"):
        assert (cfg.family, cfg.real_guidance, cfg.ttur, cfg.batch_size) == ("sdxl", 8.0, 5, 2)
        assert (cfg.gan_generator_weight, cfg.gan_critic_weight, cfg.resolution) == (5e-3, 1e-2, 1024)
        lr = 5e-5 if "lora" in name else 5e-7
        assert cfg.generator_lr == cfg.critic_lr == lr
    if name == "sdxl-1step":
        assert (cfg.student_steps, cfg.first_timestep) == (1, 399)
    elif name.startswith("sdxl"):
        assert cfg.student_steps == 4 and cfg.backward_simulation
    if name == "sdxl-4step-lora":
        assert (cfg.lora_rank, cfg.lora_alpha) == (64, 8.0)
    if name == "sd15-1step":
        assert (cfg.family, cfg.real_guidance, cfg.ttur, cfg.student_steps, cfg.generator_lr) == ("sd15", 1.75, 10, 1, 1e-5)


def test_accelerate_configs_load_with_accelerates_loader():
    """Accelerate's own config loader reads both files, and its launcher turns them into the environment
    its Accelerator reads (so no key is silently ignored)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import prepare_multi_gpu_env
    from diffusers.models.unets import unet_2d_blocks

    ddp = load_config_from_file(str(ROOT / "configs/accelerate/ddp.yaml"))
    assert ddp.distributed_type == "MULTI_GPU" and ddp.num_processes == 8 and ddp.mixed_precision == "no"
    fsdp = load_config_from_file(str(ROOT / "configs/accelerate/fsdp.yaml"))
    assert fsdp.distributed_type == "FSDP" and fsdp.mixed_precision == "bf16"

    def launch_env(name):
        parser = launch_command_parser()
        args = parser.parse_args(["--config_file", str(ROOT / "configs/accelerate" / name), "-m", "training", "distill"])
        return prepare_multi_gpu_env(_validate_launch_command(args)[0])

    assert launch_env("ddp.yaml").get("ACCELERATE_USE_FSDP", "false") == "false"
    env = launch_env("fsdp.yaml")
    assert (env["ACCELERATE_USE_FSDP"], env["FSDP_VERSION"], env["FSDP_RESHARD_AFTER_FORWARD"]) == ("true", "2", "true")
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16" and env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    from diffusers.models import attention
    from diffusers.models.transformers import transformer_flux
    from training.sharding import UNIT_CLASSES

    wrapped = env["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(",")
    assert tuple(wrapped) == UNIT_CLASSES  # the launch config and the trainer's own default agree
    for cls in wrapped:  # every wrapped class exists in diffusers: UNet blocks, SD3's joint and FLUX's blocks
        assert any(hasattr(m, cls) for m in (unet_2d_blocks, attention, transformer_flux)), cls


def test_cli_with_a_preset_and_bad_data_fails_in_one_line_before_loading_models(tmp_path):
    """The SDXL LoRA preset from the command line: a missing data folder is reported before the
    (Hub) teacher is touched, as one line without a traceback."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "training", "distill", "--config", "configs/sdxl-4step-lora.yaml",
                        "--out", str(tmp_path / "run"), "--set", f"data={tmp_path / 'nowhere'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    assert "image folder not found" in p.stderr and "Traceback" not in p.stderr
