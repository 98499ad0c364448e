"""A zoo of small models with known residual sites, each with a hand-scaled reference.

Every zoo block multiplies its branch by ``self.scale`` (a plain float, 1.0 by default, invisible to
tracing when 1.0). A reference for eval equivalence is a copy of the model with each block's scale set
to its p_l by hand: it shares no code with sdsurgeon's gates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sdsurgeon.models import BasicBlock, cifar_resnet


class Scaled(nn.Module):
    scale = 1.0

    def s(self, f):
        return f if self.scale == 1.0 else f * self.scale


def mlp(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))


class PlusBlock(Scaled):
    def __init__(self, w):
        super().__init__()
        self.f = mlp(w)

    def forward(self, x):
        return x + self.s(self.f(x))


class IAddBlock(Scaled):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.s(self.bn(self.conv(x)))
        out += x
        return F.relu(out)


class TorchAddBlock(PlusBlock):
    def forward(self, x):
        return torch.add(x, self.s(self.f(x)))


class TensorAddBlock(PlusBlock):
    def forward(self, x):
        return x.add(self.s(self.f(x)))


class ProjectionBlock(Scaled):
    """torchvision-style BasicBlock: conv-bn shortcut when shape changes, in-place ReLU after the add."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else None
        )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.s(self.bn2(self.conv2(out)))
        out += identity
        return self.relu(out)


class Attention(nn.Module):
    def __init__(self, d, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x, mask):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
        scores = scores + mask  # additive attention mask: not a residual
        out = scores.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class PreNormLayer(Scaled):
    scale2 = 1.0

    def s2(self, f):
        return f if self.scale2 == 1.0 else f * self.scale2

    def __init__(self, d):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d)
        self.ln2, self.mlp = nn.LayerNorm(d), mlp(d)

    def forward(self, x, mask):
        x = x + self.s(self.attn(self.ln1(x), mask))
        return x + self.s2(self.mlp(self.ln2(x)))


class PostNormLayer(PreNormLayer):
    def forward(self, x, mask):
        x = self.ln1(x + self.s(self.attn(x, mask)))
        return self.ln2(x + self.s2(self.mlp(x)))


class Transformer(nn.Module):
    def __init__(self, layer_cls, d=16, layers=2, vocab=50, max_len=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(max_len, d) * 0.1)
        self.layers = nn.ModuleList(layer_cls(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids, mask):
        x = self.embed(ids) + self.pos[: ids.size(1)]  # positional-embedding add: not a residual
        for layer in self.layers:
            x = layer(x, mask)
        return self.head(x)


class LayerScaleBlock(Scaled):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.f = mlp(d)
        self.gamma = nn.Parameter(torch.full((d,), 0.5))

    def forward(self, x):
        return x + self.s(self.gamma * self.f(self.norm(x)))


class NestedBlock(Scaled):
    """Outer residual whose branch holds an inner residual block."""

    def __init__(self, d):
        super().__init__()
        self.pre = nn.Linear(d, d)
        self.inner = PlusBlock(d)
        self.post = nn.Linear(d, d)

    def forward(self, x):
        return x + self.s(self.post(self.inner(torch.tanh(self.pre(x)))))


class ThreeLevelBlock(Scaled):
    """A residual around a nested block: three residuals, each inside the branch of the next (FastViT's
    reparameterisable blocks nest this way)."""

    def __init__(self, d):
        super().__init__()
        self.inner = NestedBlock(d)
        self.post = nn.Linear(d, d)

    def forward(self, x):
        return x + self.s(self.post(self.inner(x)))


class SliceWriteAttention(Scaled):
    """Attention that adds a relative-position term into a slice of its scores in place (MViTv2 assigns to
    ``attn[:, :, 1:, 1:]``, which torch.export records as a ``copy_``): the term reaches the output only
    through the write."""

    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.rel, self.out = nn.Linear(d, 1), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        attn = q @ k.transpose(-2, -1)
        attn[:, 1:, 1:].add_(self.rel(q[:, 1:]))
        return x + self.s(self.out(attn.softmax(-1) @ v))


class PoolMixerBlock(Scaled):
    """A branch whose only parameter is its layer scale, read through a view (EfficientFormer's and
    PoolFormer's pooling mixer without a norm: ``x + gamma.view(1, C, 1, 1) * (pool(x) - x)``)."""

    def __init__(self, c):
        super().__init__()
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        return x + self.s(self.gamma.view(1, -1, 1, 1) * (self.pool(x) - x))


class ShapeReadProjectionBlock(Scaled):
    """A projection shortcut whose shape the branch reads (Hiera's stage transitions: the skip is pooled,
    the attention output reshaped to the skip's size)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, 1, stride=2)
        self.f = nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1))

    def forward(self, x):
        shortcut = self.proj(x)
        return shortcut + self.s(self.f(x).reshape(shortcut.shape))


class DataDependentTop(nn.Module):
    """Top-level forward branches on data, so only the submodules can be traced."""

    def __init__(self, d=8):
        super().__init__()
        self.blocks = nn.Sequential(*(PlusBlock(d) for _ in range(3)))

    def forward(self, x):
        if x.sum() > 0:
            return self.blocks(x)
        return self.blocks(-x)


class DenseLike(nn.Module):
    """DenseNet-style concatenation: no additions at all."""

    def __init__(self, d=8):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d, d), nn.Linear(2 * d, d)

    def forward(self, x):
        x = torch.cat([x, F.relu(self.l1(x))], -1)
        return torch.cat([x, F.relu(self.l2(x))], -1)


class Negatives(nn.Module):
    """Additions that are not residual blocks."""

    def __init__(self, d=8):
        super().__init__()
        self.lin = nn.Linear(d, d, bias=False)
        self.bias = nn.Parameter(torch.zeros(d))
        self.pos = nn.Parameter(torch.randn(4, d))
        self.other = nn.Linear(d, d)

    def forward(self, x, y):
        h = self.lin(x) + self.bias  # bias add
        h = h + self.pos[: h.size(0)]  # positional add
        h = h + h  # x + x
        h = h + 1.0  # constant add
        z = self.other(y)
        return h + z  # sum of two independent inputs


class EscapingBranch(nn.Module):
    """x + f(x) whose intermediate value is also returned: not a self-contained block."""

    def __init__(self, d=8):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = self.a(x)
        return x + self.b(F.relu(h)), h


class TupleAttention(nn.Module):
    """Attention that unpacks a shape it half uses and returns weights its caller drops (timm, torchvision)."""

    def __init__(self, d, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, N, C = x.shape  # C is never used
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1)).softmax(-1)
        out = (weights @ v).transpose(1, 2).reshape(B, N, -1)
        return self.proj(out), weights.mean(1)  # averaged weights: computed, then dropped by the caller


class UnusedValueBlock(Scaled):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = TupleAttention(d)

    def forward(self, x):
        out, _ = self.attn(self.norm(x))
        return x + self.s(out)


class MultiheadBlock(Scaled):
    """torch's MultiheadAttention as a tracing leaf: its attention weights come back and are dropped."""

    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)

    def forward(self, x):
        h = self.norm(x)
        out, _ = self.attn(h, h, h)
        return x + self.s(out)


class BatchNormAct(nn.BatchNorm2d):
    """BatchNorm2d + ReLU in one module that checks its input and decides train/eval in Python, as
    timm's BatchNormAct2d does: tracing it freezes the mode it saw."""

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        if self.training:
            self.num_batches_tracked.add_(1)
            x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, self.momentum, self.eps)
        else:
            x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return F.relu(x)


class TanhBranchBlock(Scaled):
    """A branch ending in tanh: no weight can take p (not positively homogeneous), so fold keeps a multiply."""

    def __init__(self, d):
        super().__init__()
        self.f = mlp(d)

    def forward(self, x):
        return x + self.s(torch.tanh(self.f(x)))


class ParallelResidualBlock(Scaled):
    """GPT-NeoX's parallel residual, x + attn(ln1(x)) + mlp(ln2(x)): one block whose body has two paths. The
    attention reads a second input (as rotary angles are), so only the MLP is a chain back to x, and
    ``mlp + attn`` has the shape of a projection block inside it (it is not one)."""

    def __init__(self, d):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.o = nn.Linear(d, d), nn.Linear(d, d)
        self.mlp = mlp(d)

    def forward(self, x, angles):
        attn = self.o(torch.tanh(self.q(self.ln1(x))) * angles)
        return self.s(self.mlp(self.ln2(x)) + attn) + x


class SharedNormParallelBlock(Scaled):
    """Falcon's and GPT-J's parallel residual: one norm feeds both paths, x + attn(h) + mlp(h) with h = ln(x). The
    paths fork from h, not from x, and ``mlp(h) + attn`` has the shape of a projection block from h (it is not one)."""

    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.q, self.o = nn.Linear(d, d), nn.Linear(d, d)
        self.mlp = mlp(d)

    def forward(self, x, angles):
        h = self.ln(x)
        attn = self.o(torch.tanh(self.q(h)) * angles)
        return x + self.s(self.mlp(h) + attn)


class ParallelStack(nn.Module):
    def __init__(self, *blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x, angles):
        for block in self.blocks:
            x = block(x, angles)
        return x


class TorchEncoder(nn.Module):
    """torch.nn's own transformer as PyTorch's tutorials build it: to torch.fx its layers are torch.nn leaves.
    Sequence first (torch.nn's default), which keeps the reference off the fused fast path its hooks would miss."""

    def __init__(self, norm_first=False, d=16):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        return self.head(self.encoder(x))


class TorchSeq2Seq(nn.Module):
    """An encoder and a pre-norm decoder of torch.nn's layers; the decoder's causal mask made in forward."""

    def __init__(self, d=16):
        super().__init__()
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0), 1,
                                             enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(d, 2, 2 * d, dropout=0.0, norm_first=True), 1)
        self.head = nn.Linear(d, 5)

    def forward(self, src, tgt):
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.size(0))
        return self.head(self.decoder(tgt, self.encoder(src), tgt_mask=causal, tgt_is_causal=True))


class PositionEmbedding(nn.Embedding):
    """BART's learnt positions: made from the input's length unless given, so a trace not shown the call takes the
    given-positions path and fails on the real one."""

    def forward(self, ids, position_ids=None):
        if position_ids is None:
            position_ids = torch.arange(ids.shape[1], device=self.weight.device).expand(ids.shape[0], -1)
        else:
            position_ids = position_ids.unsqueeze(0)
        return super().forward(position_ids)


class CrossBlock(Scaled):
    """A decoder block: its branch reads the encoder's output."""

    def __init__(self, w):
        super().__init__()
        self.f = mlp(w)

    def forward(self, x, memory):
        return x + self.s(self.f(x) * torch.sigmoid(memory.mean(1, keepdim=True)))


class LayerDropStack(nn.Module):
    """Layers skipped at random in training, at a rate copied into the module at init (BART's encoder and
    decoder: ``self.layerdrop = config.encoder_layerdrop``), drawn by torch.rand in Python: no graph holds it."""

    def __init__(self, layers, layerdrop):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.layerdrop = layerdrop

    def forward(self, x, *context):
        for layer in self.layers:
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue
            x = layer(x, *context)
        return x


class LayerDropSeq2Seq(nn.Module):
    """An encoder-decoder with its own LayerDrop and positions made from the input's length."""

    def __init__(self, d=8, vocab=20, layerdrop=0.2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = PositionEmbedding(16, d)
        self.encoder = LayerDropStack([PlusBlock(d), PlusBlock(d)], layerdrop)
        self.decoder = LayerDropStack([CrossBlock(d), CrossBlock(d)], layerdrop)
        self.head = nn.Linear(d, vocab)

    def forward(self, src, tgt):
        memory = self.encoder(self.embed(src) + self.pos(src))
        return self.head(self.decoder(self.embed(tgt) + self.pos(tgt), memory))


class MaskedProjection(nn.Module):
    """An attention-like child with an optional mask, multiplied in only when given."""

    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x, mask=None):
        out = self.proj(x)
        return out if mask is None else out * mask


class OptionalMaskLayer(Scaled):
    def __init__(self, d):
        super().__init__()
        self.ln, self.attn = nn.LayerNorm(d), MaskedProjection(d)

    def forward(self, x, mask=None):
        return x + self.s(self.attn(self.ln(x), mask))


class NoMaskStack(nn.Module):
    """Layers called with their optional mask None, a constant to the whole model's trace: traced alone, a layer
    sees a placeholder where the None was, and ``mask is None`` takes the other path."""

    def __init__(self, d=8):
        super().__init__()
        self.layers = nn.ModuleList([OptionalMaskLayer(d), OptionalMaskLayer(d)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x, None)
        return x


@torch.library.custom_op("sdsurgeon_zoo::grouped_mm", mutates_args=())
def grouped_mm(rows: torch.Tensor, weights: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows offs[g-1]:offs[g] times weights[g]: a fused experts matmul, one op to every front end and counter."""
    out, start = rows.new_zeros(rows.shape[0], weights.shape[-1]), 0
    for group, end in enumerate(offs.tolist()):
        out[start:end] = rows[start:end] @ weights[group]
        start = end
    return out


@grouped_mm.register_fake
def _(rows, weights, offs):
    return rows.new_empty(rows.shape[0], weights.shape[-1])


def _grouped_mm_backward(ctx, grad):
    rows, weights, offs = ctx.saved_tensors
    grad_rows = grouped_mm(grad, weights.transpose(1, 2).contiguous(), offs)
    grad_weights, start = torch.zeros_like(weights), 0
    for group, end in enumerate(offs.tolist()):
        grad_weights[group] = rows[start:end].T @ grad[start:end]
        start = end
    return grad_rows, grad_weights, None


grouped_mm.register_autograd(_grouped_mm_backward,
                             setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))


class MoEBlock(Scaled):
    """x + experts(x): a router sends each token to its top 2 of 4 experts (SwiGLU-less MLPs), all run as one
    fused grouped matmul per projection over the tokens sorted by expert (Mixtral's, transformers' grouped_mm)."""

    def __init__(self, d=8, experts=4, hidden=16, top=2):
        super().__init__()
        self.top, self.experts = top, experts
        self.router = nn.Linear(d, experts, bias=False)
        self.up = nn.Parameter(torch.randn(experts, d, hidden) / math.sqrt(d))
        self.down = nn.Parameter(torch.randn(experts, hidden, d) / math.sqrt(hidden))

    def forward(self, x):
        return x + self.s(self.moe(x))

    def moe(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        weights, chosen = self.router(tokens).softmax(-1).topk(self.top, -1)
        order = chosen.reshape(-1).argsort()
        rows = tokens[order // self.top]
        offs = torch.bincount(chosen.reshape(-1), minlength=self.experts).cumsum(0)
        out = grouped_mm(torch.relu(grouped_mm(rows, self.up, offs)), self.down, offs)
        routed = torch.zeros_like(out).index_put((order,), out)
        return (routed.reshape(-1, self.top, x.shape[-1]) * weights[..., None]).sum(1).reshape(x.shape)


class PreActBlock(Scaled):
    """Pre-activation bottleneck (timm's ResNetV2): BN+act modules before each conv, projection on the normed input."""

    def __init__(self, cin, cout):
        super().__init__()
        self.norm1 = BatchNormAct(cin)
        self.downsample = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else None
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm2 = BatchNormAct(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)

    def forward(self, x):
        pre = self.norm1(x)
        shortcut = x if self.downsample is None else self.downsample(pre)
        return self.s(self.conv2(self.norm2(self.conv1(pre)))) + shortcut


class BNActOutBlock(Scaled):
    """An inverted residual whose branch ends in a BN+act module (timm's EfficientNet: act is the identity there)."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 2 * c, 1, bias=False)
        self.bn1 = BatchNormAct(2 * c)
        self.conv2 = nn.Conv2d(2 * c, c, 1, bias=False)
        self.bn2 = BatchNormAct(c)

    def forward(self, x):
        return x + self.s(self.bn2(self.conv2(self.bn1(self.conv1(x)))))


class TwoDepthHead(nn.Module):
    """LR-ASPP's segmentation head, smallest: ``classify(low) + classify(up(deeper(low)))``. The sum has the shape of a
    projection block whose branch is the deep path, but that path runs a residual block of its own: it merges two
    depths, and only the block inside is one."""

    def __init__(self, c=4, classes=2):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.deeper = BNActOutBlock(c)
        self.low_classifier, self.high_classifier = nn.Conv2d(c, classes, 1), nn.Conv2d(c, classes, 1)

    def forward(self, x):
        low = F.relu(self.stem(x))
        high = self.high_classifier(self.deeper(F.relu(self.down(low))))
        return self.low_classifier(low) + F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)


class LearntSkipScaleBlock(Scaled):
    """PoolFormerV2: the skip is scaled by a learnt per-channel parameter, the branch by another."""

    def __init__(self, c):
        super().__init__()
        self.norm = nn.GroupNorm(1, c)
        self.mix = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.res_scale = nn.Parameter(torch.full((c,), 0.9))
        self.layer_scale = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        c = x.shape[1]
        return x * self.res_scale.view(c, 1, 1) + self.s(self.layer_scale.view(c, 1, 1) * self.mix(self.norm(x)))


class CachedBiasBlock(Scaled):
    """LeViT: in eval the attention bias is computed once and kept in a dict on the module."""

    def __init__(self, d):
        super().__init__()
        self.f = mlp(d)
        self.bias = nn.Parameter(torch.randn(d) * 0.1)
        self.bias_cache: dict[str, torch.Tensor] = {}

    def attention_bias(self, device) -> torch.Tensor:
        if self.training:
            return self.bias * 2
        key = str(device)
        if key not in self.bias_cache:
            self.bias_cache[key] = self.bias * 2
        return self.bias_cache[key]

    def forward(self, x):
        return x + self.s(self.f(x + self.attention_bias(x.device)))


class Seq(nn.Module):
    def __init__(self, *blocks, stem=None):
        super().__init__()
        self.stem = stem or nn.Identity()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(self.stem(x))


@dataclass
class ZooEntry:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    num_sites: int
    # Apply hand-scaling p_l (depth order) to a model copy; None: the entry has no reference.
    scale: Callable[[nn.Module, list[float]], None] | None = None
    shortcuts: dict[int, str] | None = None  # site index -> expected shortcut kind
    kept_multiply: str | None = None  # words fold's reason must contain where no weight can take p


def _scale_blocks(model: nn.Module, ps: list[float]) -> None:
    blocks = [m for m in model.modules() if isinstance(m, Scaled)]
    assert len(blocks) == len(ps), (len(blocks), len(ps))
    for block, p in zip(blocks, ps):
        block.scale = p


def _scale_transformer(model: nn.Module, ps: list[float]) -> None:
    assert len(ps) == 2 * len(model.layers)
    for i, layer in enumerate(model.layers):
        layer.scale, layer.scale2 = ps[2 * i], ps[2 * i + 1]


def _scale_nested(model: nn.Module, ps: list[float]) -> None:
    # Depth order is execution order: each inner block's add runs before its outer block's.
    outers = [m for m in model.blocks]
    assert len(ps) == 2 * len(outers)
    for i, outer in enumerate(outers):
        outer.inner.scale, outer.scale = ps[2 * i], ps[2 * i + 1]


def _scale_innermost_first(model: nn.Module, ps: list[float]) -> None:
    # Depth order is execution order: within each top-level block, the innermost add runs first.
    order = [m for top in model.blocks for m in reversed([m for m in top.modules() if isinstance(m, Scaled)])]
    assert len(order) == len(ps)
    for block, p in zip(order, ps):
        block.scale = p


def _scale_cifar(model: nn.Module, ps: list[float]) -> None:
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == len(ps)
    for block, p in zip(blocks, ps):
        block.bn2.register_forward_hook(lambda _m, _i, out, p=p: out * p)


def _scale_torch_nn(model: nn.Module, ps: list[float]) -> None:
    # torch.nn's layers end each branch in a dropout (dropout1: attention, then dropout2, dropout3): its output
    # times p_l, by hook, in execution order (the encoder's layers run before the decoder's).
    ends = [d for m in model.modules() if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
            for d in (m.dropout1, m.dropout2, getattr(m, "dropout3", None)) if d is not None]
    assert len(ends) == len(ps)
    for end, p in zip(ends, ps):
        end.register_forward_hook(lambda _m, _i, out, p=p: out * p)


def _tokens():
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.zeros(6, 6).masked_fill(torch.ones(6, 6).triu(1).bool(), -1e4)
    return ids, mask


ZOO = [
    ZooEntry("plus", lambda: Seq(*(PlusBlock(8) for _ in range(3))), lambda: (torch.randn(4, 8),), 3, _scale_blocks),
    ZooEntry("iadd", lambda: Seq(*(IAddBlock(4) for _ in range(2)), stem=nn.Conv2d(3, 4, 1)),
             lambda: (torch.randn(2, 3, 8, 8),), 2, _scale_blocks),
    ZooEntry("torch_add", lambda: Seq(*(TorchAddBlock(8) for _ in range(2))), lambda: (torch.randn(4, 8),), 2, _scale_blocks),
    ZooEntry("tensor_add", lambda: Seq(*(TensorAddBlock(8) for _ in range(2))), lambda: (torch.randn(4, 8),), 2, _scale_blocks),
    ZooEntry("projection", lambda: Seq(ProjectionBlock(4, 4, 1), ProjectionBlock(4, 8, 2), ProjectionBlock(8, 8, 1),
                                       stem=nn.Conv2d(3, 4, 3, padding=1)),
             lambda: (torch.randn(2, 3, 8, 8),), 3, _scale_blocks, {1: "identity", 2: "projection", 3: "identity"}),
    ZooEntry("cifar_resnet20", lambda: cifar_resnet(20, width=4), lambda: (torch.randn(2, 3, 16, 16),), 9, _scale_cifar,
             {4: "projection", 7: "projection", 1: "identity"}),
    ZooEntry("prenorm", lambda: Transformer(PreNormLayer), _tokens, 4, _scale_transformer),
    ZooEntry("postnorm", lambda: Transformer(PostNormLayer), _tokens, 4, _scale_transformer),
    ZooEntry("layerscale", lambda: Seq(*(LayerScaleBlock(8) for _ in range(2))), lambda: (torch.randn(4, 8),), 2, _scale_blocks),
    ZooEntry("nested", lambda: Seq(NestedBlock(8), NestedBlock(8)), lambda: (torch.randn(4, 8),), 4, _scale_nested),
    ZooEntry("three_levels", lambda: Seq(ThreeLevelBlock(8), ThreeLevelBlock(8)), lambda: (torch.randn(4, 8),), 6,
             _scale_innermost_first),
    ZooEntry("slice_write", lambda: Seq(SliceWriteAttention(8), SliceWriteAttention(8)), lambda: (torch.randn(2, 5, 8),),
             2, _scale_blocks),
    ZooEntry("pool_mixer", lambda: Seq(PoolMixerBlock(4), PoolMixerBlock(4), stem=nn.Conv2d(3, 4, 1)),
             lambda: (torch.randn(2, 3, 8, 8),), 2, _scale_blocks),
    ZooEntry("shape_read_projection", lambda: Seq(ShapeReadProjectionBlock(4, 8), ShapeReadProjectionBlock(8, 8),
                                                  stem=nn.Conv2d(3, 4, 1)),
             lambda: (torch.randn(2, 3, 8, 8),), 2, _scale_blocks, {1: "projection", 2: "projection"}),
    ZooEntry("data_dependent_top", DataDependentTop, lambda: (torch.randn(4, 8),), 3, _scale_blocks),
    ZooEntry("unused_values", lambda: Seq(UnusedValueBlock(8), UnusedValueBlock(8)), lambda: (torch.randn(2, 5, 8),),
             2, _scale_blocks),
    ZooEntry("multihead", lambda: Seq(MultiheadBlock(8), MultiheadBlock(8)), lambda: (torch.randn(2, 5, 8),), 2,
             _scale_blocks),  # a leaf to torch.fx, whose first output fold knows is its out_proj's
    ZooEntry("tanh_branch", lambda: Seq(TanhBranchBlock(8), TanhBranchBlock(8)), lambda: (torch.randn(4, 8),), 2,
             _scale_blocks, kept_multiply="not positively homogeneous"),
    ZooEntry("parallel_residual", lambda: ParallelStack(ParallelResidualBlock(8), ParallelResidualBlock(8)),
             lambda: (torch.randn(4, 8), torch.randn(4, 8)), 2, _scale_blocks),
    ZooEntry("shared_norm_parallel", lambda: ParallelStack(SharedNormParallelBlock(8), SharedNormParallelBlock(8)),
             lambda: (torch.randn(4, 8), torch.randn(4, 8)), 2, _scale_blocks),
    ZooEntry("torch_nn_encoder", TorchEncoder, lambda: (torch.randn(6, 2, 16),), 4, _scale_torch_nn),
    ZooEntry("torch_nn_prenorm", lambda: TorchEncoder(norm_first=True), lambda: (torch.randn(6, 2, 16),), 4,
             _scale_torch_nn),
    ZooEntry("torch_nn_seq2seq", TorchSeq2Seq, lambda: (torch.randn(6, 2, 16), torch.randn(5, 2, 16)), 5,
             _scale_torch_nn),
    ZooEntry("layerdrop_seq2seq", LayerDropSeq2Seq, lambda: (torch.randint(0, 20, (2, 6)), torch.randint(0, 20, (2, 5))),
             4, _scale_blocks),
    ZooEntry("none_argument", NoMaskStack, lambda: (torch.randn(4, 8),), 2, _scale_blocks),
    ZooEntry("moe_grouped_mm", lambda: Seq(MoEBlock(), MoEBlock()), lambda: (torch.randn(2, 5, 8),), 2, _scale_blocks,
             kept_multiply="cannot be scaled"),
    ZooEntry("preact_bn_act", lambda: Seq(PreActBlock(4, 4), PreActBlock(4, 8), stem=nn.Conv2d(3, 4, 1)),
             lambda: (torch.randn(2, 3, 8, 8),), 2, _scale_blocks, {1: "identity", 2: "projection"}),
    ZooEntry("bn_act_out", lambda: Seq(BNActOutBlock(4), BNActOutBlock(4), stem=nn.Conv2d(3, 4, 1)),
             lambda: (torch.randn(2, 3, 8, 8),), 2, _scale_blocks),
    ZooEntry("learnt_skip_scale", lambda: Seq(*(LearntSkipScaleBlock(4) for _ in range(2)), stem=nn.Conv2d(3, 4, 1)),
             lambda: (torch.randn(2, 3, 8, 8),), 2, _scale_blocks, {1: "projection", 2: "projection"}),
    ZooEntry("cached_bias", lambda: Seq(CachedBiasBlock(8), CachedBiasBlock(8)), lambda: (torch.randn(4, 8),), 2,
             _scale_blocks),
    ZooEntry("two_depth_head", TwoDepthHead, lambda: (torch.randn(2, 3, 8, 8),), 1, _scale_blocks),
    ZooEntry("dense_concat", DenseLike, lambda: (torch.randn(4, 8),), 0),
    ZooEntry("negatives", Negatives, lambda: (torch.randn(4, 8), torch.randn(4, 8)), 0),
    ZooEntry("escaping_branch", EscapingBranch, lambda: (torch.randn(4, 8),), 0),
]
POSITIVE = [e for e in ZOO if e.num_sites]


def linear_ps(L: int, p_L: float) -> list[float]:
    """The paper's rule written out independently of sdsurgeon.schedule."""
    return [1 - (l / L) * (1 - p_L) for l in range(1, L + 1)]
