"""Synthetic hand-bone X-rays: 29 overlapping bone polygons per hand, in the real raw layout.

Writes `<out>/hand_xray/train/DCM/IDxxx/image<13 digits>_{L,R}.png` (8-bit grey, size x size),
`<out>/hand_xray/train/outputs_json/IDxxx/<same stem>.json` with one `poly_seg` annotation per
class, and `<out>/hand_xray/test/DCM/IDxxx/*.png` without JSON.

The hand is laid out on a 2048 canvas (then scaled to cfg.size): radius and ulna at the bottom,
two rows of carpals, five metacarpals and fourteen phalanges fanning out, bones overlapping a
little at the joints as in the real annotations. Class order follows the dataset's: finger-1..19
run thumb to little finger and, along each ray, tip to base (the thumb has two phalanges and its
metacarpal: finger-1..3; each other ray three phalanges and a metacarpal), then the carpals,
radius and ulna. A right hand has its thumb on the left; the left hand is its mirror image.
"""
from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from segpipe.config import HandXrayDemo

log = logging.getLogger(__name__)

CANVAS = 2048.0
CARPAL_NAMES = ("Trapezium", "Trapezoid", "Capitate", "Hamate", "Scaphoid", "Lunate", "Triquetrum", "Pisiform")
FOREARM_NAMES = ("Radius", "Ulna")
# The dataset's class list (as in hand-bone-29-classes.cvat.json); kept here so the generator
# does not depend on the ingest module.
CLASSES = tuple(f"finger-{i}" for i in range(1, 20)) + CARPAL_NAMES + FOREARM_NAMES

# Rays, thumb first: metacarpal base, metacarpal head, then (length, width) of each phalanx
# from proximal to distal, on the 2048 canvas of a right hand.
RAYS = [
    ((690, 1290), (520, 1040), 112, [(250, 110), (185, 104)]),
    ((835, 1265), (770, 880), 112, [(300, 106), (185, 100), (145, 100)]),
    ((965, 1255), (955, 850), 114, [(325, 108), (205, 102), (150, 100)]),
    ((1090, 1275), (1120, 890), 106, [(305, 104), (195, 100), (145, 98)]),
    ((1195, 1300), (1280, 975), 102, [(250, 100), (160, 96), (135, 96)]),
]
# Carpals: centre, radii, rotation (degrees), in CARPAL_NAMES order.
CARPALS = [
    ((700, 1385), (88, 78), 20), ((830, 1372), (70, 68), 0), ((962, 1380), (84, 110), 0),
    ((1100, 1390), (88, 98), -10), ((765, 1515), (115, 78), -30), ((925, 1540), (88, 82), 0),
    ((1068, 1530), (82, 72), 10), ((1130, 1560), (62, 58), 0),
]
# Forearm bones: distal end, proximal end (off the image), width at the shaft and at the end.
FOREARM = [((840, 1600), (815, 2250), 250, 370), ((1165, 1655), (1190, 2250), 170, 210)]
JOINT_OVERLAP = 26  # how far a bone's base reaches under the previous bone's head


def write(root: Path, cfg: HandXrayDemo, seed: int) -> None:
    """Write cfg.n_patients train patients (with JSON) and cfg.n_test_patients test patients."""
    for p in range(cfg.n_patients + cfg.n_test_patients):
        train = p < cfg.n_patients
        patient = f"ID{p + 1:03d}"
        rng = np.random.default_rng([seed, 3, p])
        anatomy = rng.uniform(0.95, 1.05, size=len(RAYS))  # this patient's finger lengths, both hands
        for side in ("R", "L"):
            stem = f"image{1661000000000 + int(rng.integers(0, 10**9)):013d}_{side}"
            hand = hand_polygons(rng, anatomy, cfg.size, mirror=side == "L")
            split = root / "hand_xray" / ("train" if train else "test")
            png = split / "DCM" / patient / f"{stem}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(render(rng, hand, cfg.size)).save(png, compress_level=1)
            if train:
                _write_json(split / "outputs_json" / patient / f"{stem}.json", f"{stem}.png", hand.bones, rng)
    log.info("hand_xray demo: %d train + %d test patients", cfg.n_patients, cfg.n_test_patients)


def _write_json(path: Path, filename: str, bones: dict[str, np.ndarray], rng: np.random.Generator) -> None:
    annotations = [
        {"id": str(uuid.UUID(bytes=rng.bytes(16), version=4)), "type": "poly_seg", "attributes": {},
         "points": points.astype(int).tolist(), "label": name}
        for name, points in bones.items()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"filename": filename, "annotations": annotations}, indent=1) + "\n")


def _long_bone(base, head, width, rng, taper: float = 0.0, n_side: int = 8) -> np.ndarray:
    """Outline of a long bone from base to head: wider at both ends, rounded caps (about 22 points)."""
    base, head = np.asarray(base, float), np.asarray(head, float)
    axis = head - base
    length = np.hypot(*axis)
    along, normal = axis / length, np.array([-axis[1], axis[0]]) / length
    s = np.linspace(0, 1, n_side)
    half = width / 2 * (0.8 + 0.2 * (2 * s - 1) ** 2) * (1 - taper * s)
    left = base + s[:, None] * axis + half[:, None] * normal
    right = base + s[:, None] * axis - half[:, None] * normal
    cap = np.linspace(0.25, 0.75, 3) * np.pi
    tip_cap = head + half[-1] * 0.9 * (np.cos(cap)[:, None] * normal + np.sin(cap)[:, None] * along)
    base_cap = base - half[0] * 0.9 * (np.cos(cap)[:, None] * normal + np.sin(cap)[:, None] * along)
    outline = np.concatenate([right, tip_cap[::-1], left[::-1], base_cap[::-1]])
    return outline + rng.normal(0, 0.02 * width, outline.shape)


def _round_bone(centre, radii, angle_deg, rng, n: int = 16) -> np.ndarray:
    """Outline of a carpal: a slightly irregular ellipse."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = 1 + rng.normal(0, 0.05, n)
    a = np.deg2rad(angle_deg)
    px, py = radii[0] * r * np.cos(t), radii[1] * r * np.sin(t)
    return np.stack([centre[0] + px * np.cos(a) - py * np.sin(a), centre[1] + px * np.sin(a) + py * np.cos(a)], 1)


class Hand(NamedTuple):
    bones: dict[str, np.ndarray]  # class name -> (N, 2) float x, y pixel outline, in class order
    joints: list[np.ndarray]  # (2, 2) segments across each finger joint, where the joint space is


def hand_polygons(rng: np.random.Generator, lengths: np.ndarray, size: int, mirror: bool) -> Hand:
    """The 29 bone outlines of one hand and its finger joints, in pixel coordinates."""
    fingers: list[np.ndarray] = []
    joints: list[np.ndarray] = []
    for (base, head, width, phalanges), scale in zip(RAYS, lengths):
        base, head = np.asarray(base, float), np.asarray(head, float)
        head = base + (head - base) * scale
        ray = [_long_bone(base, head, width, rng)]
        direction = (head - base) / np.hypot(*(head - base))
        bend = np.deg2rad(rng.normal(0, 2))  # fingers are not perfectly straight
        start = head - direction * JOINT_OVERLAP
        for k, (length, w) in enumerate(phalanges):
            normal = np.array([-direction[1], direction[0]])
            middle = start + direction * JOINT_OVERLAP / 2
            joints.append(np.stack([middle - 0.6 * w * normal, middle + 0.6 * w * normal]))
            c, s = np.cos(bend), np.sin(bend)
            direction = np.array([c * direction[0] - s * direction[1], s * direction[0] + c * direction[1]])
            end = start + direction * (length * scale + JOINT_OVERLAP)
            distal = k == len(phalanges) - 1
            ray.append(_long_bone(start, end, w, rng, taper=0.3 if distal else 0.0))
            start = end - direction * JOINT_OVERLAP
        fingers.extend(ray[::-1])  # tip to base, as the dataset numbers them
    carpals = [_round_bone(c, r, a, rng) for c, r, a in CARPALS]
    forearm = [_long_bone(end, shaft, w_end, rng, taper=1 - w_shaft / w_end) for end, shaft, w_shaft, w_end in FOREARM]

    # One pose per image: small rotation, scale and shift about the middle of the hand.
    angle, zoom = np.deg2rad(rng.uniform(-6, 6)), rng.uniform(0.9, 0.97)
    shift = rng.uniform(-50, 50, size=2)
    centre = np.array([CANVAS / 2, 1150.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])

    def place(points: np.ndarray) -> np.ndarray:
        points = ((points - centre) @ rot.T * zoom + centre + shift) * (size / CANVAS)
        if mirror:
            points[:, 0] = size - 1 - points[:, 0]
        return np.clip(points, 0, size - 1)

    bones = {name: place(outline) for name, outline in zip(CLASSES, fingers + carpals + forearm)}
    return Hand(bones, [place(joint) for joint in joints])


def render(rng: np.random.Generator, hand: Hand, size: int) -> np.ndarray:
    """An 8-bit X-ray-like image of the bones: bright bone with denser cortex, dark joint spaces
    between the finger bones, a soft-tissue halo, on a dark background with noise."""
    soft = _soft_tissue(hand.bones, size)
    density = np.zeros((size, size), np.float32)
    cortex = max(2, int(16 * size / CANVAS))
    for points in hand.bones.values():
        x0, y0 = np.floor(points.min(axis=0)).astype(int)
        x1, y1 = np.ceil(points.max(axis=0)).astype(int) + 1
        local = [tuple(p) for p in points - (x0, y0)]
        fill = Image.new("L", (x1 - x0, y1 - y0), 0)
        draw = ImageDraw.Draw(fill)
        draw.polygon(local, fill=150)
        draw.line(local + local[:1], fill=255, width=cortex, joint="curve")  # cortical bone is denser
        density[y0:y1, x0:x1] += np.asarray(fill, np.float32) / 255.0  # overlapping bones add up
    # The joint space (cartilage) shows as a dark gap, where the annotators' outlines overlap.
    gaps = Image.new("L", (size, size), 0)
    for joint in hand.joints:
        ImageDraw.Draw(gaps).line([tuple(p) for p in joint], fill=255, width=max(2, int(14 * size / CANVAS)))
    density *= 1 - 0.8 * np.asarray(gaps, np.float32) / 255.0
    image = 0.06 + 0.3 * soft + 0.45 * density
    image *= 1 + 0.08 * _coarse_noise(rng, size)
    image += 0.03 * rng.standard_normal((size, size), dtype=np.float32)
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def _soft_tissue(bones: dict[str, np.ndarray], size: int) -> np.ndarray:
    """The hand's soft tissue (0..1): the bones and the palm grown and blurred, drawn at 1/4 scale."""
    small = max(size // 4, 64)
    k = small / size
    canvas = Image.new("L", (small, small), 0)
    draw = ImageDraw.Draw(canvas)
    for points in bones.values():
        draw.polygon([tuple(p) for p in points * k], fill=255)
    hull = np.concatenate([bones[n] for n in CLASSES if not n.startswith("finger")] +
                          [bones[f"finger-{i}"] for i in (3, 7, 11, 15, 19)]) * k
    draw.polygon([tuple(p) for p in _hull(hull)], fill=255)  # the palm between the metacarpals
    # Grow the bones by about 60 px (at 2048) into flesh: blur, threshold low, blur again.
    grown = canvas.filter(ImageFilter.GaussianBlur(60 * size / CANVAS * k)).point(lambda v: 255 if v > 40 else 0)
    canvas = grown.filter(ImageFilter.GaussianBlur(25 * size / CANVAS * k))
    return np.asarray(canvas.resize((size, size), Image.BILINEAR), np.float32) / 255.0


def _hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (monotone chain), so the palm is one convex polygon."""
    pts = sorted(map(tuple, points))

    def half(seq):
        out: list[tuple[float, float]] = []
        for p in seq:
            while len(out) >= 2 and _turn(out[-2], out[-1], p) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]

    return np.array(half(pts) + half(pts[::-1]))


def _turn(a, b, c) -> float:
    """Positive when a -> b -> c turns counter-clockwise."""
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])


def _coarse_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = rng.uniform(-1, 1, size=(8, 8)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))
