"""The curated zoo: timm and torchvision models, random weights, smallest configs, and each one's oracle.

Every entry builds its model with stochastic depth switched on where the library has it
(``drop_path_rate=0.1`` in timm, ``stochastic_depth_prob=0.1`` in torchvision), so the drop-path
modules mark the residual branches (see oracle.py). Entries whose library has no drop path name the
branch-output modules from the library's own block classes (``branches``). Configs shrink depth,
width and image size where the constructor takes them, keeping each stage's block kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn

from oracle import called, drop_path_modules, fill_empty_slots, liven

DROP = 0.1  # any rate > 0 makes the library create its drop-path modules


@dataclass(frozen=True)
class ZooModel:
    id: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    # modules whose output is exactly a residual branch's output (before the add)
    branches: Callable[[nn.Module], list[str]] = drop_path_modules
    how: str = "drop-path calls"  # how the oracle count is obtained, for the report

    def model(self) -> nn.Module:
        """Random weights with every branch live (oracle.liven), in eval mode."""
        torch.manual_seed(0)
        calibration = torch.randn(16, *self.input_shape[1:], generator=torch.Generator().manual_seed(99))
        return liven(self.build(), calibration).eval()

    def inputs(self, seed: int = 0) -> torch.Tensor:
        return torch.randn(*self.input_shape, generator=torch.Generator().manual_seed(seed))

    def expected_calls(self, model: nn.Module) -> list[str]:
        """Branch-output module calls in one eval forward, in call order (on a copy with empty slots filled)."""
        import copy

        probe = copy.deepcopy(model)
        fill_empty_slots(probe)
        return called(probe, self.branches(probe), self.inputs())


# --- oracles from the library's own block classes (no drop path in these models) ---------------------------


def _named(model: nn.Module, cls_names: tuple[str, ...]):
    return [(p, m) for p, m in model.named_modules() if type(m).__name__ in cls_names]


def tv_resnet_branches(model: nn.Module) -> list[str]:
    # BasicBlock: out = bn2(...); out += identity. Bottleneck: the same with bn3.
    out = []
    for p, m in _named(model, ("BasicBlock", "Bottleneck")):
        out.append(f"{p}.bn3" if type(m).__name__ == "Bottleneck" else f"{p}.bn2")
    return out


def tv_mobilenet_v2_branches(model: nn.Module) -> list[str]:
    return [f"{p}.conv" for p, m in _named(model, ("InvertedResidual",)) if m.use_res_connect]


def tv_mobilenet_v3_branches(model: nn.Module) -> list[str]:
    return [f"{p}.block" for p, m in _named(model, ("InvertedResidual",)) if m.use_res_connect]


def tv_regnet_branches(model: nn.Module) -> list[str]:
    return [f"{p}.f" for p, _ in _named(model, ("ResBottleneckBlock",))]


def tv_vit_branches(model: nn.Module) -> list[str]:
    # EncoderBlock: x = dropout(attention(ln_1(input))); x = x + input; return x + mlp(ln_2(x))
    return [f"{p}.{c}" for p, _ in _named(model, ("EncoderBlock",)) for c in ("dropout", "mlp")]


def tv_video_resnet_branches(model: nn.Module) -> list[str]:
    # torchvision.models.video.resnet: BasicBlock's out = conv2(conv1(x)); out += residual. Bottleneck's the
    # same after conv3. Each is a Sequential ending in its BatchNorm3d, so its output is the branch's.
    out = []
    for p, m in _named(model, ("BasicBlock", "Bottleneck")):
        out.append(f"{p}.conv3" if type(m).__name__ == "Bottleneck" else f"{p}.conv2")
    return out


def timm_convmixer_branches(model: nn.Module) -> list[str]:
    return [f"{p}.fn" for p, _ in _named(model, ("Residual",))]


# --- builders -------------------------------------------------------------------------------------------


def timm_model(name: str, **kwargs) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def _tv(builder: str, **kwargs) -> nn.Module:
    import torchvision.models as tvm

    return getattr(tvm, builder)(weights=None, num_classes=10, **kwargs)


def tv_resnet50_small() -> nn.Module:
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10)  # resnet50's block and stages, one block each


def tv_convnext_small() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    setting = [CNBlockConfig(16, 32, 2), CNBlockConfig(32, 64, 1), CNBlockConfig(64, 128, 1), CNBlockConfig(128, None, 1)]
    return ConvNeXt(setting, stochastic_depth_prob=DROP, num_classes=10)


def tv_vit_small() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    # vit_b_16's layout (class token, pre-norm encoder blocks) at 32x32, patch 16, 2 layers, width 32
    return VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32,
                             mlp_dim=64, num_classes=10)


def tv_swin_small() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    # swin_t's blocks (window and shifted window) in 2 stages, window 4 on a 32x32 image
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=[4, 4],
                           stochastic_depth_prob=DROP, num_classes=10)


def tv_deeplabv3_mobilenet_v3() -> nn.Module:
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    # the registry's model as it is (dilated MobileNetV3-Large backbone, ASPP head); its output is {"out": ...}
    return deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4)


def tv_lraspp_mobilenet_v3() -> nn.Module:
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    # LR-ASPP: low_classifier(low) + high_classifier(up(deep(low))) merges two depths of the backbone (no block)
    return lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4)


def tv_r3d_small() -> nn.Module:
    from torchvision.models.video.resnet import BasicBlock, BasicStem, Conv3DSimple, VideoResNet

    # r3d_18's stem, block and 3x3x3 convolutions, one block a stage (its widths are fixed at 64-512).
    # r2plus1d_18 has the same blocks with twice the convolutions and batch norms: slower, no new kind of site.
    return VideoResNet(BasicBlock, [Conv3DSimple] * 4, [1, 1, 1, 1], BasicStem, num_classes=10)


# The registry functions below fix depth/width in their own kwargs (a second value is a TypeError), so
# these call the same constructors with the registry's arguments and smaller sizes.


def timm_mixer_small() -> nn.Module:
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(img_size=32, patch_size=8, num_blocks=2, embed_dim=32, num_classes=10, drop_path_rate=DROP)


def timm_poolformer_small(version: int) -> nn.Module:
    from timm.models import metaformer as mf

    small = dict(depths=[1, 1, 1, 1], dims=[16, 32, 64, 128], use_mlp_head=False, num_classes=10, drop_path_rate=DROP)
    if version == 1:  # poolformer_s12's arguments
        return mf.MetaFormer(downsample_norm=None, mlp_act=nn.GELU, mlp_bias=True, norm_layers=mf.GroupNorm1,
                             layer_scale_init_values=1e-5, res_scale_init_values=None, **small)
    return mf.MetaFormer(norm_layers=mf.GroupNorm1NoBias, **small)  # poolformerv2_s12's: learnt res_scale


def timm_convmixer_small() -> nn.Module:
    from timm.models.convmixer import ConvMixer

    return ConvMixer(dim=32, depth=2, kernel_size=3, patch_size=4, act_layer=nn.ReLU, num_classes=10)


T = partial(timm_model, drop_path_rate=DROP)
VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)

ZOO: list[ZooModel] = [
    # --- timm: drop-path oracle ---
    ZooModel("timm_resnet18", lambda: T("resnet18", layers=[1, 1, 1, 1]), (2, 3, 32, 32)),
    ZooModel("timm_resnetv2_50", lambda: T("resnetv2_50", layers=[1, 1, 1, 1], channels=(64, 128, 256, 512)),
             (2, 3, 32, 32)),
    ZooModel("timm_efficientnet_b0", lambda: T("efficientnet_b0"), (2, 3, 32, 32)),
    ZooModel("timm_mobilenetv3_small_050", lambda: T("mobilenetv3_small_050"), (2, 3, 32, 32)),
    ZooModel("timm_regnetx_002", lambda: T("regnetx_002"), (2, 3, 32, 32)),
    ZooModel("timm_convnext_atto", lambda: T("convnext_atto", depths=(2, 1, 1, 1), dims=(16, 32, 64, 128)),
             (2, 3, 32, 32)),
    ZooModel("timm_vit_tiny", lambda: T("vit_tiny_patch16_224", **VIT), (2, 3, 32, 32)),
    ZooModel("timm_deit_tiny_distilled", lambda: T("deit_tiny_distilled_patch16_224", **VIT), (2, 3, 32, 32)),
    ZooModel("timm_swin_tiny", lambda: T("swin_tiny_patch4_window7_224", img_size=32, embed_dim=16, depths=(2, 2),
                                         num_heads=(1, 2), window_size=4), (2, 3, 32, 32)),
    ZooModel("timm_mixer_s16", timm_mixer_small, (2, 3, 32, 32)),
    # 64x64: at 1x1 (a 32x32 input's last stage) pooling minus identity is exactly zero
    ZooModel("timm_poolformer_s12", partial(timm_poolformer_small, 1), (2, 3, 64, 64)),
    ZooModel("timm_poolformerv2_s12", partial(timm_poolformer_small, 2), (2, 3, 64, 64)),
    ZooModel("timm_cait_xxs24", lambda: T("cait_xxs24_224", **VIT, depth_token_only=1), (2, 3, 32, 32)),
    ZooModel("timm_levit_128s", lambda: T("levit_128s", img_size=64, embed_dim=(32, 48), key_dim=8, depth=(1, 1),
                                          num_heads=(2, 2)), (2, 3, 64, 64)),
    ZooModel("timm_beit_base", lambda: T("beit_base_patch16_224", **VIT), (2, 3, 32, 32)),
    ZooModel("timm_eva02_tiny", lambda: T("eva02_tiny_patch14_224", img_size=28, patch_size=7, depth=2, embed_dim=32,
                                          num_heads=2), (2, 3, 28, 28)),
    ZooModel("timm_convmixer", timm_convmixer_small, (2, 3, 32, 32), branches=timm_convmixer_branches, how="convmixer.Residual blocks (no drop path)"),
    ZooModel("timm_coatnet", lambda: T("test_coatnet", img_size=64), (2, 3, 64, 64)),
    ZooModel("timm_maxvit", lambda: T("test_maxvit", img_size=64), (2, 3, 64, 64)),
    # --- torchvision ---
    ZooModel("tv_resnet18", lambda: _tv("resnet18"), (2, 3, 32, 32), branches=tv_resnet_branches,
             how="BasicBlock/Bottleneck blocks (no drop path)"),
    ZooModel("tv_resnet50", tv_resnet50_small, (2, 3, 32, 32), branches=tv_resnet_branches,
             how="BasicBlock/Bottleneck blocks (no drop path)"),
    ZooModel("tv_mobilenet_v2", lambda: _tv("mobilenet_v2"), (2, 3, 32, 32), branches=tv_mobilenet_v2_branches,
             how="InvertedResidual.use_res_connect (no drop path)"),
    ZooModel("tv_mobilenet_v3_small", lambda: _tv("mobilenet_v3_small"), (2, 3, 32, 32),
             branches=tv_mobilenet_v3_branches, how="InvertedResidual.use_res_connect (no drop path)"),
    ZooModel("tv_efficientnet_b0", lambda: _tv("efficientnet_b0", stochastic_depth_prob=DROP), (2, 3, 32, 32)),
    ZooModel("tv_convnext_tiny", tv_convnext_small, (2, 3, 32, 32)),
    ZooModel("tv_vit_b_16", tv_vit_small, (2, 3, 32, 32), branches=tv_vit_branches,
             how="EncoderBlock: dropout (attention) and mlp outputs (no drop path)"),
    ZooModel("tv_swin_t", tv_swin_small, (2, 3, 32, 32)),
    ZooModel("tv_regnet_y_400mf", lambda: _tv("regnet_y_400mf"), (2, 3, 32, 32), branches=tv_regnet_branches,
             how="ResBottleneckBlock blocks (no drop path)"),
    # segmentation: a dict output; the backbone's blocks are the sites, the ASPP head concatenates (no add)
    ZooModel("tv_deeplabv3_mobilenet_v3", tv_deeplabv3_mobilenet_v3, (2, 3, 32, 32),
             branches=tv_mobilenet_v3_branches, how="InvertedResidual.use_res_connect (no drop path)"),
    # its head's sum of a shallow and a deep path has the shape of f(x) + proj(x); the deep path runs blocks of its own
    ZooModel("tv_lraspp_mobilenet_v3", tv_lraspp_mobilenet_v3, (2, 3, 32, 32),
             branches=tv_mobilenet_v3_branches, how="InvertedResidual.use_res_connect (no drop path)"),
    # video: (B, C, T, H, W) clips through 3-D batch norms
    ZooModel("tv_r3d_18", tv_r3d_small, (2, 3, 4, 16, 16), branches=tv_video_resnet_branches,
             how="video BasicBlock/Bottleneck blocks (no drop path)"),
]

BY_ID = {z.id: z for z in ZOO}
