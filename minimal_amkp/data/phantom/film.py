"""Draw one phantom radiograph: the anatomy of anatomy.py plus the signs of its findings.

Every boxed finding is drawn the way it shows on film, with a conspicuous part (its core) and a
fainter extent around or beside it; its box is drawn around the whole finding, as a reader
boxes it. The core is where a classifier that has learnt the finding's most obvious form looks
first; the extent is what attention mining is meant to find next. When an image holds several
lesions of one class, the later ones differ from the first: smaller, fainter, or mostly the
faint form (another texture), as second lesions do on real films.

Each sign returns its lesions as Lesion(core, extent): boolean (S, S) supports where the core
and the whole finding are above half strength. A box is the bounding box of the extent, less
what hides behind the heart shadow. The positive control's lesion B is sibling.py's.
"""
from collections import namedtuple

import numpy as np
from scipy import ndimage

from minimal_amkp.classes import BOX_CLASSES, CLASSES
from minimal_amkp.data.phantom.anatomy import Chest, box_of, smoothstep
from minimal_amkp.data.phantom.sibling import siblings

Lesion = namedtuple("Lesion", "core extent")          # boolean (S, S) supports
Form = namedtuple("Form", "side amp core strength")   # one lesion's size, density, core weight
Drawn = namedtuple("Drawn", "image boxes cores chest kinds")
# A later lesion of a class is one of these, drawn at random: (size, strength, core) factors.
LATER = {"smaller": ((0.55, 0.8), (0.9, 1.0), (1.0, 1.0)),
         "fainter": ((0.85, 1.0), (0.45, 0.65), (1.0, 1.0)),
         "texture": ((0.85, 1.0), (0.9, 1.0), (0.15, 0.35))}


def variant(rng, k):
    """(size, strength, core) factors of the k-th lesion (0-based) of a class in one image."""
    if k == 0:
        return 1.0, 1.0, 1.0
    kind = LATER[("smaller", "fainter", "texture")[int(rng.integers(3))]]
    return tuple(float(rng.uniform(*lo_hi)) for lo_hi in kind)


def _lobulated(ch, cx, cy, r0, lobes):
    """Distance from (cx, cy) and a lobulated radius r(θ) around it, (S, S) each."""
    dx, dy = ch.x - np.float32(cx), ch.y - np.float32(cy)
    th = np.arctan2(dy, dx)
    r = np.ones_like(th)
    for k, amp in lobes:
        r += np.float32(amp) * np.sin(k * th + np.float32(ch.rng.uniform(0, 2 * np.pi)))
    return np.hypot(dx, dy), np.float32(r0) * r


def _add(ch, amp, core, fringe, extent, core_factor):
    """Density amp·(core_factor·core + fringe·extent); -> Lesion of the core and the whole."""
    ch.extra += np.float32(amp) * (np.float32(core_factor) * core + np.float32(fringe) * extent)
    return Lesion(core > 0.5, (extent > 0.5) | (core > 0.5))


def _forms(ch, name, amp_lo, amp_hi, count=None):
    """This image's lesions of one class: the first's side (chest units) and density drawn
    around the release's box size, every later one that first scaled by its variant."""
    side, amp = ch.side_units(name), ch.rng.uniform(amp_lo, amp_hi)
    out = []
    for k in range(ch.count(name) if count is None else count):
        size, strength, core = variant(ch.rng, k)
        out.append(Form(side * size, amp * strength, core, strength))
    return out


def nodule(ch):
    """Small round opacities: a solid centre inside a fainter ground-glass halo."""
    taken, out = [], []
    for f in _forms(ch, "Nodule", 0.3, 0.45):
        r = f.side / 2
        cx, cy = ch.place(r, taken)
        d = np.hypot(ch.x - np.float32(cx), ch.y - np.float32(cy))
        rc = r * ch.rng.uniform(0.5, 0.65)
        core = smoothstep(rc - d, max(0.3 * rc, ch.units(1.0)))
        halo = smoothstep(r - d, max(0.35 * r, ch.units(1.0)))
        out.append(_add(ch, f.amp, core, 0.3, halo, f.core))
    return out


def mass(ch):
    """Larger lobulated opacities: a dense centre, a less dense lobulated rim."""
    taken, out = [], []
    for f in _forms(ch, "Mass", 0.3, 0.45):
        r = f.side / 2 / 1.1
        cx, cy = ch.place(r, taken, margin=0.5 * r)
        d, rt = _lobulated(ch, cx, cy, r, ((3, 0.12), (5, 0.07)))
        core = smoothstep(ch.rng.uniform(0.5, 0.65) * rt - d, 0.2 * r)
        rim = smoothstep(rt - d, 0.2 * r)
        out.append(_add(ch, f.amp, core, 0.35, rim, f.core))
    return out


def atelectasis(ch):
    """Volume loss: a dense plate-like band (or wedge) inside the fainter, crowded segment
    that collapsed around it; mostly basal, within the lung."""
    rng, taken, out = ch.rng, [], []

    def basal(cx, cy):
        return 0.2 + np.clip((cy - ch.apex_y) / (ch.peak.mean() - ch.apex_y), 0, 1) ** 2
    for f in _forms(ch, "Atelectasis", 0.32, 0.45):
        s = f.side
        half_len = 0.85 * s
        cx, cy = ch.place(half_len, taken, basal, margin=0.3 * s)
        alpha = rng.uniform(-0.35, 0.35) if rng.random() < 0.6 else rng.uniform(-1.0, 1.0)
        dx, dy = ch.x - np.float32(cx), ch.y - np.float32(cy)
        along = np.float32(np.cos(alpha)) * dx + np.float32(np.sin(alpha)) * dy
        across = np.float32(np.cos(alpha)) * dy - np.float32(np.sin(alpha)) * dx
        thick = max(s * rng.uniform(0.1, 0.16), ch.units(2.0))
        d = np.hypot(np.maximum(np.abs(along) - 0.8 * half_len, 0), across)
        band = smoothstep(thick / 2 - d, 0.5 * thick) * ch.lung
        segment = smoothstep(1 - np.hypot(along / half_len, across / (0.42 * half_len)), 0.25) * ch.lung
        out.append(_add(ch, f.amp, band, 0.3, segment, f.core))
    return out


def _sides(ch, name, amp_lo, amp_hi):
    """[(side of the chest, Form)]: at most one lesion a side, the first side at random."""
    first = int(ch.rng.integers(2))
    forms = _forms(ch, name, amp_lo, amp_hi, min(ch.count(name), 2))
    return list(zip([first, 1 - first], forms))


def effusion(ch):
    """Fluid dense at the base, under a meniscus, thinning as it climbs the lateral wall."""
    rng, out = ch.rng, []
    q = np.abs(ch.x)
    for side, f in _sides(ch, "Effusion", 0.55, 0.75):
        s = f.side
        on_side = (ch.x >= 0) if side else (ch.x < 0)
        q_lat, q_med = ch.apex_x + ch.lat_w[side], ch.apex_x - ch.med_w
        depth = float(np.clip(0.85 * s * s / (q_lat - q_med), ch.units(3.0), 0.6))
        top_lat = float(ch.dome(np.float32(q_lat * (1 if side else -1)))) - depth
        top_med = top_lat + 0.6 * depth
        u = np.clip((q - q_med) / (q_lat - q_med), 0, 1)
        meniscus = top_med - (top_med - top_lat) * u * u
        # Fluid behind the heart adds nothing visible; left in, it would outshine the heart.
        inside = ch.lung * on_side * (1 - ch.heart_shape)
        pool = smoothstep(ch.y - meniscus, 0.04) * inside
        # The rim: a layer against the lateral wall up to `climb` above the meniscus, its
        # thickness (in lung depth) tapering to nothing at the top.
        climb = rng.uniform(0.45, 0.7) * s
        wall = ch.lung_depth(ch.x, ch.y)
        height = np.clip((top_lat - ch.y) / climb, 0, 1)
        layer = np.float32(0.15 * s) * (1 - height)
        rim = smoothstep(layer - wall, 0.02) * smoothstep(top_lat + 0.05 - ch.y, 0.04) \
            * smoothstep(ch.y - (top_lat - climb), 0.04) * inside
        out.append(_add(ch, f.amp, pool, 0.45, np.maximum(pool, rim), f.core))
    return out


def infiltration(ch):
    """Ill-defined patchy haze around a denser patch, often in more than one place."""
    taken, out = [], []
    for f in _forms(ch, "Infiltration", 0.25, 0.38):
        s = f.side
        cx, cy = ch.place(0.5 * s, taken, margin=0.2 * s)
        d2 = (ch.x - np.float32(cx)) ** 2 + (ch.y - np.float32(cy)) ** 2
        patch = 1 / (1 + np.exp(-2.0 * ch.noise(ch.size / ch.px / (0.25 * s) + 2)))
        haze = np.exp(-d2 / np.float32(2 * (0.56 * s) ** 2)) * (0.35 + 0.65 * patch) * ch.lung
        dense = np.exp(-d2 / np.float32(2 * (0.2 * s) ** 2)) * ch.lung
        haze = haze / max(float(haze.max()), 1e-6)
        out.append(_add(ch, f.amp, dense, 0.45, haze, f.core))
    return out


def pneumonia(ch, name="Pneumonia", bronchograms=0.6):
    """Consolidation: a dense confluent core, sometimes with dark branching air bronchograms,
    inside a ground-glass fringe."""
    rng, taken, out = ch.rng, [], []
    for f in _forms(ch, "Pneumonia", 0.35, 0.55, None if name == "Pneumonia" else 1):
        r = f.side / 2 * 1.12
        cx, cy = ch.place(r, taken, margin=0.3 * r)
        d, rt = _lobulated(ch, cx, cy, r, ((2, 0.1), (3, 0.08), (5, 0.05)))
        core = smoothstep(rng.uniform(0.5, 0.65) * rt - d, 0.3 * r) * ch.lung
        fringe = smoothstep(rt - d, 0.35 * r) * ch.lung
        texture = 0.85 + 0.15 * ch.noise(ch.size / ch.px / (0.3 * r) + 2)
        lesion = _add(ch, f.amp, core * texture, 0.3, fringe, f.core)
        if rng.random() < bronchograms:
            th = np.arctan2(ch.y - np.float32(cy - 1.5 * r), ch.x - np.float32(cx))
            n = np.sin(np.float32(rng.uniform(8, 14)) * th + 0.3 * ch.noise(8))
            ch.extra -= 0.6 * f.amp * f.core * np.exp(-(n / 0.2) ** 2) * smoothstep(core - 0.8, 0.2)
        out.append(lesion)
    return out


def pneumothorax(ch):
    """Air outside the lung: a region without lung markings between the chest wall and a thin
    bright pleural line, widest at its top (the apex, or high on the lateral wall) and
    thinning down the wall."""
    rng, out = ch.rng, []
    for side, f in _sides(ch, "Pneumothorax", 0.25, 0.4):
        s, strength = f.side, f.strength
        on_side = (ch.x >= 0) if side else (ch.x < 0)
        apical = rng.random() < 0.6
        top = ch.apex_y if apical else ch.apex_y + rng.uniform(0.15, 0.5)
        drop = rng.uniform(0.3, 0.45) * s * strength if apical else 0.0
        reach = top + rng.uniform(0.9, 1.3) * s                           # rim's lower end
        taper = np.clip((reach - ch.y) / (reach - top), 0, 1)            # 1 at top, 0 at reach
        wall_in = np.float32(max(rng.uniform(0.1, 0.16) * s * strength, ch.units(1.5))) * taper
        shrunk = ch.lung_depth(ch.x, ch.y, drop, wall_in)
        window = smoothstep(reach - ch.y, 0.05) * smoothstep(ch.y - top, 0.05) * ch.lung * on_side
        region = window * smoothstep(-shrunk, ch.units(1.5))
        cap = region * smoothstep(top + 0.25 * (reach - top) - ch.y, 0.06)     # the wide top
        ch.clear = np.maximum(ch.clear, region)
        ch.extra -= 0.18 * region                                      # no lung tissue: darker
        line = np.exp(-(shrunk / np.float32(ch.units(1.0))) ** 2) * window
        ch.extra += f.amp * line
        out.append(Lesion(cap > 0.5, region > 0.5))
    return out


def cardiomegaly(ch):
    """Chest draws the heart with an enlarged left ventricle; the grown border is the core,
    the whole heart shadow the box."""
    return [Lesion((ch.heart_shape > 0.5) & (ch.normal_heart < 0.5), ch.heart_shape > 0.5)]


def edema(ch):
    """Bilateral perihilar haze ("bat wing")."""
    q = np.abs(ch.x)
    hy = float(ch.peak.mean()) - 0.4
    haze = np.exp(-((q - 0.22) / 0.2) ** 2 - ((ch.y - hy) / 0.3) ** 2)
    ch.extra += ch.rng.uniform(0.3, 0.45) * haze * (0.7 + 0.3 * ch.noise(12)) * ch.lung


def fibrosis(ch):
    """Reticular lines, peripheral and basal."""
    n = ch.noise(ch.size / ch.px / 0.05)
    lines = np.exp(-(n / 0.3) ** 2)
    depth = ch.lung_depth(ch.x, ch.y)
    where = np.exp(-np.maximum(depth, 0) / 0.1) * np.clip((ch.y - ch.apex_y) / 1.0, 0, 1)
    ch.extra += ch.rng.uniform(0.25, 0.35) * lines * where * ch.lung


def pleural_thickening(ch):
    """A bright band along the lateral chest wall (or an apical cap)."""
    t = ch.rng.uniform(0.03, 0.06)
    inner = ch.lung_depth(ch.x, ch.y, t, t)
    side = (ch.x >= 0) if ch.rng.random() < 0.5 else (ch.x < 0)
    band = ch.lung * smoothstep(-inner, 0.015) * side
    ch.extra += ch.rng.uniform(0.4, 0.55) * band


def hernia(ch):
    """A rounded retrocardiac density with a gas bubble and an air-fluid level."""
    rng = ch.rng
    r = rng.uniform(0.1, 0.15)
    cx, cy = rng.uniform(-0.02, 0.12), float(ch.peak.mean()) - rng.uniform(0.0, 0.08)
    d = np.hypot(ch.x - np.float32(cx), ch.y - np.float32(cy))
    ch.extra += rng.uniform(0.25, 0.35) * smoothstep(r - d, 0.03)
    top = np.hypot(ch.x - np.float32(cx), ch.y - np.float32(cy - 0.3 * r))
    bubble = smoothstep(0.45 * r - top, 0.02)
    ch.extra -= 0.4 * bubble * smoothstep(cy - 0.3 * r - ch.y, 0.01)


def emphysema(ch):
    """Drawn by Chest: darker lungs, low flat domes; markings thin out in `draw`."""


def consolidation(ch):
    pneumonia(ch, "Consolidation", bronchograms=0.3)


SIGNS = {"Atelectasis": atelectasis, "Cardiomegaly": cardiomegaly, "Effusion": effusion,
         "Infiltration": infiltration, "Mass": mass, "Nodule": nodule, "Pneumonia": pneumonia,
         "Pneumothorax": pneumothorax, "Consolidation": consolidation, "Edema": edema,
         "Emphysema": emphysema, "Fibrosis": fibrosis, "Pleural_Thickening": pleural_thickening,
         "Hernia": hernia}


def draw(rng, size, labels, view, scenario="v2", sibling_rng=None):
    """One radiograph -> Drawn(image uint8 (S, S), boxes [(class index, (x, y, w, h))] of the
    box classes, cores [boolean (S, S)] the conspicuous part of each boxed lesion, chest
    boolean (S, S) the cavity: lungs, mediastinum, heart; kinds ["A" or "B"] of the boxes).

    scenario: v2, or one of the positive control's (sibling.py), whose lesions B are drawn
    from sibling_rng; v2 boxes every lesion as an A."""
    names = [CLASSES[i] for i in np.flatnonzero(labels)]
    alone = scenario == "sibling-alone"
    ch = Chest(rng, size, view, "Emphysema" in names, "Cardiomegaly" in names and not alone,
               one_lesion=scenario != "v2")
    a, marks = ch.anatomy()
    boxes, cores, kinds, beside_heart = [], [], [], ch.heart_shape < 0.5

    def keep(c, lesion, kind):
        # Box what shows: the part of a lesion behind the heart shadow is all but invisible.
        shown = lesion.extent if CLASSES[c] == "Cardiomegaly" else lesion.extent & beside_heart
        box = box_of(shown) or box_of(lesion.extent)
        if box is not None:
            boxes.append((c, box))
            cores.append(lesion.core)
            kinds.append(kind)
    for name in names:
        if alone and name in BOX_CLASSES:
            continue                                 # B stands alone for the box classes
        for lesion in SIGNS[name](ch) or ():
            keep(CLASSES.index(name), lesion, "A")
    if scenario != "v2":
        for c, disk in siblings(sibling_rng, ch, labels, list(boxes), alone):
            keep(c, Lesion(disk, disk), "B")
    a += marks * (1 - ch.clear) + ch.extra
    film = 1 - np.exp(-1.6 * np.maximum(a, 0))                           # (S, S)
    film = np.clip(film / 0.92, 0, 1) ** np.float32(rng.uniform(0.8, 1.25))
    film = film * np.float32(rng.uniform(0.85, 1.05)) + np.float32(rng.uniform(-0.04, 0.05))
    film = ndimage.gaussian_filter(film, max(0.4, 0.6 * size / 256))
    film += np.float32(rng.uniform(0.006, 0.02)) * rng.standard_normal(film.shape, np.float32)
    return Drawn((np.clip(film, 0, 1) * 255 + 0.5).astype(np.uint8), boxes, cores, ch.chest, kinds)
