"""Draw one phantom radiograph: the anatomy of phantom_anatomy plus the signs of its findings.

Each finding adds density (or, for a pneumothorax, removes it and the lung markings) in the
chest frame of its image. A lesion's box is the bounding box of the pixels where its own shape
is above half strength, less what hides behind the heart shadow.
"""
import numpy as np
from scipy import ndimage

from .classes import CLASSES
from .phantom_anatomy import Chest, box_of, smoothstep


def _lobulated(ch, cx, cy, r0, lobes):
    """Distance from (cx, cy) and a lobulated radius r(θ) around it, (S, S) each."""
    dx, dy = ch.x - np.float32(cx), ch.y - np.float32(cy)
    th = np.arctan2(dy, dx)
    r = np.ones_like(th)
    for k, amp in lobes:
        r += np.float32(amp) * np.sin(k * th + np.float32(ch.rng.uniform(0, 2 * np.pi)))
    return np.hypot(dx, dy), np.float32(r0) * r


def _strength(rng, lo, hi, faint=0.2):
    """A lesion's peak density; a share of lesions are faint (half strength)."""
    return rng.uniform(lo, hi) * (0.5 if rng.random() < faint else 1.0)


def nodule(ch):
    """Small round well-defined opacities in the lung fields."""
    taken, out = [], []
    for _ in range(ch.count("Nodule")):
        r = ch.side_units("Nodule") / 2
        cx, cy = ch.place(r, taken)
        d = np.hypot(ch.x - np.float32(cx), ch.y - np.float32(cy))
        shape = smoothstep(r - d, max(0.3 * r, ch.units(1.0)))
        ch.extra += _strength(ch.rng, 0.25, 0.45) * shape * (1.2 - 0.4 * np.minimum(d / r, 1))
        out.append(shape > 0.5)
    return out


def mass(ch):
    """Larger lobulated opacities."""
    taken, out = [], []
    for _ in range(ch.count("Mass")):
        r = ch.side_units("Mass") / 2 / 1.1
        cx, cy = ch.place(r, taken, margin=0.5 * r)
        d, rt = _lobulated(ch, cx, cy, r, ((3, 0.12), (5, 0.07)))
        shape = smoothstep(rt - d, 0.2 * r)
        ch.extra += _strength(ch.rng, 0.3, 0.5, faint=0.1) * shape
        out.append(shape > 0.5)
    return out


def atelectasis(ch):
    """Plate-like streaks or wedge-like bands, mostly basal, within the lung."""
    rng, taken, out = ch.rng, [], []

    def basal(cx, cy):
        return 0.2 + np.clip((cy - ch.apex_y) / (ch.peak.mean() - ch.apex_y), 0, 1) ** 2
    for _ in range(ch.count("Atelectasis")):
        s = ch.side_units("Atelectasis")
        plate = rng.random() < 0.6
        half_len = s * (1.2 if plate else 0.9)
        cx, cy = ch.place(half_len, taken, basal, margin=0.3 * s)
        alpha = rng.uniform(-0.3, 0.3) if plate else rng.uniform(-1.0, 1.0)
        dx, dy = ch.x - np.float32(cx), ch.y - np.float32(cy)
        along = np.float32(np.cos(alpha)) * dx + np.float32(np.sin(alpha)) * dy
        across = np.float32(np.cos(alpha)) * dy - np.float32(np.sin(alpha)) * dx
        if plate:
            thick = max(s * rng.uniform(0.12, 0.2), ch.units(2.0))
            d = np.hypot(np.maximum(np.abs(along) - half_len, 0), across)
            shape = smoothstep(thick / 2 - d, 0.5 * thick)
        else:
            shape = smoothstep(1 - np.hypot(along / half_len, across / (0.4 * half_len)), 0.3)
        shape *= ch.lung
        ch.extra += _strength(rng, 0.3, 0.45) * shape
        out.append(shape > 0.5)
    return out


def _sides(ch, name):
    first = int(ch.rng.integers(2))
    return [first, 1 - first][:ch.count(name)]


def effusion(ch):
    """Basal homogeneous fluid with a meniscus that climbs the lateral wall."""
    rng, out = ch.rng, []
    q = np.abs(ch.x)
    for side in _sides(ch, "Effusion"):
        s = ch.side_units("Effusion")
        on_side = (ch.x >= 0) if side else (ch.x < 0)
        q_lat, q_med = ch.apex_x + ch.lat_w[side], ch.apex_x - ch.med_w
        height = float(np.clip(1.6 * s * s / (q_lat - q_med), ch.units(4.0), 0.9))
        top_lat = float(ch.dome(np.float32(q_lat * (1 if side else -1)))) - height
        top_med = top_lat + 0.6 * height
        u = np.clip((q - q_med) / (q_lat - q_med), 0, 1)
        meniscus = top_med - (top_med - top_lat) * u * u
        # Fluid behind the heart adds nothing visible; left in, it would outshine the heart.
        fluid = smoothstep(ch.y - meniscus, 0.04) * ch.lung * on_side * (1 - ch.heart_shape)
        ch.extra += rng.uniform(0.55, 0.75) * fluid
        out.append(fluid > 0.5)
    return out


def infiltration(ch):
    """Ill-defined patchy hazy opacities, often several."""
    taken, out = [], []
    for _ in range(ch.count("Infiltration")):
        s = ch.side_units("Infiltration")
        cx, cy = ch.place(0.5 * s, taken, margin=0.2 * s)
        d2 = (ch.x - np.float32(cx)) ** 2 + (ch.y - np.float32(cy)) ** 2
        window = np.exp(-d2 / np.float32(2 * (0.55 * s) ** 2))
        patch = 1 / (1 + np.exp(-2.0 * ch.noise(ch.size / ch.px / (0.25 * s) + 2)))
        shape = window * (0.3 + 0.7 * patch) * ch.lung
        ch.extra += _strength(ch.rng, 0.18, 0.32) * shape
        out.append(shape > 0.5 * shape.max())
    return out


def pneumonia(ch, name="Pneumonia", bronchograms=0.6):
    """Denser confluent consolidation, sometimes with dark branching air bronchograms."""
    rng, taken, out = ch.rng, [], []
    for _ in range(ch.count(name) if name == "Pneumonia" else 1):
        s = ch.side_units("Pneumonia")
        r = s / 2
        cx, cy = ch.place(r, taken, margin=0.3 * r)
        d, rt = _lobulated(ch, cx, cy, r, ((2, 0.1), (3, 0.08), (5, 0.05)))
        shape = smoothstep(rt - d, 0.45 * r) * ch.lung
        amp = _strength(rng, 0.35, 0.55, faint=0.1)
        texture = 0.85 + 0.15 * ch.noise(ch.size / ch.px / (0.3 * r) + 2)
        ch.extra += amp * shape * texture
        if rng.random() < bronchograms:
            th = np.arctan2(ch.y - np.float32(cy - 1.5 * r), ch.x - np.float32(cx))
            n = np.sin(np.float32(rng.uniform(8, 14)) * th + 0.3 * ch.noise(8))
            ch.extra -= 0.6 * amp * np.exp(-(n / 0.2) ** 2) * smoothstep(shape - 0.8, 0.2)
        out.append(shape > 0.5)
    return out


def pneumothorax(ch):
    """Air outside the lung, apical or lateral: no markings, darker, a thin bright pleural line."""
    rng, out = ch.rng, []
    for side in _sides(ch, "Pneumothorax"):
        s = ch.side_units("Pneumothorax")
        on_side = (ch.x >= 0) if side else (ch.x < 0)
        if rng.random() < 0.55:                                           # apical
            drop, wall_in = 0.36 * s, 0.16 * s
            window = smoothstep(ch.apex_y + 0.9 * s - ch.y, 0.1)
        else:                                                             # lateral
            drop, wall_in = 0.08 * s, 0.24 * s
            y0 = ch.apex_y + rng.uniform(0.1, 0.4)
            window = smoothstep(ch.y - y0, 0.1) * smoothstep(y0 + 1.2 * s - ch.y, 0.1)
        shrunk = ch.lung_depth(ch.x, ch.y, drop, wall_in)
        region = ch.lung * smoothstep(-shrunk, ch.units(1.5)) * window * on_side
        ch.clear = np.maximum(ch.clear, region)
        ch.extra -= 0.1 * region
        line = np.exp(-(shrunk / np.float32(ch.units(1.0))) ** 2) * ch.lung * window * on_side
        ch.extra += rng.uniform(0.25, 0.4) * line
        out.append(region > 0.5)
    return out


def cardiomegaly(ch):
    """The heart is drawn enlarged by Chest (CTR > 0.5); its box is the heart shadow."""
    return [ch.heart_shape > 0.5]


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


def draw(rng, size, labels, view):
    """One radiograph: -> (uint8 (size, size), [(class index, (x, y, w, h))] for box classes)."""
    names = [CLASSES[i] for i in np.flatnonzero(labels)]
    ch = Chest(rng, size, view, "Emphysema" in names, "Cardiomegaly" in names)
    a, marks = ch.anatomy()
    boxes, beside_heart = [], ch.heart_shape < 0.5
    for name in names:
        for support in SIGNS[name](ch) or ():
            # Box what shows: the part of a lesion behind the heart shadow is all but invisible.
            shown = support if name == "Cardiomegaly" else support & beside_heart
            box = box_of(shown) or box_of(support)
            if box is not None:
                boxes.append((CLASSES.index(name), box))
    a += marks * (1 - ch.clear) + ch.extra
    film = 1 - np.exp(-1.6 * np.maximum(a, 0))                           # (S, S)
    film = np.clip(film / 0.92, 0, 1) ** np.float32(rng.uniform(0.8, 1.25))
    film = film * np.float32(rng.uniform(0.85, 1.05)) + np.float32(rng.uniform(-0.04, 0.05))
    film = ndimage.gaussian_filter(film, max(0.4, 0.6 * size / 256))
    film += np.float32(rng.uniform(0.006, 0.02)) * rng.standard_normal(film.shape, np.float32)
    return (np.clip(film, 0, 1) * 255 + 0.5).astype(np.uint8), boxes
