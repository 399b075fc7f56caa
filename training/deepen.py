"""A generator with more capacity than the teacher that still starts as the teacher: more layers per block.

DMD2 starts the generator as a copy of the teacher, so its capacity is the teacher's. `deepen` builds the same
diffusers UNet2DModel with `layers_per_block` raised and copies the teacher into it so that, at the start, it
computes what the teacher computes; the added layers are residual blocks whose last layer is zero (identities until
training moves them). The result is a plain UNet2DModel: it saves, loads and samples like any student.

Where the copies go. A down block with L layers hands L skips (and its downsampler's) to the up block of its level,
which has L + 1 layers and takes them in reverse. With L' > L layers, the down block's layers L..L'-1 are identities,
so their skips repeat layer L-1's; the up block's layer 0 is the teacher's layer 0 (it takes the first repeat, the
value the teacher's layer 0 took); layers 1..L'-L are identities that ignore their skip (their 1x1 shortcut passes
the hidden half of the concatenation through; the skip half is zero); layers L'-L+1..L' are the teacher's layers
1..L, each taking the skip the teacher's took. An attention layer follows its resnet.
"""

from __future__ import annotations

import copy
import re

import torch
from diffusers import UNet2DModel

# The blocks whose layers add to their input with scale 1 and have one attention per resnet (diffusers' Skip blocks
# divide by sqrt(2) and share one attention, so an added layer there would not start as an identity).
BLOCKS = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D",
          "UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")
_LAYER = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$")


def teacher_key(key: str, teacher_layers: int, layers: int) -> str | None:
    """The teacher's name for a weight of the deepened network, or None for a weight of an added layer."""
    m = _LAYER.match(key)
    if not m:
        return key
    blocks, block, kind, j, rest = m.groups()
    j, added = int(j), layers - teacher_layers
    if blocks == "down_blocks":
        source = j if j < teacher_layers else None
    else:
        source = 0 if j == 0 else (None if j <= added else j - added)
    return None if source is None else f"{blocks}.{block}.{kind}.{source}.{rest}"


def deepen(teacher: UNet2DModel, layers_per_block: int, seed: int = 0) -> UNet2DModel:
    """The teacher with `layers_per_block` layers per block, computing what the teacher computes at the start.
    The added layers' other weights are drawn from diffusers' initialisation under torch seed `seed`."""
    if type(teacher) is not UNet2DModel:
        raise ValueError(f"deepening is for a plain UNet2DModel, not {type(teacher).__name__}")
    config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    teacher_layers = config["layers_per_block"]
    if not isinstance(teacher_layers, int):
        raise ValueError(f"the teacher's layers_per_block is {teacher_layers!r}: deepening needs one number "
                         f"for all blocks")
    if not (isinstance(layers_per_block, int) and layers_per_block > teacher_layers):
        raise ValueError(f"layers_per_block={layers_per_block!r}: must be an integer above the teacher's "
                         f"{teacher_layers} (null keeps the teacher's network)")
    others = [b for b in (*config["down_block_types"], *config["up_block_types"]) if b not in BLOCKS]
    if others:
        raise ValueError(f"the teacher has {others[0]} blocks; deepening supports {', '.join(BLOCKS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        deep = UNet2DModel(**{**config, "layers_per_block": layers_per_block})
    ours, theirs = deep.state_dict(), teacher.state_dict()
    state, used = {}, set()
    for key, value in ours.items():
        source = teacher_key(key, teacher_layers, layers_per_block)
        if source is None:  # an added layer: its own initialisation (made an identity below)
            state[key] = value
            continue
        if source not in theirs or theirs[source].shape != value.shape:
            raise ValueError(f"deepening: {key} has no teacher weight of its shape ({source})")
        state[key] = theirs[source]
        used.add(source)
    if set(theirs) - used:
        raise ValueError(f"deepening: teacher weights left over, e.g. {sorted(set(theirs) - used)[0]}")
    first = next(teacher.parameters())
    deep.to(first.dtype).load_state_dict(state)
    _make_added_layers_identities(deep, teacher_layers, layers_per_block)
    _check_same_function(teacher, deep)
    trainable = any(p.requires_grad for p in teacher.parameters())
    return deep.to(first.device).train(teacher.training).requires_grad_(trainable)


@torch.no_grad()
def _check_same_function(teacher: UNet2DModel, deep: UNet2DModel) -> None:
    """The deepened network must compute what the teacher computes; a block this module does not know would
    break that silently, so it is checked on a small random input."""
    first = next(teacher.parameters())
    config = teacher.config
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.in_channels, config.sample_size, config.sample_size, generator=gen)
    kwargs = {}
    if config.num_class_embeds:
        kwargs["class_labels"] = torch.tensor([0, config.num_class_embeds - 1])
    x, t = x.to(first.device, first.dtype), torch.tensor([10, 900], device=first.device)
    modes = teacher.training, deep.training
    teacher.eval(), deep.to(first.device).eval()
    want, got = teacher(x, t, **kwargs).sample, deep(x, t, **kwargs).sample
    teacher.train(modes[0]), deep.train(modes[1])
    tolerance = 1e-4 if first.dtype == torch.float32 else 1e-2
    if not torch.allclose(got, want, rtol=0, atol=tolerance * (1 + float(want.abs().max()))):
        raise ValueError(f"the deepened network does not start as the teacher (max difference "
                         f"{float((got - want).abs().max()):.3g}); its blocks are not ones deepening supports")


def without_added_layers(deep: UNet2DModel, teacher_layers: int) -> UNet2DModel:
    """A copy of a deepened (and maybe trained) network whose added layers are identities again: the network of
    the teacher's shape inside it, to measure how much the added layers contribute."""
    plain = copy.deepcopy(deep)
    _make_added_layers_identities(plain, teacher_layers, deep.config.layers_per_block)
    return plain


@torch.no_grad()
def _make_added_layers_identities(deep: UNet2DModel, teacher_layers: int, layers: int) -> None:
    added = layers - teacher_layers
    for blocks, indices in ((deep.down_blocks, range(teacher_layers, layers)), (deep.up_blocks, range(1, added + 1))):
        for block in blocks:
            for j in indices:
                resnet = block.resnets[j]
                resnet.conv2.weight.zero_()
                resnet.conv2.bias.zero_()
                if resnet.conv_shortcut is not None:  # an up layer: [hidden, skip] -> hidden
                    weight = resnet.conv_shortcut.weight  # (out, in, 1, 1), in = out (hidden) + skip
                    weight.zero_()
                    weight[:, :weight.shape[0], 0, 0] = torch.eye(weight.shape[0])
                    resnet.conv_shortcut.bias.zero_()
                if getattr(block, "attentions", None) is not None:
                    out = block.attentions[j].to_out[0]
                    out.weight.zero_()
                    out.bias.zero_()
