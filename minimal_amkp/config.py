"""Every setting of a run, one dataclass per concern, with the `paper` and `tiny` presets.

`paper` follows Sec. 3.1 where the paper gives a number (ResNet-50, 512 input, batch 64,
lr 0.1, 50 + 10 epochs, T = 3, n/N = 0.125, λ = 0.5); `tiny` keeps the same structure
(Bottleneck blocks, layer1..layer4, MSA, AM with KP) but narrow and shallow, so that the
whole job runs on a 2-core CPU in minutes. On the command line run options are flat
(`--data DIR`) and hyper-parameters are `--section.field VALUE` (`--train.lr 0.01`); how the
settings travel as text (the command line, config.json) is run/settings.py.
"""
import math
from dataclasses import dataclass, field


class RunError(Exception):
    """A problem the user must fix (bad option, data, checkpoint or folder): one line, no traceback.

    `shared` is True when every process of a run raises it alike (a bad option, a minibatch too
    small to split), so that rank 0 alone reports it."""

    shared = False

    def __init__(self, message, shared=False):
        super().__init__(message)
        self.shared = shared


@dataclass
class ModelConfig:
    width: int = 64                        # conv1 channels; layer_i has width·2^(i-1) planes, ×4 out
    blocks: tuple = (3, 4, 6, 3)           # Bottlenecks per stage, layer1..layer4 (ResNet-50); 3 or 4 stages
    msa: str = "bilinear"                  # Sec. 2.3 upsampling of the last stage: bilinear | deconv | none
    msa_channels: tuple = (512, 256)       # 1×1 conv widths for the last and penultimate stage; X has their sum
    nonneg_w: bool = False                 # keep branch weights w >= 0 so CAMs (eq. 7) are >= 0
    padding: str = "zeros"                 # conv padding: zeros (torchvision) | replicate (no border cue)


@dataclass
class DataConfig:
    image_size: int = 512                  # S: the model sees S×S grayscale images
    preload: bool = False                  # hold every image in memory (small data sets only)
    workers: int = 8                       # threads that read images and check PNGs
    phantom_images: int = 2000             # phantom generated when --data is not given
    phantom_size: int = 512
    phantom_seed: int = 0
    phantom_scenario: str = "v2"           # v2 | hidden-sibling (the positive control) | sibling-alone (its lesion B only)


@dataclass
class TrainConfig:
    batch_size: int = 64
    optimizer: str = "sgd"                 # sgd (paper) | adamw (from scratch on CPU: converges faster)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    shift: float = 0.0                     # random translation, up to this fraction of S (phases before mining)
    zoom: float = 0.0                      # random rescaling by a factor in [1 - zoom, 1 + zoom] (likewise)
    base_epochs: int = 50                  # ResNet-50 before MSA exists
    msa_frozen_epochs: int = 10            # MSA + branches only, layers below MSA fixed
    msa_epochs: int = 10                   # all of ResNet-MSA end to end ("until plateau")


@dataclass
class MineConfig:
    rounds: int = 3                        # T
    epochs: int = 5                        # at most this many passes over the mining images per round
    min_epochs: int = 1                    # at least this many
    level_off: float = 0.02                # a round ends when an epoch lowers its erased-image loss by less
    batch_size: int = 64                   # N
    lr: float = 0.01
    warmup: int = 20                       # steps of linear warm-up to lr at the start of mining
    kp: str = "full"                       # full | vanilla | none (Sec. 2.2, Table 3)
    fraction: float = 0.125                # n/N, the erased share of a minibatch
    lam: float = 0.5                       # λ of eq. (6)
    balance: float = 0.0                   # > 0: λ per round at most this × the AM term's gradient norm (mine.balanced_lam)
    threshold: float = 0.5                 # CAM binarisation of the mask update (Sec. 3.2)
    dilate: int = 0                        # grow each erased region by this many cells (0: the paper)
    bn: str = "frozen"                     # batch norm while mining: frozen (running statistics) | batch
    erase: str = "feature"                 # feature: eq. (1) on X | image: the same cells' pixels filled (reference.erase_image)
    oracle: bool = False                   # M_1 = the positive control's lesions A, not the update of H_1
    update: str = "all"                    # all: N_B's every weight (the paper) | heads: the C branches' w, b only
    holes: str = "none"                    # matched: negatives get erased regions drawn from the positives' (erasure.hole_masks)


@dataclass
class RunConfig:
    preset: str = "tiny"
    data: str = ""                         # ChestX-ray14 folder; "" = the cached phantom
    out: str = "runs/default"
    seed: int = 0
    device: str = "auto"                   # auto | cpu | cuda
    backend: str = "auto"                  # ops: auto | torch | triton (the CLI's default: $AMKP_BACKEND)
    init: str = ""                         # torchvision ResNet-50 state dict (fc.* ignored)
    skip_bad_images: bool = False
    report_extras: bool = True             # MaxBoxAccV2 and figures; off saves ~1 min a run at 256 px


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mine: MineConfig = field(default_factory=MineConfig)


CHOICES = {("model", "msa"): ("bilinear", "deconv", "none"),
           ("model", "padding"): ("zeros", "replicate"),
           ("mine", "kp"): ("full", "vanilla", "none"),
           ("mine", "bn"): ("frozen", "batch"),
           ("mine", "erase"): ("feature", "image"),
           ("mine", "holes"): ("none", "matched"),
           ("mine", "update"): ("all", "heads"),
           ("train", "optimizer"): ("sgd", "adamw"),
           ("run", "device"): ("auto", "cpu", "cuda"),
           ("run", "preset"): ("tiny", "paper"),
           ("data", "phantom_scenario"): ("v2", "hidden-sibling", "sibling-alone")}

# `tiny` was chosen on phantom v2 (6000 images, 128 px) so that the whole run fits in a few
# minutes on 2 CPU cores with a map of at least 16×16. Measured choices, each a field one can
# override (docs/phantom.md, "The tiny preset"):
# - three stages, MSA on layer2 and layer3: X at 1/8 of a 128-px input (16×16) for a quarter
#   of the cost of four stages without the stem's max-pool;
# - ResNet-MSA from scratch in one end-to-end phase (no ImageNet ResNet-50 to start the
#   paper's base and frozen phases from); AdamW with batch 16, far fewer steps than SGD;
# - random shifts and zooms; a free w (w >= 0 cost 0.06-0.1 of box-class AUROC). Findings that
#   take lung away (cardiomegaly, effusion) are learnt as "less lung", so their CAMs peak
#   anywhere outside the lungs; the zoom was meant to make that area cue unreliable and does not
#   do so reliably (docs/phantom.md, "The tiny preset");
# - replicate padding, so border cells get no zero frame to key on;
# - mining that is not swamped (issue 22; docs/mining.md): half of
#   each minibatch erased (n/N = 0.5, the paper's 0.125 left 4-7 erased positives among 448
#   BCE terms), λ brought down each round to where λ·L_KP's gradient is no larger than the
#   erased positives' (balance 1; the paper's λ = 0.5 gave it 12-25 times theirs), and up to 5
#   epochs a round, at least 2.
PRESETS = {
    "tiny": {
        "model": dict(width=8, blocks=(1, 1, 1), msa_channels=(48, 48), padding="replicate"),
        "data": dict(image_size=128, preload=True, workers=2, phantom_images=6000, phantom_size=128),
        "train": dict(batch_size=16, optimizer="adamw", lr=0.01, shift=0.08, zoom=0.15, base_epochs=0,
                      msa_frozen_epochs=0, msa_epochs=12),
        "mine": dict(epochs=5, min_epochs=2, batch_size=32, lr=0.01, fraction=0.5, balance=1.0),
    },
    "paper": {},
}


def preset(name):
    if name not in PRESETS:
        raise RunError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = Config()
    cfg.run.preset = name
    for section, values in PRESETS[name].items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def validate(cfg):
    """Reject settings no run can use, before any work starts (exit 2, one line)."""
    m, d, t, k, r = cfg.model, cfg.data, cfg.train, cfg.mine, cfg.run
    finite = math.isfinite
    checks = [
        (0 <= r.seed < 2 ** 32, f"--seed must lie in [0, 2^32), got {r.seed}"),
        (m.width >= 1, "--model.width must be >= 1"),
        (len(m.blocks) in (3, 4) and min(m.blocks) >= 1,
         "--model.blocks needs 3 or 4 counts >= 1, e.g. 3,4,6,3"),
        (len(m.msa_channels) == 2 and min(m.msa_channels) >= 1, "--model.msa-channels needs 2 widths >= 1"),
        (32 <= d.image_size <= 4096, "--data.image_size must lie in [32, 4096] (the model downsamples by 32; "
                                     "no ChestX-ray14 film is larger)"),
        (d.workers >= 1, f"--data.workers must be >= 1, got {d.workers}"),
        (32 <= d.phantom_size <= 4096, "--data.phantom_size must lie in [32, 4096]"),
        (d.phantom_seed >= 0, f"--data.phantom_seed must be >= 0, got {d.phantom_seed}"),
        (d.phantom_scenario in CHOICES[("data", "phantom_scenario")],
         f"--data.phantom_scenario must be one of {', '.join(CHOICES[('data', 'phantom_scenario')])}, "
         f"got {d.phantom_scenario!r}"),
        (t.batch_size >= 2 and k.batch_size >= 2, "batch sizes must be >= 2 (batch norm)"),
        (finite(t.lr) and t.lr > 0, f"--train.lr must be a positive number, got {t.lr}"),
        (finite(k.lr) and k.lr > 0, f"--mine.lr must be a positive number, got {k.lr}"),
        (finite(t.momentum) and 0 <= t.momentum < 1, f"--train.momentum must lie in [0, 1), got {t.momentum}"),
        (finite(t.weight_decay) and t.weight_decay >= 0, f"--train.weight_decay must be >= 0, got {t.weight_decay}"),
        (finite(t.shift) and 0 <= t.shift < 0.5, f"--train.shift must lie in [0, 0.5) (a fraction of S), got {t.shift}"),
        (finite(t.zoom) and 0 <= t.zoom < 0.5, f"--train.zoom must lie in [0, 0.5), got {t.zoom}"),
        (k.min_epochs >= 0, f"--mine.min-epochs must be >= 0, got {k.min_epochs}"),
        (k.warmup >= 0, f"--mine.warmup must be >= 0 steps, got {k.warmup}"),
        (k.dilate >= 0, f"--mine.dilate must be >= 0 cells, got {k.dilate}"),
        (finite(k.balance) and k.balance >= 0, f"--mine.balance must be >= 0 (0: λ = --mine.lam), got {k.balance}"),
        (finite(k.level_off) and k.level_off >= 0, f"--mine.level-off must be >= 0, got {k.level_off}"),
        (0 < k.fraction < 1, "--mine.fraction (n/N) must lie strictly between 0 and 1"),
        (finite(k.lam) and k.lam >= 0, f"--mine.lam must be >= 0, got {k.lam}"),
        (finite(k.threshold) and 0 <= k.threshold <= 1, f"--mine.threshold must lie in [0, 1], got {k.threshold}"),
        (k.rounds >= 1, "--mine.rounds (T) must be >= 1"),
        (min(t.base_epochs, t.msa_frozen_epochs, t.msa_epochs, k.epochs) >= 0, "epochs must be >= 0"),
        (d.phantom_images >= 20, "--data.phantom_images must be >= 20"),
    ]
    for ok, message in checks:
        if not ok:
            raise RunError(message)
    return cfg
