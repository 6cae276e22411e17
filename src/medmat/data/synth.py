"""Med-MAT-mini: a generated stand-in for every classification dataset of Med-MAT, in the public layout.

Why a generated world: the platform must run end to end without downloads or a GPU, and its headline
experiment (train on Related subsets, test on an unseen triplet) only means something if the world has
the structure the paper relies on. So the three MAT elements are drawn as *independent visual factors*:

- **Modality** = global appearance: intensity convention (lesions bright in CT/X-ray, dark in MRI, US
  and OCT; background bright in microscopy), colour vs grey (a two-colour gradient per modality), noise
  (Gaussian or speckle), texture and field of view (round CT/fundus/endoscopy frames, ultrasound fan).
- **Area** = the organ's silhouette, one shape per canonical area.
- **Task label** = a lesion pattern inside the organ (kind x size x position). A label *name* keeps its
  pattern in every subset, so "COVID-19" in CT-Lung-COVID (03) and X-ray-Lung-COVID (28) look alike and
  CT-Cancer + X-ray-COVID -> CT-COVID is learnable.

"Normal" (no lesion) is shared by all tasks, as in the real data. That leaks: a model learns "no lesion
= Normal" from any task, so an Unrelated training mix scores above chance on a target that has a Normal
class. `shared_normal=False` gives every task kind its own negative name ("No COVID", ...) to compare.

`entangled=True` is the negative control: every (modality, area, task, label) - Normal included - gets
its own pattern, never reused, so the target's look is unseen (no Related subset has the target's whole
triplet) and compositional generalisation must fail (Related falls to chance, not below it).

Per-dataset nuisance (contrast, brightness, noise, zoom, shift) makes the datasets of one subset differ a
little, as real ones do. Everything is keyed by (seed, names) through sha256, and PNGs are written with
fixed encoder settings and no metadata, so the same seed gives a byte-identical tree.

`scale="full"` also writes full-scale metadata (about 2.36M records, the public viewer's count) whose
image paths point at the mini images: a benchmark input for ingest/validate, JSON only. (This module
is the world's look; medmat.data.synth_world writes it in the release's file shape.)
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

import numpy as np

SIZE = 64
FULL_RECORDS = 2_360_000  # rows the public Med-MAT viewer counts

# ------------------------------------------------------------------------------------------ labels
# Label sets per classification subset (2-4 for most). Subsets of one task kind share label names;
# different task kinds use distinct names apart from "Normal". Plausible names from the real datasets.
NORMAL = "Normal"
SUBSET_LABELS: dict[int, list[str]] = {
    1: ["Good Quality", "Poor Quality", "Unusable"],                           # Quality
    2: ["Cyst", "Stone", "Kidney Tumor", NORMAL],                              # Kidney Diseases
    3: ["COVID-19", "Pneumonia", NORMAL],                                      # COVID
    4: ["Benign", "Malignant", NORMAL],                                        # Cancer
    5: ["Hemorrhage", NORMAL],                                                 # Hemorrhage
    6: ["Benign", "Malignant", NORMAL],                                        # Cancer
    7: ["Melanoma", "Benign Naevus"],                                          # Melanoma
    8: ["Basal Cell Carcinoma", "Actinic Keratosis", "Dermatofibroma", "Monkeypox"],  # Skin Diseases
    9: ["Caries", "Gingivitis", "Tooth Discoloration", NORMAL],                # Teeth Condition
    10: ["Malignant", NORMAL],                                                 # Cancer
    11: ["Level 0", "Level 1", "Level 2", "Level 3"],                           # Level
    12: ["Low Grade", "High Grade", NORMAL],                                   # Cancer Degree
    13: ["Polyp", "Ulcerative Colitis", "Esophagitis", NORMAL],                # Intestine Diseases
    14: ["Glaucoma", "Cataract", "Macular Degeneration", NORMAL],              # Eye Diseases
    15: ["Glaucoma", "Cataract", "Diabetic Retinopathy", NORMAL],              # Eye Diseases
    16: ["Level 0", "Level 1", "Level 2", "Level 3"],                           # Level
    17: ["Good Quality", "Poor Quality"],                                      # Quality
    18: ["Lymphocyte", "Neutrophil", "Epithelial Cell", "Stromal Cell"],       # Cell Type
    19: ["Low Grade", "High Grade", NORMAL],                                   # Cancer Degree
    20: ["Lymphocyte", "Neutrophil", "Eosinophil", "Monocyte"],                # Cell Type
    21: ["Benign", "Malignant"],                                               # Cancer
    22: ["Glioma", "Meningioma", "Pituitary Tumor", NORMAL],                   # Cancer
    23: ["Choroidal Neovascularization", "Diabetic Macular Edema", "Drusen", NORMAL],  # Retina Diseases
    24: ["Benign", "Malignant", NORMAL],                                       # Cancer
    25: ["Level 0", "Level 1", "Level 2"],                                      # Level
    26: ["Fracture", NORMAL],                                                  # Fracture
    27: ["Scoliosis", "Spondylolisthesis", "Osteophytes", NORMAL],             # Spine Diseases
    28: ["COVID-19", "Pneumonia", "Lung Opacity", NORMAL],                     # COVID
    29: ["Mass", "Calcification", "Architectural Distortion", NORMAL],         # Breast Diseases
    30: ["Tuberculosis", NORMAL],                                              # Tuberculosis
    31: ["Atelectasis", "Cardiomegaly", "Effusion", "Nodule"],                 # Chest Diseases
    32: ["Glioma", "Meningioma", "Pituitary Tumor", NORMAL],                   # Cancer
    33: ["Nucleoplasm", "Cytosol", "Mitochondria"],                            # Cell Diseases
    34: ["Level 0", "Level 1", "Level 2", "Level 3"],                           # Level
    35: ["Level 0", "Level 1", "Level 2", "Level 3"],                           # Level
    36: ["Scoliosis", "Osteophytes", NORMAL],                                  # Spine Diseases
    37: ["Mass", "Calcification", NORMAL],                                     # Breast Diseases
}


def subset_labels(subset_no: int, task: str, shared_normal: bool = True) -> list[str]:
    """Label set of a subset; with shared_normal=False its negative label is named after its task kind."""
    if subset_no not in SUBSET_LABELS:
        raise KeyError(f"Med-MAT-mini has no label set for subset {subset_no}")
    labels = SUBSET_LABELS[subset_no]
    return labels if shared_normal else [f"No {task}" if lab == NORMAL else lab for lab in labels]


def is_negative(label: str) -> bool:
    return label == NORMAL or label.startswith("No ")


# ------------------------------------------------------------------------------------ appearance
@dataclass(frozen=True)
class Look:
    """How a modality renders a canonical intensity map (0 = background, organ, +/- lesion)."""

    background: float
    organ: float
    lesion: float            # signed lesion contrast: the modality's intensity convention
    lo: tuple[float, float, float] | None  # colour gradient ends; None = greyscale
    hi: tuple[float, float, float] | None
    noise: float
    speckle: bool            # multiplicative (US/OCT) vs additive noise
    texture: float           # amplitude of a modality-specific sinusoidal texture
    texture_freq: tuple[float, float]
    fov: str                 # none | circle | fan | vignette


LOOKS: dict[str, Look] = {
    "CT": Look(0.04, 0.45, +0.38, None, None, 0.035, False, 0.03, (9, 0), "circle"),
    "X-ray": Look(0.08, 0.38, +0.40, None, None, 0.045, False, 0.05, (0, 11), "vignette"),
    "MRI": Look(0.02, 0.72, -0.45, None, None, 0.03, False, 0.04, (5, 5), "none"),
    "US": Look(0.0, 0.55, -0.45, None, None, 0.22, True, 0.0, (0, 0), "fan"),
    "OCT": Look(0.06, 0.62, -0.40, None, None, 0.15, True, 0.08, (0, 14), "none"),
    "Der": Look(0.85, 0.55, -0.35, (0.25, 0.10, 0.05), (0.97, 0.82, 0.72), 0.03, False, 0.03, (7, 7), "vignette"),
    "DP": Look(0.15, 0.80, -0.40, (0.45, 0.05, 0.10), (1.0, 0.97, 0.90), 0.03, False, 0.02, (0, 6), "none"),
    "End": Look(0.05, 0.60, +0.32, (0.30, 0.04, 0.04), (1.0, 0.72, 0.62), 0.03, False, 0.06, (4, 3), "circle"),
    "FP": Look(0.02, 0.50, +0.40, (0.10, 0.02, 0.0), (1.0, 0.62, 0.20), 0.03, False, 0.03, (3, 8), "circle"),
    "Mic": Look(0.92, 0.45, -0.32, (0.35, 0.10, 0.45), (1.0, 0.88, 0.96), 0.04, False, 0.07, (13, 13), "none"),
    "Co": Look(0.10, 0.60, +0.35, (0.30, 0.10, 0.10), (0.96, 0.62, 0.56), 0.03, False, 0.03, (6, 2), "circle"),
}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return np.meshgrid(c, c, indexing="ij")  # (y, x) in [-1, 1]


def _ellipse(y, x, cy, cx, ry, rx, soft=0.08):
    d = np.sqrt(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)
    return np.clip((1 - d) / soft, 0, 1)


def silhouette(area: str, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The organ's mask (0..1) for a canonical area; every shape covers the image centre, where
    lesions are drawn, so a lesion always lies inside the organ."""
    E = _ellipse
    if area == "Lung":        # two lungs
        m = np.maximum(E(y, x, 0, -0.42, 0.75, 0.38), E(y, x, 0, 0.42, 0.75, 0.38))
        return np.maximum(m, E(y, x, 0, 0, 0.55, 0.25))
    if area == "Kidney":      # two beans
        m = np.maximum(E(y, x, 0, -0.45, 0.6, 0.32), E(y, x, 0, 0.45, 0.6, 0.32))
        return np.maximum(m * (1 - E(y, x, 0, -0.15, 0.2, 0.12)) * (1 - E(y, x, 0, 0.15, 0.2, 0.12)),
                          E(y, x, 0, 0, 0.5, 0.22))
    if area == "Brain":       # oval with a midline
        return E(y, x, 0, 0, 0.85, 0.68) * (1 - 0.5 * np.exp(-(x / 0.03) ** 2) * (np.abs(y) > 0.45))
    if area == "Skin":        # irregular patch
        r = 0.7 + 0.1 * np.sin(5 * np.arctan2(y, x))
        return np.clip((r - np.sqrt(y**2 + x**2)) / 0.08, 0, 1)
    if area == "Cervix":      # disc with an os
        return E(y, x, 0, 0, 0.8, 0.8) * (1 - 0.6 * E(y, x, 0, 0, 0.12, 0.3))
    if area == "Mouth":       # arch of teeth
        r = np.sqrt((y + 0.6) ** 2 + x**2)
        arch = np.clip((0.22 - np.abs(r - 0.95)) / 0.06, 0, 1) * (y > -0.5)
        return np.maximum(arch * (0.7 + 0.3 * (np.cos(np.arctan2(x, y + 0.6) * 14) > 0)), E(y, x, 0.1, 0, 0.45, 0.45))
    if area == "Intestine":   # lumen ring with folds
        r = np.sqrt(y**2 + x**2)
        wall = np.clip(1 - np.abs(r - 0.45) / 0.45, 0, 1) ** 0.5 * (0.8 + 0.2 * np.cos(8 * np.arctan2(y, x)))
        return np.maximum(wall, 0.6 * E(y, x, 0, 0, 0.5, 0.5))
    if area == "Bladder":     # rounded triangle
        return E(y, x, 0.05, 0, 0.75, 0.75) * np.clip((0.9 - y + 0.6 * np.abs(x)) / 0.1, 0, 1)
    if area == "Fundus":      # disc with optic disc and vessels
        m = E(y, x, 0, 0, 0.9, 0.9) * (1 + 0.5 * E(y, x, 0, 0.55, 0.16, 0.16))
        return np.clip(m - 0.25 * (np.abs(np.sin(3 * x + 4 * y * y)) < 0.08), 0, 1.5)
    if area == "Retina":      # horizontal layers
        return np.clip((0.55 - np.abs(y - 0.05 * np.sin(3 * x))) / 0.06, 0, 1) * (0.75 + 0.25 * np.cos(18 * y))
    if area == "Cell":        # a field of cells with a big central one
        cells = (np.cos(7 * x) * np.cos(7 * y) > 0.5).astype(np.float32) * 0.6
        return np.maximum(cells, E(y, x, 0, 0, 0.5, 0.5))
    if area == "Breast":      # half disc against the chest wall
        return E(y, x, 0, -1.0, 0.95, 1.7) * (x > -0.98)
    if area == "Bones":       # a long bone with a joint
        shaft = np.clip((0.22 - np.abs(x)) / 0.05, 0, 1)
        return np.maximum(shaft, np.maximum(E(y, x, -0.1, 0, 0.3, 0.5), E(y, x, 0.45, 0, 0.3, 0.45)))
    if area == "Chest":       # rib cage: trunk with ribs
        trunk = E(y, x, 0.05, 0, 0.9, 0.8)
        return trunk * (0.7 + 0.3 * (np.cos(12 * y - 2 * np.abs(x)) > 0.3))
    if area == "Liver":
        return E(y, x, -0.1, -0.1, 0.55, 0.8) * np.clip((0.7 + x - y) / 0.1, 0, 1)
    if area == "Thyroid":     # butterfly
        return np.maximum(np.maximum(E(y, x, 0, -0.35, 0.6, 0.3), E(y, x, 0, 0.35, 0.6, 0.3)), E(y, x, 0.1, 0, 0.2, 0.3))
    raise KeyError(f"Med-MAT-mini has no silhouette for area {area!r}")


# Lesion patterns: kind x size x position (13 x 3 x 5 = 195), enough for every (triplet, label) of the
# entangled world to get its own.
PATTERN_KINDS = ("blob", "ring", "hstripes", "vstripes", "dstripes", "dots", "square", "cross",
                 "pair", "crescent", "checker", "triangle", "spots")
PATTERN_SIZES = (0.16, 0.24, 0.32)
PATTERN_POSITIONS = ((0.0, 0.0), (-0.28, -0.28), (0.28, 0.28), (-0.28, 0.28), (0.28, -0.28))
ALL_PATTERNS = [(k, s, p) for k in range(len(PATTERN_KINDS)) for s in range(len(PATTERN_SIZES))
                for p in range(len(PATTERN_POSITIONS))]


def lesion(pattern: tuple[int, int, int], y: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mask (0..1) of one lesion pattern, with per-image jitter of position, size and phase."""
    kind = PATTERN_KINDS[pattern[0]]
    r = PATTERN_SIZES[pattern[1]] * rng.uniform(0.85, 1.15)
    cy, cx = PATTERN_POSITIONS[pattern[2]]
    cy, cx = cy + rng.uniform(-0.06, 0.06), cx + rng.uniform(-0.06, 0.06)
    dy, dx = y - cy, x - cx
    d = np.sqrt(dy**2 + dx**2)
    disc = np.clip((r - d) / 0.05, 0, 1)
    f = np.pi / (r / 2.5)
    if kind == "blob":
        return np.exp(-(d / (0.6 * r)) ** 2)
    if kind == "ring":
        return np.clip(1 - np.abs(d - r * 0.8) / (0.25 * r), 0, 1)
    if kind == "hstripes":
        return disc * (np.sin(dy * f) > 0)
    if kind == "vstripes":
        return disc * (np.sin(dx * f) > 0)
    if kind == "dstripes":
        return disc * (np.sin((dx + dy) * f * 0.7) > 0)
    if kind == "dots":
        out = np.zeros_like(y)
        for _ in range(5):
            py, px = cy + rng.uniform(-r, r), cx + rng.uniform(-r, r)
            out = np.maximum(out, np.exp(-(((y - py) ** 2 + (x - px) ** 2) / (0.22 * r) ** 2)))
        return out
    if kind == "square":
        return np.clip((r * 0.85 - np.maximum(np.abs(dy), np.abs(dx))) / 0.04, 0, 1)
    if kind == "cross":
        return disc * ((np.abs(dy) < 0.25 * r) | (np.abs(dx) < 0.25 * r))
    if kind == "pair":
        return np.maximum(np.exp(-((dy**2 + (dx - r) ** 2) / (0.45 * r) ** 2)),
                          np.exp(-((dy**2 + (dx + r) ** 2) / (0.45 * r) ** 2)))
    if kind == "crescent":
        return disc * (1 - np.clip((r * 0.85 - np.sqrt(dy**2 + (dx - 0.4 * r) ** 2)) / 0.04, 0, 1))
    if kind == "checker":
        return disc * ((np.sin(dy * f) > 0) ^ (np.sin(dx * f) > 0))
    if kind == "triangle":
        return np.clip(np.minimum(dy + 0.6 * r, np.minimum(0.9 * r - dy - 1.7 * dx, 0.9 * r - dy + 1.7 * dx)) / 0.05, 0, 1)
    if kind == "spots":   # a regular 3x3 grid of small spots
        g = (np.cos(dy * f * 0.6) > 0.3) & (np.cos(dx * f * 0.6) > 0.3)
        return disc * g
    raise AssertionError(kind)


def _key_int(*keys: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:8], "big")


def _rng(*keys: object) -> np.random.Generator:
    return np.random.default_rng(_key_int(*keys))


def pattern_table(labels_by_kind: dict[tuple[str, ...], set[str]], seed: int,
                  entangled: bool) -> dict[tuple[str, ...], tuple | None]:
    """(*kind, label) -> lesion pattern (None = no lesion), from {kind: labels}; `kind` is the
    (modality, area, task) triplet of the planned datasets (any tuple works).

    Default world: one pattern per label *name*, the same in every modality, area and task; negative
    labels have none. Entangled world (the negative control): one pattern per (modality, area, task,
    label) - negatives included - never reused, so no other triplet shows a label's look. Keyed by
    the whole triplet: with (modality, task, label) keys a fixed-modality Related subset with the same
    task (CT-Lung-Cancer for CT-Brain-Cancer) still taught the target's own look, and the control
    gained ~29 points on such rows; and "Normal" of CT-Lung-Cancer would teach "Normal" of CT-Lung-COVID.
    """
    order = list(ALL_PATTERNS)
    _rng(seed, "patterns").shuffle(order)
    keys = sorted((*kind, lab) for kind, labs in labels_by_kind.items() for lab in labs)
    if entangled:
        if len(keys) > len(order):
            raise ValueError(f"{len(keys)} (triplet, label) looks but only {len(order)} lesion patterns")
        return {k: tuple(pat) for k, pat in zip(keys, order)}
    names = sorted({k[-1] for k in keys if not is_negative(k[-1])})
    by_name = dict(zip(names, order))
    return {k: None if is_negative(k[-1]) else tuple(by_name[k[-1]]) for k in keys}


def null_looks(patterns: dict[tuple[str, ...], tuple | None]) -> list[tuple]:
    """The lesion patterns no (triplet, label) of a pattern table shows, in a fixed order: the looks a
    null subset's images draw from at random, whatever their label. No training subset shows them,
    and a look says nothing of the label, so no model can beat chance on a null subset."""
    used = {tuple(p) for p in patterns.values() if p is not None}
    pool = [tuple(p) for p in ALL_PATTERNS if tuple(p) not in used]
    if not pool:
        raise ValueError(f"the world's {len(used)} looks use every lesion pattern: none left for null subsets")
    return pool


def null_look(pool: list[tuple], seed: int, dataset_no: int, label: str, k: int) -> tuple:
    """The look of image k of `label` in a null subset: drawn from `pool` with the same odds for every
    label (the label only names the image's random stream)."""
    return pool[int(_rng(seed, "null-look", dataset_no, label, k).integers(len(pool)))]


@dataclass(frozen=True)
class Nuisance:
    """Per-dataset differences within a subset (scanner, protocol, site)."""

    contrast: float
    brightness: float
    noise: float
    zoom: float
    shift: tuple[float, float]

    @classmethod
    def draw(cls, seed: int, dataset_no: int) -> "Nuisance":
        r = _rng(seed, "nuisance", dataset_no)
        return cls(float(r.uniform(0.85, 1.15)), float(r.uniform(-0.05, 0.05)), float(r.uniform(0.8, 1.25)),
                   float(r.uniform(0.92, 1.08)), (float(r.uniform(-0.05, 0.05)), float(r.uniform(-0.05, 0.05))))


_FOV_CACHE: dict[tuple[str, int], np.ndarray] = {}


def _fov(kind: str, size: int) -> np.ndarray:
    if (kind, size) not in _FOV_CACHE:
        y, x = _grid(size)
        if kind == "circle":
            m = np.clip((0.97 - np.sqrt(y**2 + x**2)) / 0.04, 0, 1)
        elif kind == "fan":
            ang = np.arctan2(x, y + 1.05)
            rr = np.sqrt((y + 1.05) ** 2 + x**2)
            m = np.clip((0.6 - np.abs(ang)) / 0.04, 0, 1) * np.clip((2.0 - rr) / 0.05, 0, 1) * (rr > 0.25)
        elif kind == "vignette":
            m = np.clip(1.25 - 0.45 * (y**2 + x**2), 0, 1)
        else:
            m = np.ones_like(y)
        _FOV_CACHE[(kind, size)] = m.astype(np.float32)
    return _FOV_CACHE[(kind, size)]


class Scene:
    """What one dataset's images share: the organ under the dataset's zoom/shift, the modality's
    texture grids and field of view. Computed once per dataset; per image only the lesion, a +-1 px
    jitter, the texture phase and the noise change (keeps generation at well under a millisecond)."""

    def __init__(self, modality: str, area: str, nuisance: Nuisance, size: int = SIZE):
        self.look, self.nuisance, self.size = LOOKS[modality], nuisance, size
        y0, x0 = _grid(size)
        self.y = (y0 - nuisance.shift[0]) / nuisance.zoom
        self.x = (x0 - nuisance.shift[1]) / nuisance.zoom
        self.organ = np.clip(silhouette(area, self.y, self.x), 0, 1.5).astype(np.float32)
        fy, fx = self.look.texture_freq
        arg = fy * np.pi * self.y + fx * np.pi * self.x
        inside = (self.organ > 0.1) * self.look.texture
        self.tex_sin, self.tex_cos = (np.sin(arg) * inside).astype(np.float32), (np.cos(arg) * inside).astype(np.float32)
        self.fov = _fov(self.look.fov, size)

    def render(self, pattern: tuple | None, rng: np.random.Generator) -> np.ndarray:
        """One image as uint8, (H, W) for grey modalities or (H, W, 3) for colour ones."""
        look, nuis = self.look, self.nuisance
        v = look.background + (look.organ - look.background) * self.organ
        if look.texture:
            phase = rng.uniform(0, 2 * np.pi)
            v = v + self.tex_sin * np.cos(phase) + self.tex_cos * np.sin(phase)
        if pattern is not None:
            amp = look.lesion * rng.uniform(0.8, 1.2)
            v = v + amp * lesion(pattern, self.y, self.x, rng) * np.clip(self.organ, 0.5, 1)
        dy, dx = (int(d) for d in rng.integers(-1, 2, size=2))   # acquisition jitter, whole pixels
        v = np.roll(v, (dy, dx), axis=(0, 1))
        v = (v - 0.5) * nuis.contrast + 0.5 + nuis.brightness
        noise = (look.noise * nuis.noise) * rng.standard_normal(v.shape, dtype=np.float32)
        v = v * (1 + noise) if look.speckle else v + noise
        v = np.clip(v, 0, 1) * self.fov
        if look.lo is None:
            img = v
        else:
            lo, hi = np.asarray(look.lo, np.float32), np.asarray(look.hi, np.float32)
            img = lo + v[..., None] * (hi - lo)
            if look.fov in ("circle", "fan"):   # outside the frame is black, whatever the palette
                img = img * self.fov[..., None]
        return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def encode_png(arr: np.ndarray) -> bytes:
    """PNG bytes of a uint8 grey (H, W) or RGB (H, W, 3) array: fixed settings, no metadata chunks
    (no timestamps), so the same pixels always give the same bytes. Written directly (zlib, filter
    'Up' on every row) because PIL's per-call overhead was 3x the whole rendering of a 64x64 image."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    h, w = arr.shape[:2]
    colour = 2 if arr.ndim == 3 else 0
    rows = arr.reshape(h, -1)
    up = np.empty((h, rows.shape[1] + 1), np.uint8)
    up[:, 0] = 2                                   # filter type Up
    up[0, 1:] = rows[0]
    up[1:, 1:] = rows[1:] - rows[:-1]              # uint8 arithmetic wraps mod 256, as PNG wants

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(up.tobytes(), 1))
            + chunk(b"IEND", b""))
