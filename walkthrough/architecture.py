"""The walkthrough's architecture diagram, after Fig. 1 of the paper: ResNet-MSA, the C branches of
attention mining with their erasure masks, and knowledge preservation between N_A and N_B.

Drawn with Pillow alone, in its own font, so the text is ASCII: `*` is the element-wise product
(the paper's circled dot), `M^c` the mask M-hat^c replicated over the channels. Sizes are the
paper preset's at S = 512; convolutions read (filters, kernel, stride), as in the paper's figure.
"""
import numpy as np
from PIL import Image, ImageDraw

from minimal_amkp.run.figures import font, text_width

INK = (20, 20, 20)
GRADIENT = (200, 30, 30)                    # the paper's red arrows: where back-propagation goes
MUTED = (110, 110, 110)
FILLS = {"net": (222, 230, 242), "msa": (220, 238, 220), "am": (250, 232, 210), "kp": (234, 222, 244),
         "loss": (255, 246, 200), "frozen": (228, 228, 228)}
PAD, LINE = 8, 17                           # box padding and line height, pixels


class Diagram:
    """A white canvas with boxes of centred text, frames around groups, and arrows."""

    def __init__(self, width, height, size=14):
        self.im = Image.new("RGB", (width, height), (255, 255, 255))
        self.pen = ImageDraw.Draw(self.im)
        self.face, self.bold = font(size), font(size + 2)

    def box(self, x, y, text, fill, width=None, ink=INK):
        """A box with its top-left corner at (x, y) around the lines of text -> (left, top, right, bottom)."""
        lines = text.split("\n")
        w = width or max(int(text_width(s, self.face)) for s in lines) + 2 * PAD
        h = LINE * len(lines) + 2 * PAD - 4
        self.pen.rounded_rectangle([x, y, x + w, y + h], radius=6, fill=fill, outline=ink, width=1)
        for j, s in enumerate(lines):
            self.pen.text((x + (w - text_width(s, self.face)) / 2, y + PAD - 2 + j * LINE), s, fill=ink,
                          font=self.face)
        return x, y, x + w, y + h

    def frame(self, left, top, right, bottom, label, colour, right_label=False):
        self.pen.rounded_rectangle([left, top, right, bottom], radius=10, outline=colour, width=2)
        x = right - 10 - text_width(label, self.bold) if right_label else left + 10
        self.pen.text((x, top + 6), label, fill=colour, font=self.bold)

    def text(self, x, y, s, ink=INK):
        self.pen.text((x, y), s, fill=ink, font=self.face)

    def arrow(self, points, colour=INK, width=2, dashed=False):
        """A polyline through points, with a head at the last one."""
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            if dashed:
                n = max(1, int(np.hypot(x1 - x0, y1 - y0) // 8))
                for k in range(0, n, 2):
                    a, b = k / n, min(1.0, (k + 1) / n)
                    self.pen.line([x0 + a * (x1 - x0), y0 + a * (y1 - y0), x0 + b * (x1 - x0), y0 + b * (y1 - y0)],
                                  fill=colour, width=width)
            else:
                self.pen.line([x0, y0, x1, y1], fill=colour, width=width)
        (x0, y0), (x1, y1) = points[-2], points[-1]
        d = np.array([x1 - x0, y1 - y0], float)
        d /= np.linalg.norm(d)
        n = np.array([-d[1], d[0]])
        tip = np.array([x1, y1], float)
        head = [tuple(tip), tuple(tip - 10 * d + 5 * n), tuple(tip - 10 * d - 5 * n)]
        self.pen.polygon(head, fill=colour)


def mid(b, side):
    """The middle of a box's side: "l", "r", "t" or "b"."""
    left, top, right, bottom = b
    return {"l": (left, (top + bottom) / 2), "r": (right, (top + bottom) / 2),
            "t": ((left + right) / 2, top), "b": ((left + right) / 2, bottom)}[side]


def architecture_figure():
    """uint8 (H, W, 3): the diagram."""
    d = Diagram(1180, 930)
    d.pen.text((16, 12), "ResNet-MSA with attention mining (AM) and knowledge preservation (KP), after Fig. 1 "
                         "of Cai et al. (paper preset, S = 512)", fill=INK, font=d.bold)

    # N_B: the backbone, then MSA's two paths (Sec. 2.3).
    d.frame(12, 44, 1168, 360, "N_B: ResNet-MSA, fine-tuned by AM (N_A: a frozen copy, below)", (60, 90, 150))
    img = d.box(28, 84, "N chest X-rays\nS x S", FILLS["net"])
    stem = d.box(img[2] + 34, 84, "ResNet-50\nstem, layer1, layer2", FILLS["net"])
    l3 = d.box(stem[2] + 34, 84, "layer3 -> X_{k-1}\n1024 ch, S/16 (32 x 32)", FILLS["net"])
    l4 = d.box(l3[2] + 34, 84, "layer4 -> X_k\n2048 ch, S/32 (16 x 16)", FILLS["net"])
    for a, b in ((img, stem), (stem, l3), (l3, l4)):
        d.arrow([mid(a, "r"), mid(b, "l")])

    d.frame(l3[0] - 20, 150, 1150, 350, "MSA (Sec. 2.3)", (50, 130, 60), right_label=True)
    c3 = d.box(l3[0] + 20, 190, "conv (256, 1, 1)\n+ BN + ReLU *", FILLS["msa"], width=l3[2] - l3[0] - 40)
    c4 = d.box(l4[0] + 10, 190, "conv (512, 1, 1)\n+ BN + ReLU *", FILLS["msa"])
    up = d.box(c4[2] + 30, 190, "bilinear x2\n(or 3x3 deconv)", FILLS["msa"])
    cat = d.box(c3[0] + 60, 290, "concatenate: X = [X-bar_k, X-bar_{k-1}]\n768 ch, S/16 (32 x 32)",
                FILLS["msa"])
    d.arrow([mid(l3, "b"), mid(c3, "t")])
    d.arrow([(mid(l4, "b")[0], l4[3]), (mid(l4, "b")[0], 170), (mid(c4, "t")[0], 170), mid(c4, "t")])
    d.arrow([mid(c4, "r"), mid(up, "l")])
    d.arrow([mid(c3, "b"), (mid(c3, "b")[0], cat[1])])
    d.arrow([mid(up, "b"), (mid(up, "b")[0], 270), (cat[2] - 40, 270), (cat[2] - 40, cat[1])])
    d.text(mid(c3, "b")[0] + 6, c3[3] + 6, "X-bar_{k-1}: 256 ch", MUTED)
    d.text(mid(up, "b")[0] - 150, up[3] + 6, "X-bar_k: 512 ch, S/16", MUTED)
    d.text(28, 196, "* BN + ReLU after each 1x1 conv:", MUTED)
    d.text(28, 214, "   this project adds them (X >= 0,", MUTED)
    d.text(28, 232, "   so erasing removes evidence)", MUTED)

    # AM: C branches, each erasing X with its own mask (Sec. 2.1), and the masks' update (Sec. 3.2).
    d.frame(12, 374, 1168, 640, "AM (Sec. 2.1, 3.2): C branches, one erasure mask each; the N - n whole images keep M^c = 1", (190, 110, 20))
    x_in = d.box(28, 476, "X\n768 ch", FILLS["msa"])
    rows = []
    for k, (name, y) in enumerate((("c = 1", 420), ("c = 2", 474), ("c = C", 540))):
        erase = d.box(140, y, f"X * M^c   (1)   [{name}]", FILLS["am"], width=210)
        gap = d.box(erase[2] + 30, y, "g: global average pool", FILLS["am"], width=190)
        head = d.box(gap[2] + 30, y, "w_c, sigmoid -> L_c   (2)", FILLS["am"], width=200)
        d.arrow([mid(erase, "r"), mid(gap, "l")])
        d.arrow([mid(gap, "r"), mid(head, "l")])
        d.arrow([mid(x_in, "r"), (118, mid(x_in, "r")[1]), (118, mid(erase, "l")[1]), mid(erase, "l")])
        rows.append((erase, head))
    d.text(236, 513, ". . .", MUTED)
    d.text(696, 513, ". . .", MUTED)
    cls = d.box(890, 472, "L_cls = mean over c\nof L_c   (3)", FILLS["loss"])
    for _, head in rows:
        d.arrow([mid(head, "r"), (870, mid(head, "r")[1]), (870, mid(cls, "l")[1]), mid(cls, "l")])
    d.arrow([(mid(cat, "b")[0], cat[3]), (mid(cat, "b")[0], 362), (60, 362), mid(x_in, "t")])

    upd = d.box(140, 600, "normalise, >= 0.5, erase the peak's component -> M^c_t", FILLS["am"])
    cam = d.box(560, 600, "CAM  H^c_t = (X * M^c_{t-1}) w_c   (7)", FILLS["am"])
    d.arrow([mid(cam, "l"), mid(upd, "r")])
    d.arrow([(mid(rows[-1][1], "b")[0], rows[-1][1][3]), (mid(rows[-1][1], "b")[0], cam[1])], colour=MUTED)
    d.arrow([(245, upd[1]), (245, rows[-1][0][3])], colour=MUTED, dashed=True)
    d.text(255, 578, "next round's mask", MUTED)
    d.text(cam[2] + 14, 598, "H_f (8): the rounds fused,", MUTED)
    d.text(cam[2] + 14, 614, "then boxes (Sec. 3.2)", MUTED)

    # KP: N_A beside N_B on the N - n whole images of each minibatch (Sec. 2.2).
    d.frame(12, 654, 1168, 918, "KP (Sec. 2.2): the N - n whole images of each minibatch through both networks",
            (120, 70, 160))
    na = d.box(28, 700, "N_A: frozen copy taken\nbefore mining (no gradient)", FILLS["frozen"])
    nb = d.box(28, 790, "N_B: the network above\n(trained)", FILLS["net"])
    layers = []
    for k, name in enumerate(("layer3", "layer4", "MSA output X", "logits")):
        b = d.box(300 + 150 * k, 746, f"{name}\nL_k   (4)", FILLS["kp"], width=136)
        d.arrow([(na[2], mid(na, "r")[1]), (mid(b, "t")[0], mid(na, "r")[1]), mid(b, "t")], colour=MUTED)
        d.arrow([mid(b, "b"), (mid(b, "b")[0], mid(nb, "r")[1]), (nb[2], mid(nb, "r")[1])], colour=GRADIENT)
        layers.append(b)
    d.text(300, 700, "k in K: outputs of both networks", MUTED)
    kp = d.box(930, 700, "L_KP = mean over K\nof L_k   (5)", FILLS["loss"])
    total = d.box(930, 790, "L = L_cls + lambda L_KP   (6)\nlambda = 0.5", FILLS["loss"])
    d.arrow([mid(layers[-1], "r"), (910, mid(layers[-1], "r")[1]), (910, mid(kp, "l")[1]), mid(kp, "l")])
    d.arrow([mid(kp, "b"), mid(total, "t")])
    d.arrow([mid(cls, "r"), (1150, mid(cls, "r")[1]), (1150, mid(total, "r")[1]), mid(total, "r")])
    d.text(300, 858, "L_k = || g(X_A(k)) - g(X_B(k)) ||^2 / (N - n):  the paper prints the l2 distance, "
                     "this project uses its square", INK)
    d.text(300, 880, "red: the gradient of L reaches N_B only", GRADIENT)
    return np.asarray(d.im)
