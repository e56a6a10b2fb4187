"""Encoder fine-tuning for the segmentation protocol: MedKLIP's original setting (G2D Table 7).

MedKLIP fine-tunes the whole network on SIIM-ACR (MediaBrain-SJTU/MedKLIP
Sample_Finetuning_SIIMACR/I2_segmentation, cited below as ``I2/``); G2D reports its Table 7 under that
setting. The options here are off by default, so a task that does not name them trains exactly what it
trained before (the decoder on a frozen encoder):

``train_encoder``        ``true``: the encoder's weights train with the decoder, at the same learning rate
                         (one optimizer over ``model.parameters()``, ``I2/train_res_ft.py:123-124``; there is
                         no separate encoder rate). BatchNorm trains too unless ``freeze_bn`` keeps it in eval mode.
``decoder``              ``smp`` (canonical): smp's U-Net. ``medklip``: :class:`MedKLIPResUNet`, MedKLIP's
                         ``ModelResUNet_ft`` (``I2/models/resunet.py:81-155``).
``loss``                 ``mixed`` (canonical): MGCA's focal - log(Dice). ``dice_bce``: :func:`dice_bce_loss`.
``augmentation``         ``shift_scale_rotate`` (canonical): MGCA's. ``crop_flip``: :func:`random_crop_flip`.
``decay_bias_and_norm``  ``true`` (canonical): weight decay on every trainable parameter. ``false``: none on
                         biases and other one-dimensional parameters (BatchNorm), as MedKLIP's optimizer factory
                         does (``I2/optim/optim_factory.py:25-37, 43-48``).

MedKLIP's learning-rate schedule needs no option: its cosine schedule with warm-up
(``I2/configs/Res_train.yaml:16``) has ``lr = min_lr = warmup_lr = 1e-5``, so the rate is 1e-5 at every
epoch (``I2/scheduler/cosine_lr.py:64, 71, 91``); a constant rate is that schedule exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from vlpbench import distributed
from vlpbench.errors import ConfigError, VlpbenchError

# Bool options and their default (the frozen-encoder protocol's behaviour).
FLAGS = {"train_encoder": False, "decay_bias_and_norm": True}
# MedKLIP's decoder widths, deepest first (I2/models/resunet.py:95-98), and its dropout (:124).
MEDKLIP_WIDTHS = (512, 256, 128, 64)
MEDKLIP_DROPOUT = 0.2
# albumentations RandomResizedCrop(scale=(0.2, 1.0)) with its default aspect ratios and 10 tries
# (I2/dataset/dataset_siim_acr.py:25), then HorizontalFlip(p=0.5) (:26).
CROP_SCALE, CROP_RATIO, CROP_ATTEMPTS, FLIP_P = (0.2, 1.0), (3 / 4, 4 / 3), 10, 0.5


def flag(config: dict[str, Any], key: str) -> bool:
    """The bool option ``key`` of :data:`FLAGS`; its default where ``config`` lacks it (a task that predates it)."""
    return config.get(key, FLAGS[key])


def check_finetune_options(config: dict[str, Any], choice: Any) -> None:
    """Raise ``ConfigError`` for a non-bool flag or a combination the protocol cannot run.

    ``choice(config, key)``: the value of a choice option, its canonical one where ``config`` lacks it.
    """
    for key in FLAGS:
        if not isinstance(flag(config, key), bool):
            raise ConfigError(f"segmentation option {key}={config[key]!r}: expected true or false")
    if choice(config, "decoder") == "medklip" and config.get("init_decoder"):
        raise ConfigError("init_decoder=true loads G2D's smp U-Net decoder; it needs decoder=smp, not medklip")
    if choice(config, "augmentation") == "crop_flip" and choice(config, "pipeline") == "mgca" \
            and config.get("augment", True):
        raise ConfigError("augmentation=crop_flip runs on the cached images; pipeline=mgca reproduces MGCA's "
                          "ShiftScaleRotate at full size: use pipeline=cached")


def unfreeze_encoder(encoder: torch.nn.Module, config: dict[str, Any]) -> None:
    """With ``train_encoder``, make every encoder parameter trainable again (the protocol froze them)."""
    if flag(config, "train_encoder"):
        for parameter in encoder.parameters():
            parameter.requires_grad_(True)


def parameter_groups(model: torch.nn.Module, config: dict[str, Any]) -> list:
    """What the optimizer steps: the trainable parameters in model order, or, without
    ``decay_bias_and_norm``, two groups: one-dimensional parameters and biases without weight decay,
    then the rest with the config's (MedKLIP ``I2/optim/optim_factory.py:25-37``)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if flag(config, "decay_bias_and_norm"):
        return [p for _, p in named]
    plain = [p for name, p in named if p.ndim == 1 or name.endswith(".bias")]
    decayed = [p for name, p in named if not (p.ndim == 1 or name.endswith(".bias"))]
    return [{"params": plain, "weight_decay": 0.0}, {"params": decayed}]


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, *, across_ranks: bool = False) -> torch.Tensor:
    """MedKLIP's DiceBCELoss (``I2/utils.py:13-31``): mean BCE of the sigmoid plus ``1 -`` the soft Dice
    over the whole batch with smoothing 1.

    The BCE is taken from the logits (MedKLIP takes ``F.binary_cross_entropy`` of the sigmoid, which
    clamps each log at -100; the two agree wherever the sigmoid does not saturate). ``across_ranks``: the
    batch is split among the ranks of a distributed run; the sums are taken over all of them.
    """
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    probs = torch.sigmoid(logits)
    sums = torch.stack([bce.sum(), (probs * target).sum(), probs.sum(), target.sum(),
                        torch.tensor(float(logits.numel()), device=logits.device)])
    if across_ranks:
        sums = distributed.differentiable_sum(sums)
    soft_dice = (2.0 * sums[1] + 1.0) / (sums[2] + sums[3] + 1.0)
    return sums[0] / sums[4] + 1.0 - soft_dice


def random_crop_flip(batch: int, generator: torch.Generator) -> torch.Tensor:
    """``affine_grid`` matrices (N, 2, 3) of MedKLIP's training augmentation on square images:
    ``RandomResizedCrop(224, scale=(0.2, 1))`` then ``HorizontalFlip(p=0.5)``
    (``I2/dataset/dataset_siim_acr.py:24-29``).

    albumentations' rule, in fractions of the side: up to 10 tries of an area in ``CROP_SCALE`` and a
    log-uniform aspect ratio in ``CROP_RATIO``; the first window that fits is placed uniformly; if none
    fits, the whole image (its fallback centre crop, for a square image). The window position is
    continuous here, not whole pixels. Every draw is made for all tries, so the generator advances by the
    same amount whatever is drawn (every rank of a distributed run stays in step).
    """
    area = CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * torch.rand(batch, CROP_ATTEMPTS, generator=generator)
    low, high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    aspect = torch.exp(low + (high - low) * torch.rand(batch, CROP_ATTEMPTS, generator=generator))
    widths, heights = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = (widths <= 1.0) & (heights <= 1.0)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first try that fits
    width = torch.where(fits.any(dim=1), widths.gather(1, first)[:, 0], torch.ones(batch))
    height = torch.where(fits.any(dim=1), heights.gather(1, first)[:, 0], torch.ones(batch))
    centre_x = width / 2 + (1.0 - width) * torch.rand(batch, generator=generator)
    centre_y = height / 2 + (1.0 - height) * torch.rand(batch, generator=generator)
    flip = torch.rand(batch, generator=generator) < FLIP_P
    theta = torch.zeros(batch, 2, 3)
    # Output → input in affine_grid's [-1, 1] coordinates: the window's half-size and its centre.
    theta[:, 0, 0] = torch.where(flip, -width, width)
    theta[:, 0, 2] = 2.0 * centre_x - 1.0
    theta[:, 1, 1] = height
    theta[:, 1, 2] = 2.0 * centre_y - 1.0
    return theta


class ConvBNReLU(torch.nn.Sequential):
    """3x3 convolution (with bias), BatchNorm, ReLU: MedKLIP's ``ConvBlock`` (``I2/models/resunet.py:6-24``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(torch.nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
                         torch.nn.BatchNorm2d(out_channels), torch.nn.ReLU(inplace=True))


class UpBlock(torch.nn.Module):
    """2x transposed convolution, concatenation with the skip map, two :class:`ConvBNReLU`
    (MedKLIP's ``UpBlockForUNetWithResNet50`` with ``conv_transpose``, ``I2/models/resunet.py:43-79``)."""

    def __init__(self, in_channels: int, width: int, skip_channels: int):
        super().__init__()
        self.upsample = torch.nn.ConvTranspose2d(in_channels, width, kernel_size=2, stride=2)
        self.convs = torch.nn.Sequential(ConvBNReLU(width + skip_channels, width), ConvBNReLU(width, width))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([self.upsample(x), skip], dim=1))


class MedKLIPResUNet(torch.nn.Module):
    """MedKLIP's segmentation network (``ModelResUNet_ft``, ``I2/models/resunet.py:81-155``) around any
    encoder whose first five feature maps are the input and strides 2, 4, 8 and 16.

    MedKLIP keeps a ResNet up to ``layer3`` (``children()[:-3]``, :87): the stride-16 map goes through a
    bridge of two :class:`ConvBNReLU` at its own width (:112, 1024 for ResNet-50), then four
    :class:`UpBlock` of widths 512, 256, 128, 64 join the stride-8, 4 and 2 maps and the input image
    itself (:113-122, 138-146); dropout 0.2 and a 1x1 ``Conv1d`` over the flattened map give one logit
    per pixel (:124-125, 147-154). Deeper encoder stages (a full ResNet-50's ``layer4``) are computed but
    unused, as MedKLIP's truncation drops them; they receive no gradient. The widths of the bridge and
    skips follow the encoder's ``out_channels``, so a ResNet-50 gives MedKLIP's layer shapes.
    """

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        channels = tuple(encoder.out_channels)
        if len(channels) < 5:
            raise VlpbenchError(f"decoder=medklip needs an encoder with feature maps at strides 1, 2, 4, 8 and 16; "
                                f"this one has {len(channels)} (out_channels {channels})")
        self.encoder = encoder
        deepest, skips = channels[4], channels[3::-1]  # stride 16; strides 8, 4, 2, 1
        self.bridge = torch.nn.Sequential(ConvBNReLU(deepest, deepest), ConvBNReLU(deepest, deepest))
        inputs = (deepest,) + MEDKLIP_WIDTHS[:-1]
        self.up_blocks = torch.nn.ModuleList(UpBlock(i, w, s) for i, w, s in zip(inputs, MEDKLIP_WIDTHS, skips))
        self.dropout = torch.nn.Dropout(p=MEDKLIP_DROPOUT)
        self.seg_classifier = torch.nn.Conv1d(MEDKLIP_WIDTHS[-1], 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        out = self.bridge(features[4])
        for block, skip in zip(self.up_blocks, features[3::-1]):
            out = block(out, skip)
        out = self.dropout(out)
        batch, _, height, width = out.shape
        return self.seg_classifier(out.flatten(2)).view(batch, 1, height, width)
