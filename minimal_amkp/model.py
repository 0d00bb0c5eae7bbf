"""ResNet-50 and ResNet-MSA (Sec. 2.3) with C class branches (eq. 2), without torchvision.

Module names copy torchvision's resnet50 (conv1, bn1, layer1.0.downsample.1, ...), so its
ImageNet state dict loads with `load_init`. ResNet-MSA takes the outputs of the last two stages
("bottlenecks" in the paper): X_k, the last (1/32 of the input for ResNet-50's four stages), is
reduced to 512 channels with a 1×1 conv and upsampled ×2 (bilinear or a 3×3 stride-2
transposed conv); X_{k-1}, the penultimate (1/16), is reduced to 256; X = [X̄_k, X̄_{k-1}]
(N, 768, S/16, S/16). `msa="none"` is the plain ResNet with X = X_k. The branches are one
(C, D) weight w and a (C,) bias b applied to the GAP of the class-erased X through
`ops.branch_logits`. Options of ours for from-scratch training on a CPU, off in the `paper`
preset: fewer stages (len(model.blocks) = 3 puts MSA on layer2 and layer3, so X is at 1/8 of
the input at a quarter of the cost), w >= 0 and replicate conv padding.
"""
import math
from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn

from minimal_amkp import ops
from minimal_amkp import reference as R
from minimal_amkp.classes import CLASSES
from minimal_amkp.config import RunError

# The K layers of eq. (5): X_{k-1} and X_k of the last two stages, X and the logits.
Outputs = namedtuple("Outputs", "penultimate last x logits")

_MEAN = (0.485, 0.456, 0.406)                                 # ImageNet statistics, for --init
_STD = (0.229, 0.224, 0.225)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)    # stride here: v1.5
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


def _conv_bn_relu(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def upsample2(a, h, w):
    """×2 bilinear upsampling whose output j reads input j/2, cropped to (h, w) (our choice).

    interpolate(align_corners=False) reads j/2 − 1/4, which centres the upsampled X_k a quarter
    of its cell up and left of X_{k-1}'s cells (reference.geometry); reading j/2 keeps both
    paths of MSA on one grid. align_corners=True from n + 1 samples (the edge repeated) to
    2n + 1 reads exactly j·n/(2n) = j/2, and the repeated edge clamps the last odd j.
    """
    n_h, n_w = a.shape[-2:]
    a = F.pad(a, (0, 1, 0, 1), mode="replicate")
    return F.interpolate(a, size=(2 * n_h + 1, 2 * n_w + 1), mode="bilinear", align_corners=True)[..., :h, :w]


class MSA(nn.Module):
    """Sec. 2.3: X = [up×2(conv1×1(X_k)), conv1×1(X_{k-1})], the last two stages' outputs.

    BN + ReLU after each conv is our choice (the paper is silent): it keeps X non-negative, so
    that erasing (zeroing) a region removes evidence rather than adding some. Bilinear
    upsampling is phase-aligned (upsample2), so X has one grid (map_grid).
    """

    def __init__(self, c3, c4, out4, out3, upsample):
        super().__init__()
        self.upsample = upsample
        self.reduce4 = _conv_bn_relu(c4, out4)
        self.reduce3 = _conv_bn_relu(c3, out3)
        if upsample == "deconv":
            self.deconv = nn.Sequential(nn.ConvTranspose2d(out4, out4, 3, 2, 1, output_padding=1, bias=False),
                                        nn.BatchNorm2d(out4), nn.ReLU(inplace=True))

    def forward(self, x3, x4):
        h, w = x3.shape[-2:]
        a = self.reduce4(x4)
        if self.upsample == "deconv":
            a = self.deconv(a)[..., :h, :w]            # odd X_{k-1} sizes: 2·ceil(h/2) may exceed h
        else:
            a = upsample2(a, h, w)
        return torch.cat([a, self.reduce3(x3)], dim=1)


class ResNetMSA(nn.Module):
    def __init__(self, cfg, num_classes=len(CLASSES), backend="auto"):
        super().__init__()
        self.backend = backend          # chosen once for the run (ops.choose_backend), given to every op
        self.msa_mode = cfg.msa
        w = cfg.width
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = w
        for i, n in enumerate(cfg.blocks):
            planes = w * 2 ** i
            blocks = [Bottleneck(inplanes if j == 0 else planes * 4, planes, 2 if i and j == 0 else 1)
                      for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes * 4
        self.stages = [getattr(self, f"layer{i + 1}") for i in range(len(cfg.blocks))]
        c_prev, c_last = inplanes // 2, inplanes              # channels of X_{k-1} and X_k
        if cfg.msa == "none":
            self.msa, dim = None, c_last
        else:
            self.msa = MSA(c_prev, c_last, cfg.msa_channels[0], cfg.msa_channels[1], cfg.msa)
            dim = sum(cfg.msa_channels)
            self.base_fc = nn.Linear(c_last, num_classes)   # plain ResNet head, trained before MSA exists
        self.fc = nn.Linear(dim, num_classes)           # the C branches: w (C, D), b (C,) of eq. (2)
        self.nonneg_w = cfg.nonneg_w
        self._init_weights()
        for mod in self.modules():
            # Replicate padding (our option; the state dict is unchanged) gives border cells no
            # zero frame to key on, so a from-scratch net's CAMs do not peak in image corners.
            if type(mod) is nn.Conv2d and mod.padding != (0, 0):
                mod.padding_mode = cfg.padding

    def _init_weights(self):
        for mod in self.modules():
            if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(mod, nn.BatchNorm2d):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)
        for mod in self.modules():
            if isinstance(mod, Bottleneck):             # each block starts as the identity
                nn.init.zeros_(mod.bn3.weight)
        for fc in (self.fc, getattr(self, "base_fc", None)):
            if fc is not None:                          # start at a rare finding's log-odds, p = 5%
                nn.init.constant_(fc.bias, math.log(0.05 / 0.95))
        if self.nonneg_w:
            with torch.no_grad():                       # small and > 0: w = 0 passes no gradient to X
                self.fc.weight.abs_().mul_(0.01)

    @torch.no_grad()
    def constrain(self):
        """With nonneg_w, project w onto w >= 0 (after every optimizer step).

        Our addition for from-scratch training (the paper's w is unconstrained): a free w
        learns strong negative evidence (healthy lung argues against every finding), and
        one very negative region squeezes the rest of a min-max normalised CAM into the top
        of [0, 1], so every box threshold keeps nearly the whole image. With X >= 0 and
        w >= 0 a CAM is >= 0 and peaks where the evidence for the class is.
        """
        if self.nonneg_w:
            self.fc.weight.clamp_(min=0)

    def below_msa(self):
        """The modules Sec. 3.1 freezes while MSA is initialised."""
        return [self.conv1, self.bn1, *self.stages]

    def backbone(self, image):
        """image (N, 1, S, S) in [0, 1] -> X_{k-1}, X_k: for four stages layer3 (N, 16w, S/16,
        S/16) and layer4 (N, 32w, S/32, S/32), for three layer2 and layer3 at 1/8 and 1/16."""
        x = (image.expand(-1, 3, -1, -1) - self.mean) / self.std
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages[:-1]:
            x = stage(x)
        return x, self.stages[-1](x)

    def forward(self, image, m=None, kp_x=None):
        """image (N, 1, S, S), masks m (N, C, h, w) or None (all ones) -> Outputs.

        With kp_x = (N_A's X for the images n0.., n0) and masks, -> (Outputs, eq. (4) at X):
        ops.am_step computes the logits and that KP term together (one dX in backward).
        """
        x3, x4 = self.backbone(image)                                     # X_{k-1}, X_k
        x = x4 if self.msa is None else self.msa(x3, x4)                  # (N, D, h, w)
        if m is not None and (m.shape[:2] != (x.shape[0], self.fc.out_features) or m.shape[2:] != x.shape[2:]):
            raise ValueError(f"m must be (N, C, h, w) = ({x.shape[0]}, {self.fc.out_features}, "
                             f"{x.shape[2]}, {x.shape[3]}) for image {tuple(image.shape)}, got {tuple(m.shape)}")
        if kp_x is not None:
            logits, l_kp_x = ops.am_step(x, m, self.fc.weight, self.fc.bias, *kp_x, backend=self.backend)
            return Outputs(x3, x4, x, logits), l_kp_x
        logits = ops.branch_logits(x, m, self.fc.weight, self.fc.bias, backend=self.backend)  # (N, C)
        return Outputs(x3, x4, x, logits)

    def base_logits(self, image):
        """Logits of the plain ResNet (GAP of X_k), the network Sec. 3.1 trains first."""
        if self.msa is None:
            return self(image).logits
        return self.base_fc(self.backbone(image)[1].mean((-2, -1)))

    def cam(self, image, m, classes):
        """Eq. (7) for the first `classes` branches: image (N, 1, S, S), m (N, classes, h, w) -> (N, classes, h, w)."""
        x3, x4 = self.backbone(image)
        x = x4 if self.msa is None else self.msa(x3, x4)
        return ops.cam(x, m, self.fc.weight[:classes], backend=self.backend)


def map_size(image_size, msa, stages=4):
    """Side h of X for an S×S input: the stem halves twice, every stage after the first once
    more (each rounding up); X is X_{k-1} with MSA, X_k without: S/16 and S/32 for 4 stages."""
    h = image_size
    for _ in range(stages + (msa == "none")):
        h = (h - 1) // 2 + 1
    return h


def _window(mod):
    """(kernel, stride, padding) of a square conv or pooling layer."""
    k, s, p = (v if isinstance(v, int) else v[0] for v in (mod.kernel_size, mod.stride, mod.padding))
    if any(not isinstance(v, int) and len(set(v)) > 1 for v in (mod.kernel_size, mod.stride, mod.padding)):
        raise ValueError(f"{type(mod).__name__}: map_grid needs square windows")
    return k, s, p


def map_grid(model, image_size):
    """Where X's cells look (reference.geometry): Grid(stride, offset, image_size) in input
    pixels, composed from the model's own layers: the stem (conv1, max-pool), every block's
    three convs (checked against its downsample path, which the sum must agree with) and, with
    MSA, X_k's path upsampled ×2 onto X_{k-1}'s grid (checked to coincide)."""
    layers, grids = [_window(model.conv1), _window(model.maxpool)], []
    for stage in model.stages:
        for block in stage:
            main = [_window(c) for c in (block.conv1, block.conv2, block.conv3)]
            if block.downsample is not None and R.compose(main) != R.compose([_window(block.downsample[0])]):
                raise ValueError("map_grid: a block's residual and downsample paths centre differently")
            layers += main
        grids.append(R.compose(layers))
    (s_prev, o_prev), (s_last, o_last) = grids[-2], grids[-1]
    if model.msa is None:
        return R.Grid(s_last, o_last, image_size)
    if (s_last, o_last) != (2 * s_prev, o_prev):
        raise ValueError(f"map_grid: MSA's paths lie on different grids ({s_prev}, {o_prev}) and ({s_last}, {o_last})")
    return R.Grid(s_prev, o_prev, image_size)


def load_init(model, path):
    """Load a torchvision-layout ResNet state dict into everything below the branches.

    Strict except `fc.*` (ImageNet's 1000 classes) and the layers torchvision lacks (MSA, the
    branches); anything else missing, extra or of another shape is a RunError naming it.
    """
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RunError(f"--init {path}: cannot read a PyTorch state dict ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RunError(f"--init {path}: expected a state dict (name -> tensor), got {type(sd).__name__}")
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith(("fc.", "base_fc.", "msa."))}
    optional = ".num_batches_tracked"
    missing = [k for k in ours if k not in sd and not k.endswith(optional)]
    unexpected = [k for k in sd if k not in ours]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items()
              if k in sd and sd[k].shape != v.shape]
    problems = [f"{name}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for name, keys in
                (("missing", missing), ("unexpected", unexpected), ("shape (file vs model)", shapes)) if keys]
    if problems:
        raise RunError(f"--init {path}: not a state dict of this architecture; " + "; ".join(problems))
    model.load_state_dict(sd, strict=False)
