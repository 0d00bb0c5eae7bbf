"""The phantom's anatomy: one image's pixel grid in a chest frame, lungs, heart, bones.

Geometry lives in a chest frame: x runs from the patient's right (-) to left (+), which on a
PA film is the viewer's left to right; y runs down; the thorax spans about [-0.75, 0.75] x
[-0.8, 0.6]. Each image maps that frame onto its pixels through its own scale, shift and small
rotation, so no finding sits at a fixed pixel. Densities add in attenuation units (air 0,
soft tissue 1); the film is 1 - exp(-k A) with per-image contrast, gamma, blur and noise.
film.py adds the findings on top and composes the film.
"""
import numpy as np
from PIL import Image


# Facts file: box side (square of equal area) in 1024-px units, (median, min, max).
BOX_SIDE = {"Nodule": (69, 29, 136), "Mass": (124, 48, 613), "Atelectasis": (141, 46, 446),
            "Pneumothorax": (195, 37, 465), "Effusion": (242, 42, 527),
            "Infiltration": (244, 90, 680), "Pneumonia": (246, 97, 764),
            "Cardiomegaly": (424, 323, 559)}
# P(1, 2, 3 lesions of the class in one image): attention mining needs 2nd and 3rd regions.
COUNT_P = {"Nodule": (.55, .3, .15), "Mass": (.7, .25, .05), "Atelectasis": (.6, .32, .08),
           "Effusion": (.65, .35, 0), "Infiltration": (.45, .37, .18),
           "Pneumonia": (.7, .25, .05), "Pneumothorax": (.85, .15, 0)}


def smoothstep(d, edge):
    """0 -> 1 as d crosses [-edge/2, edge/2]; d > 0 is inside."""
    t = np.clip(d / edge + 0.5, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def box_of(support):
    """Tight (x, y, w, h) of a boolean (S, S) support, in pixels; None when it is empty."""
    rows, cols = np.flatnonzero(support.any(1)), np.flatnonzero(support.any(0))
    if rows.size == 0:
        return None
    return (float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1),
            float(rows[-1] - rows[0] + 1))


def _f32(a, b, left):
    """Per-pixel choice of a (patient's right, x < 0) or b (left), kept float32."""
    return np.where(left, np.float32(b), np.float32(a))


class Chest:
    """One image: its pixel grid in the chest frame, its anatomy and its accumulated findings.

    Anatomy is smooth, so it is drawn on a half-resolution grid and upsampled; findings are
    drawn at full resolution so small nodules keep their edges.
    """

    def __init__(self, rng, size, view, emphysema=False, cardiomegaly=False, one_lesion=False):
        self.rng, self.size = rng, size
        self.one_lesion = one_lesion       # the positive control: one lesion (its A) a class
        sc, th = rng.uniform(0.84, 0.97), rng.uniform(-0.05, 0.05)
        self.affine = (np.cos(th) / sc, np.sin(th) / sc, rng.uniform(-0.05, 0.05),
                       rng.uniform(-0.01, 0.07))
        self.x, self.y = self.grid(size)                                   # (S, S) each
        self.coarse = size // 2 if size >= 128 else size
        self.px = sc * size / 2.0                                          # pixels per unit
        self.apex_y, self.apex_x = rng.uniform(-0.8, -0.7), rng.uniform(0.33, 0.38)
        self.lat_w = np.array([0.42, 0.39]) * rng.uniform(0.93, 1.06)     # right lung wider
        self.med_w = self.apex_x - rng.uniform(0.07, 0.1)
        self.peak = rng.uniform(0.28, 0.4) + np.array([0.0, rng.uniform(0.03, 0.08)])
        self.dome_k = np.full(2, rng.uniform(0.13, 0.2))
        self.emphysema = emphysema
        if emphysema:                      # hyperinflation: low, flattened domes
            self.peak += 0.1
            self.dome_k *= 0.3
        # An AP film (source in front, film behind) magnifies the heart.
        magnify = 1.08 if view == "AP" else 1.0
        # An enlarged heart is large all over before its ventricle bulges.
        ctr = rng.uniform(0.5, 0.57) if cardiomegaly else rng.uniform(0.38, 0.48)
        self.heart_ellipse = self._heart_params(ctr * magnify)
        # Cardiomegaly grows the heart border, mostly the left ventricle: down and out to the
        # patient's left, to a cardiothoracic ratio above 0.5 (facts file).
        self.bulge = self._bulge_params(rng.uniform(0.55, 0.68) * magnify) if cardiomegaly else None
        self.extra = np.zeros((size, size), np.float32)  # findings' added density
        self.clear = np.zeros((size, size), np.float32)  # where lung markings vanish

    def grid(self, n):
        """Chest-frame coordinates (x, y) of the centres of an n x n pixel grid."""
        c, s, tx, ty = self.affine
        u = (np.arange(n, dtype=np.float32) + 0.5) * np.float32(2.0 / n) - 1.0
        uu, vv = np.meshgrid(u - np.float32(tx), u - np.float32(ty))
        c, s = np.float32(c), np.float32(s)
        return c * uu + s * vv, c * vv - s * uu

    def up(self, a):
        if a.shape[0] == self.size:
            return a
        return np.array(Image.fromarray(a).resize((self.size, self.size),
                                                  Image.Resampling.BICUBIC))

    def units(self, pixels):
        return pixels / self.px

    def dome(self, x):
        left = x >= 0
        t = (np.abs(x) - self.apex_x) / 0.34
        return _f32(*self.peak, left) + _f32(*self.dome_k, left) * t * t

    def lung_depth(self, x, y, drop=0.0, wall_in=0.0):
        """Signed distance-like depth inside the lung fields (> 0 inside), chest units.

        Each lung widens from a rounded apex to the costophrenic angle (lateral wall a quarter
        ellipse, medial border straightening quickly along the mediastinum) and is cut below
        by its diaphragm dome. drop lowers the apex and wall_in moves the lateral wall inward:
        the collapsed lung of a pneumothorax, a thickened pleura.
        """
        left, q = x >= 0, np.abs(x)
        lat_w = _f32(*self.lat_w, left)
        base = self.dome(self.apex_x + lat_w)
        top = self.apex_y + drop
        t = np.clip((y - top) / (base - top), 0.0, 1.0)
        lateral = np.sqrt(1.0 - (1.0 - t) ** 3)
        medial = np.sqrt(1.0 - (1.0 - t) ** 6)
        return np.minimum.reduce([self.apex_x + (lat_w - wall_in) * lateral - q,
                                  q - (self.apex_x - self.med_w * medial),
                                  self.dome(x) - y, y - top])

    def noise(self, cells, n=None):
        """Smooth unit-variance noise (n, n): white noise on a cells x cells grid, upsampled."""
        n = n or self.size
        cells = max(2, min(int(cells), n))
        white = self.rng.standard_normal((cells, cells), dtype=np.float32)
        up = np.asarray(Image.fromarray(white).resize((n, n), Image.Resampling.BICUBIC))
        return up / max(float(up.std()), 1e-6)

    def side_units(self, name):
        """A lesion size drawn around the release's median, in chest units."""
        med, lo, hi = BOX_SIDE[name]
        side = np.clip(med * np.exp(self.rng.normal(0.0, 0.35)), lo, hi) * self.size / 1024.0
        return self.units(max(side, 3.0))

    def place(self, radius, taken, weight=None, margin=None):
        """A lesion centre inside a lung field, clear of same-class lesions already placed."""
        rng = self.rng
        cx = rng.uniform(-0.75, 0.75, 400)
        cy = rng.uniform(self.apex_y, float(self.peak.max()) + 0.12, 400)
        # Lesions hidden behind the heart are all but invisible on a sketch; keep them clear.
        depth = np.where(self.heart(cx, cy) > 0.2, -1.0, self.lung_depth(cx, cy))
        margin = 0.8 * radius if margin is None else margin
        w = np.ones_like(cx) if weight is None else weight(cx, cy)
        for relax in (1.0, 0.5, 0.0):
            ok = depth > min(margin * relax, 0.12)
            for x0, y0, r0 in taken:
                ok &= np.hypot(cx - x0, cy - y0) > relax * 1.15 * (radius + r0)
            if ok.any():
                i = rng.choice(np.flatnonzero(ok), p=w[ok] / w[ok].sum())
                taken.append((cx[i], cy[i], radius))
                return float(cx[i]), float(cy[i])
        i = int(np.argmax(depth))
        return float(cx[i]), float(cy[i])

    def count(self, name):
        """How many lesions of a class to draw. The count is drawn even when one_lesion caps it,
        so that an image whose classes all have one lesion is drawn as without the cap."""
        n = int(self.rng.choice(3, p=COUNT_P[name])) + 1
        return 1 if self.one_lesion else n

    def _heart_params(self, ctr):
        """An ellipse tilted toward the left whose widest width over the inner chest width is
        the cardiothoracic ratio ctr: (cx, cy, a, b, phi)."""
        chest_w = 2 * self.apex_x + self.lat_w.sum()
        phi, ratio = self.rng.uniform(0.45, 0.7), self.rng.uniform(0.7, 0.8)
        half = ctr * chest_w / 2
        a = half / np.sqrt(np.cos(phi) ** 2 + (ratio * np.sin(phi)) ** 2)
        cx = half - ctr * chest_w * self.rng.uniform(0.3, 0.36)           # 2/3 lies left
        return cx, float(self.peak.mean()) + 0.08 - 0.8 * ratio * a, a, ratio * a, phi

    def _bulge_params(self, ctr):
        """The enlarged left ventricle: an ellipse on the heart's lower left border whose outer
        edge brings the widest heart width to ctr of the inner chest width."""
        cx, cy, a, b, phi = self.heart_ellipse
        chest_w = 2 * self.apex_x + self.lat_w.sum()
        left = cx + np.sqrt((a * np.cos(phi)) ** 2 + (b * np.sin(phi)) ** 2)   # normal border
        grow = max(ctr * chest_w - 2 * (left - cx), 0.0)                     # added width
        ab, bb = 0.45 * a + 0.5 * grow, 0.85 * b
        return left + grow - ab, cy + 0.35 * b, ab, bb, phi

    @staticmethod
    def _ellipse(x, y, params):
        cx, cy, a, b, phi = params
        dx, dy = x - np.float32(cx), y - np.float32(cy)
        u = (np.float32(np.cos(phi)) * dx + np.float32(np.sin(phi)) * dy) / np.float32(a)
        v = (np.float32(np.cos(phi)) * dy - np.float32(np.sin(phi)) * dx) / np.float32(b)
        return smoothstep(1.0 - np.sqrt(u * u + v * v), 0.08)

    def heart(self, x, y, bulge=True):
        """Heart shadow in [0, 1]: the ellipse (and an enlarged ventricle) cut by the domes
        and kept inside the chest wall, which even a large heart does not pass."""
        shape = self._ellipse(x, y, self.heart_ellipse)
        if bulge and self.bulge is not None:
            shape = np.maximum(shape, self._ellipse(x, y, self.bulge))
        return shape * smoothstep(self.dome(x) + 0.02 - y, 0.03) * smoothstep(self.cavity(x, y) - 0.01, 0.02)

    def cavity(self, x, y):
        """The chest inside the ribs: both lungs, the mediastinum between them and the heart,
        from the apices down to the domes (> 0 inside). What a localiser should point into."""
        left, q = x >= 0, np.abs(x)
        lat_w = _f32(*self.lat_w, left)
        base = self.dome(self.apex_x + lat_w)
        t = np.clip((y - self.apex_y) / (base - self.apex_y), 0.0, 1.0)
        lateral = self.apex_x + lat_w * np.sqrt(1.0 - (1.0 - t) ** 3)
        return np.minimum.reduce([lateral - q, self.dome(x) + 0.02 - y, y - self.apex_y + 0.02])

    def anatomy(self):
        """Attenuation (S, S) of body, lungs, heart, mediastinum, spine, ribs, clavicles and
        the lung markings (returned apart: a pneumothorax erases them). Sets self.lung,
        self.heart_shape, self.normal_heart (without cardiomegaly's growth), (S, S) in [0, 1],
        and self.chest, the boolean (S, S) cavity."""
        rng = self.rng
        x, y = self.grid(self.coarse)                                      # (s, s) each
        q, left = np.abs(x), x >= 0
        lung = smoothstep(self.lung_depth(x, y), 0.03)
        bw = 0.93 + 0.05 * (1.0 - ((y - 0.1) / 1.1) ** 2)
        # Tissue is thinner toward the body's edge, so the film darkens there.
        thick = 0.7 + 0.3 * np.sqrt(np.clip(1.0 - (q / bw) ** 2, 0.0, 1.0))
        a = smoothstep(bw - q, 0.06) * thick * (1.0 + 0.06 * self.noise(6, self.coarse))
        air = 0.86 if self.emphysema else 0.78
        a -= air * lung
        heart = self.heart(x, y)
        a += heart * (air * lung + 0.06)                    # the heart replaces lung air
        knob = np.hypot(x - np.float32(self.apex_x - self.med_w - 0.01), y + 0.3)
        a += 0.7 * smoothstep(0.06 - knob, 0.02) * lung      # aortic knob bulges the border
        a -= 0.25 * smoothstep(0.028 - q, 0.02) * smoothstep(-0.22 - y, 0.06)     # trachea
        disc = smoothstep(np.cos(y * np.float32(2 * np.pi / rng.uniform(0.085, 0.1))) + 0.8, 0.3)
        a += 0.2 * smoothstep(0.07 - q, 0.025) * (0.7 + 0.3 * disc)         # spine
        edge = self.apex_x + _f32(*self.lat_w, left)
        cage = (smoothstep(edge + 0.05 - q, 0.05) * smoothstep(q - 0.07, 0.06)
                * smoothstep(self.dome(x) + 0.1 - y, 0.1)
                * smoothstep(y - self.apex_y + 0.12, 0.06))
        step, wobble = rng.uniform(0.105, 0.125), 0.012 * self.noise(5, self.coarse)
        for amp, v in ((0.11, y - 0.9 * (q - 0.3) ** 2 + wobble),  # posterior ribs
                       (0.04, y - 0.38 * (edge - q))):                      # anterior ribs
            phase = (v - self.apex_y) / np.float32(step) + np.float32(rng.uniform(0, 1))
            rib = np.sqrt(np.maximum(np.sin(np.pi * np.minimum((phase % 1.0) / 0.45, 1.0)), 0))
            a += amp * rib * cage * (0.5 + 0.5 * lung)
        yc = self.apex_y + 0.12 - 0.25 * (q - 0.06) + 0.04 * np.sin(np.pi * (q - 0.06) / 0.5)
        a += (0.3 * np.exp(-((y - yc) / 0.028) ** 2) * smoothstep(q - 0.07, 0.03)
              * smoothstep(0.6 - q, 0.06))                                  # clavicles
        # Vessel markings: curving lines radiating from each hilum, fading outward.
        hilum_y = float(self.peak.mean()) - rng.uniform(0.4, 0.48)
        dx, dy = q - np.float32(0.19), y - np.float32(hilum_y)
        r, th = np.hypot(dx, dy), np.arctan2(dy, dx)
        n = 0.7 * self.noise(12, self.coarse)
        for f in rng.uniform(5.0, 13.0, 3):
            n += np.sin(np.float32(f) * th + np.float32(rng.uniform(-4, 4)) * r
                        + np.float32(rng.uniform(0, 2 * np.pi)))
        lines = np.exp(-(n / (0.25 + 0.2 * r)) ** 2 - r / 0.33)
        marks = (0.2 * lines + 0.25 * np.exp(-((r / 0.08) ** 2))) * lung
        self.lung, self.heart_shape = self.up(lung), self.up(heart)
        self.normal_heart = self.up(self.heart(x, y, bulge=False)) if self.bulge is not None \
            else self.heart_shape
        self.chest = self.up(smoothstep(self.cavity(x, y), 0.01)) > 0.5
        return self.up(a), self.up(marks * (0.5 if self.emphysema else 1.0))
