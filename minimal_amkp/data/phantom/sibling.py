"""Lesion B of the positive control: a disk of parallel stripes whose angle and spacing name its class.

The scenarios of the phantom (`--scenario`; a run's `--data.phantom-scenario`):
- v2: the phantom of film.py; nothing here is drawn.
- hidden-sibling, the positive control of attention mining. Every positive of a box class
  carries one lesion A of that class, drawn by that class's sign in film.py (its first, most
  conspicuous lesion: Chest.one_lesion). With probability B_SHARE, per image and class, it also
  carries a lesion B of the class: a disk of parallel stripes (`code`: one of 4 angles 45°
  apart and one of 2 spacings), which no sign of v2 resembles, lying mostly inside a lung,
  clear of the heart shadow, with its centre at least FAR·S from the centre of A's box. Where
  no such place is, the image has no B. So B never appears without A: a classifier needs only
  A, and B is what mining is meant to find once A is erased.
- sibling-alone: every positive of a box class carries B alone (no A, anywhere in the lungs),
  the data on which a classifier must show that B can be learnt at all.
Findings of the other classes are drawn as in v2. The control makes no claim of realism:
nothing on a chest film looks like B, and one sign to a class is far from the release.

B's coins, sizes and places come from a stream of their own (`stream`), so the A lesions and
the film around them are drawn from the image's v2 stream as they would be without B.
"""
import numpy as np
from scipy import ndimage

from minimal_amkp.classes import BOX_CLASSES
from minimal_amkp.config import CHOICES
from minimal_amkp.data.phantom.anatomy import smoothstep

SCENARIOS = CHOICES[("data", "phantom_scenario")]
# Bump whenever B changes: the control's cached phantoms (job.phantom_root) are named by it.
VERSION = 3
B_SHARE = 0.5             # P(B) per positive image and box class (hidden-sibling)
# B's centre lies this share of the image side from A's box centre: 8 map cells of the tiny
# preset (16 cells of 8 px over 128 px), the distance at which a map's cells are surely apart.
FAR = 0.5
RADIUS = (0.07, 0.08)     # of the image side: a disk of 18-20 px at 128 px, two map cells and a bit
# Stripe spacings, of the image side: 5.3 and 9.1 px at 128 px, well above the 4-px period
# at the Nyquist limit of the stem's stride 2 (a first B, 4-px stripes at 8 angles 22.5°
# apart, was told apart for one class in eight by the tiny preset), and apart still under
# its ±15% zoom.
PERIODS = (1 / 24, 1 / 14)
ANGLE = 45.0              # degrees between the stripes of classes c and c + 1 (c < 4, and c >= 4)
# Density of a bright stripe (v2's signs add 0.25-0.75, the ribs 0.11). Measured on the tiny
# preset, seed 0: at 0.3-0.4 B alone reached box-class AUROC 0.97, but beside A H_1 found 44%
# of the B lesions at IoU 0.3 (the gate allows 20%); at 0.2-0.25 H_1 finds 14%, and B alone
# reaches 0.94 (the gate asks 0.95).
AMP = (0.2, 0.25)
EDGE = 1.5                # px over which the disk fades in
TAG = 0xB                 # the last word of B's seed: stream(seed, i) is not v2's [seed, i + 1]


def stream(seed, i):
    """The generator of image i's B lesions, apart from its v2 stream."""
    return np.random.default_rng([seed, i + 1, TAG])


def code(c):
    """Box class c's stripes: (angle in degrees from the image's rows, turning clockwise on screen
    as y runs down; period as a share of the image side). Four angles, none along the ribs,
    and two spacings."""
    return ANGLE / 2 + ANGLE * (c % 4), PERIODS[c // 4]


def _place(rng, free, r, far_from, taken, size):
    """A disk centre (x, y) in pixels, on a pixel centre: the centre lies r/2 inside the free
    area (free: distance in px to the nearest pixel outside it; most of the disk is then in
    it, and a lung's narrow apex and base still take one), its centre FAR·S + 1 px
    from every point of far_from (the pixel lets B's box centre clear FAR·S too) and the disk
    clear of the disks taken [(x, y, r)]. None when no pixel qualifies."""
    ys, xs = np.nonzero(free >= r / 2)
    x, y = xs + 0.5, ys + 0.5
    ok = np.ones(len(xs), bool)
    for fx, fy in far_from:
        ok &= np.hypot(x - fx, y - fy) >= FAR * size + 1
    for tx, ty, tr in taken:
        ok &= np.hypot(x - tx, y - ty) > r + tr + 2
    if not ok.any():
        return None
    k = rng.choice(np.flatnonzero(ok))
    return float(x[k]), float(y[k])


def _stripes(ch, c, cx, cy, r, amp):
    """Add the striped disk of class c (`code`) at (cx, cy) px to ch.extra -> its support (S, S)
    bool. A bright stripe runs through the centre."""
    yy, xx = np.mgrid[:ch.size, :ch.size].astype(np.float32) + np.float32(0.5)
    dx, dy = xx - np.float32(cx), yy - np.float32(cy)
    disk = smoothstep(np.float32(r) - np.hypot(dx, dy), EDGE)
    angle, period = code(c)
    th = np.deg2rad(angle)
    across = np.float32(-np.sin(th)) * dx + np.float32(np.cos(th)) * dy
    wave = 0.5 + 0.5 * np.cos(np.float32(2 * np.pi / (period * ch.size)) * across)
    ch.extra += np.float32(amp) * disk * wave
    return disk > 0.5


def siblings(rng, ch, labels, a_boxes, alone):
    """Draw this image's B lesions into ch -> [(class index, support (S, S) bool)].

    rng: stream(seed, i); labels (14,); a_boxes [(class index, (x, y, w, h))] of the A lesions;
    alone: sibling-alone (every positive of a box class gets B, placed without regard to A)."""
    wanted = rng.random(len(BOX_CLASSES)) < B_SHARE      # a coin a class, whatever the labels
    free = ndimage.distance_transform_edt((ch.lung > 0.5) & (ch.heart_shape < 0.2))
    taken, out = [], []
    for c in np.flatnonzero(labels[:len(BOX_CLASSES)]):
        r, amp = rng.uniform(*RADIUS) * ch.size, rng.uniform(*AMP)
        a_centres = [(x + w / 2, y + h / 2) for k, (x, y, w, h) in a_boxes if k == c]
        if not alone and not (wanted[c] and a_centres):
            continue
        at = _place(rng, free, r, [] if alone else a_centres, taken, ch.size)
        if at is not None:
            taken.append((*at, r))
            out.append((int(c), _stripes(ch, c, *at, r, amp)))
    return out
