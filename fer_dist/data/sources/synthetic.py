"""The built-in synthetic data set: procedural grey faces whose true expression intensity is known per frame.

Sequences follow CK+: for every subject and each of the 6 non-neutral expressions, `frames` frames go from
intensity 0 (the subject's neutral face) to 1 (the peak). The first frame is labelled neutral, the last
`peak_frames` frames carry the expression, the frames between are unlabelled; `meta["intensity"]` and
`meta["expression"]` keep the truth for evaluation only.

Expressions are rendered by action-unit-like controls (FACS numbering), each proportional to the intensity,
so intensity 0 draws exactly the identity's neutral face for every expression. Identity parameters derive
from (seed, subject) only; nuisance (head pose, lighting, camera, noise) from (seed, subject, expression,
frame), most of it shared by a subject's session as in CK+ (see `nuisance`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import cv2
import numpy as np

from fer_dist.classes import CLASSES, NEUTRAL
from fer_dist.data.sources.base import Listing, Record, SourceOptions, finish
from fer_dist.errors import FerDistError

EXPRESSIONS: tuple[int, ...] = tuple(k for k in range(len(CLASSES)) if k != NEUTRAL)

AUS = ("au1", "au2", "au4", "au5", "au6", "au7", "au9", "au10", "au12", "au15", "au20", "au23", "au25",
       "au26", "au41")
# Action-unit weights at the peak (intensity 1). Fear/surprise and anger/disgust overlap on purpose.
EXPRESSION_AUS: dict[int, dict[str, float]] = {
    CLASSES.index("anger"): {"au4": 1.0, "au5": 0.5, "au7": 0.8, "au23": 1.0},
    CLASSES.index("disgust"): {"au4": 0.4, "au7": 0.4, "au9": 1.0, "au10": 0.8, "au15": 0.6},
    CLASSES.index("fear"): {"au1": 1.0, "au2": 0.6, "au4": 0.5, "au5": 1.0, "au20": 1.0, "au25": 0.8,
                            "au26": 0.25},
    CLASSES.index("happy"): {"au6": 1.0, "au12": 1.0, "au25": 0.5},
    CLASSES.index("sadness"): {"au1": 1.0, "au4": 0.3, "au15": 1.0, "au41": 0.5},
    CLASSES.index("surprise"): {"au1": 1.0, "au2": 1.0, "au5": 0.8, "au25": 1.0, "au26": 1.0},
}
# Leading tags keep the random streams apart: SeedSequence((a, b)) equals SeedSequence((a, b, 0)).
_TAG_IDENTITY, _TAG_SESSION, _TAG_SEQUENCE, _TAG_FRAME, _TAG_NOISE = 101, 151, 202, 303, 404
_SUPERSAMPLE = 2
# Head pose spread (session level) and hard limits: degrees, relative scale, shift x and y in canvas units
# (0.0625 is 3 px at 48 px, 1/16 of the crop at any size).
_POSE_SD = np.array([2.0, 0.015, 0.012, 0.012])
_POSE_LIMIT = np.array([6.0, 0.05, 0.0625, 0.0625])
_SHIFT = 4  # cv2 fixed-point bits: sub-pixel feature positions, so small intensity steps move pixels


@dataclasses.dataclass(frozen=True)
class SyntheticFace:
    """One identity, in canvas units (the image spans -0.5..0.5, y down); tones are grey levels."""

    face_w: float
    face_h: float
    face_y: float
    chin: float
    skin: float
    hair: float
    background: float
    hairline: float
    eye_dx: float
    eye_y: float
    eye_w: float
    eye_h: float
    iris: float
    brow_gap: float
    brow_th: float
    brow_arch: float
    nose_y: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    lip_h: float
    lip_tone: float
    gains: tuple[float, ...]  # per entry of AUS: how strongly this person expresses at the peak


@dataclasses.dataclass(frozen=True)
class Nuisance:
    """Head pose (degrees, scale, shift in canvas units) and camera (light, contrast, blur, noise)."""

    angle: float = 0.0
    scale: float = 1.0
    dx: float = 0.0
    dy: float = 0.0
    light_dir: float = 0.0
    light: float = 0.0
    brightness: float = 0.0
    contrast: float = 1.0
    blur: float = 0.0
    noise: float = 0.0


@functools.lru_cache(maxsize=256)
def identity(seed: int, subject: int) -> SyntheticFace:
    """The identity parameters of `subject`, drawn from (seed, subject) only."""
    r = np.random.default_rng((_TAG_IDENTITY, seed, subject))
    u = r.uniform
    eye_y = u(-0.11, -0.05)
    skin = u(105, 205)
    return SyntheticFace(
        face_w=u(0.33, 0.44), face_h=u(0.45, 0.55), face_y=u(0.02, 0.07), chin=u(0.0, 0.3), skin=skin,
        hair=u(15, 95) if r.random() < 0.8 else u(150, 210), background=u(40, 220),
        hairline=u(-0.42, -0.30), eye_dx=u(0.14, 0.19), eye_y=eye_y, eye_w=u(0.065, 0.09),
        eye_h=u(0.026, 0.038), iris=u(0.026, 0.036), brow_gap=u(0.075, 0.11), brow_th=u(0.018, 0.036),
        brow_arch=u(0.0, 0.025), nose_y=eye_y + u(0.17, 0.23), nose_w=u(0.07, 0.10),
        mouth_y=eye_y + u(0.31, 0.37), mouth_w=u(0.10, 0.145), lip_h=u(0.014, 0.026),
        lip_tone=skin * u(0.6, 0.8), gains=tuple(u(0.75, 1.15, len(AUS)).tolist()),
    )


def action_units(face: SyntheticFace, expression: int, intensity: float) -> dict[str, float]:
    """Every AU's activation for `expression` at `intensity` (0 for all at intensity 0)."""
    if expression != NEUTRAL and expression not in EXPRESSION_AUS:
        raise FerDistError(f"synthetic: expression {expression} is not a class index 0..{len(CLASSES) - 1}")
    weights = EXPRESSION_AUS.get(expression, {})
    return {au: weights.get(au, 0.0) * g * float(intensity) for au, g in zip(AUS, face.gains, strict=True)}


@functools.lru_cache(maxsize=256)
def _session(seed: int, subject: int) -> tuple[tuple[float, ...], Nuisance]:
    """A subject's recording session: its head pose offsets (angle, scale, dx, dy) and its camera."""
    r = np.random.default_rng((_TAG_SESSION, seed, subject))
    pose = tuple(r.normal(0, _POSE_SD).tolist())
    return pose, Nuisance(
        light_dir=r.uniform(0, 2 * math.pi), light=r.uniform(0, 0.2),
        brightness=float(np.clip(r.normal(0, 8), -20, 20)), contrast=r.uniform(0.85, 1.15),
        blur=r.uniform(0.3, 0.8), noise=r.uniform(1, 4),
    )


def nuisance(seed: int, subject: int, expression: int, frame: int) -> Nuisance:
    """Pose and camera of one frame.

    Like CK+, a subject's sequences share one recording session: the camera (lighting, contrast, blur, noise
    level) and most of the head pose come from (seed, subject), each sequence moves the head a little, each
    frame jitters it slightly (and `render_face` draws fresh sensor noise).
    """
    pose, camera = _session(seed, subject)
    sequence = np.random.default_rng((_TAG_SEQUENCE, seed, subject, expression)).normal(0, _POSE_SD / 3)
    jitter = np.random.default_rng((_TAG_FRAME, seed, subject, expression, frame)).normal(0, _POSE_SD / 40)
    angle, scale, dx, dy = np.clip(np.array(pose) + sequence + jitter, -_POSE_LIMIT, _POSE_LIMIT).tolist()
    return dataclasses.replace(camera, angle=angle, scale=1 + scale, dx=dx, dy=dy)


class _Pen:
    """Draws canonical-coordinate shapes on a uint8 canvas through the pose transform, anti-aliased."""

    def __init__(self, img: np.ndarray, pose: Nuisance):
        self.img = img
        a = math.radians(pose.angle)
        self.angle = pose.angle
        self.px = img.shape[0] * pose.scale  # pixels per canvas unit
        k = self.px * (1 << _SHIFT)
        self.m = (k * math.cos(a), -k * math.sin(a), k * math.sin(a), k * math.cos(a))
        self.t = tuple(img.shape[0] * (0.5 + d) * (1 << _SHIFT) for d in (pose.dx, pose.dy))
        self.mt = np.array(self.m).reshape(2, 2).T  # [2, 2], applied to row vectors

    def _pts(self, xs, ys) -> np.ndarray:
        p = np.array((xs, ys), float).T @ self.mt  # [n, 2] fixed-point pixel coordinates
        p += self.t
        return p.round().astype(np.int32)

    def fill(self, xs, ys, tone: float) -> None:
        cv2.fillPoly(self.img, [self._pts(xs, ys)], int(round(tone)), cv2.LINE_AA, _SHIFT)

    def line(self, xs, ys, tone: float, width: float) -> None:
        th = max(1, int(round(width * self.px)))
        cv2.polylines(self.img, [self._pts(xs, ys)], False, int(round(tone)), th, cv2.LINE_AA, _SHIFT)

    def ellipse(self, cx: float, cy: float, ax: float, ay: float, tone: float) -> None:
        m, t, one = self.m, self.t, 1 << _SHIFT
        centre = (round(m[0] * cx + m[1] * cy + t[0]), round(m[2] * cx + m[3] * cy + t[1]))
        axes = (round(ax * self.px * one), round(ay * self.px * one))
        cv2.ellipse(self.img, centre, axes, self.angle, 0, 360, int(round(tone)), -1, cv2.LINE_AA, _SHIFT)


@functools.lru_cache(maxsize=16)
def _bezier_weights(n: int) -> np.ndarray:
    t = np.linspace(0, 1, n)
    return np.stack([(1 - t) ** 2, 2 * (1 - t) * t, t**2])  # [3, n]


def _join(*parts) -> np.ndarray:
    return np.concatenate([np.atleast_1d(np.asarray(p, float)) for p in parts])


def _curve(left, mid, right, n: int = 13) -> tuple[np.ndarray, np.ndarray]:
    """Quadratic Bezier from `left` to `right` passing through `mid` at its half-way point."""
    (x0, y0), (xm, ym), (x2, y2) = left, mid, right
    w = _bezier_weights(n)
    xs = np.array([x0, 2 * xm - (x0 + x2) / 2, x2], float) @ w
    ys = np.array([y0, 2 * ym - (y0 + y2) / 2, y2], float) @ w
    return xs, ys


def _draw_head(pen: _Pen, f: SyntheticFace, au: dict[str, float]) -> None:
    pen.img[:] = int(round(f.background))
    pen.ellipse(0, f.face_y - 0.2, f.face_w * 1.12, f.face_h * 0.85, f.hair)
    for sgn in (-1, 1):  # ears
        pen.ellipse(sgn * f.face_w * 0.98, f.eye_y + 0.08, 0.04, 0.08, f.skin * 0.85)
    jaw = 0.5 * (0.025 * au["au25"] + 0.11 * au["au26"])
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    lower = np.sin(t) > 0
    xs = np.cos(t) * np.where(lower, 1 - f.chin * np.sin(t) ** 2, 1.0)  # narrower towards the chin
    ys = np.sin(t) * np.where(lower, f.face_h + jaw, f.face_h)
    for shrink, shade in ((1.0, 0.8), (0.93, 0.9), (0.84, 0.96), (0.7, 1.0)):  # soft edge shading
        pen.fill(f.face_w * shrink * xs, f.face_y + 0.03 * (1 - shrink) + shrink * ys, f.skin * shade)
    pen.ellipse(0, f.hairline - 0.2, f.face_w * 1.08, 0.2, f.hair)  # fringe: its lower edge is the hairline
    for sgn in (-1, 1):  # cheeks, raised and lit by AU6
        for grow, lift in ((1.0, 0.02), (0.7, 0.04)):
            cy = f.eye_y + 0.15 - 0.035 * au["au6"]
            pen.ellipse(sgn * (f.eye_dx + 0.01), cy, 0.08 * grow, 0.055 * grow,
                        min(255.0, f.skin * (1 + lift * (1 + au["au6"]))))


def _draw_eyes(pen: _Pen, f: SyntheticFace, au: dict[str, float]) -> None:
    up = f.eye_h * max(0.15, 1 + 0.7 * au["au5"] - 0.35 * au["au7"] - 0.6 * au["au41"] - 0.2 * au["au6"])
    lo = f.eye_h * 0.8 * max(0.15, 1 - 0.55 * au["au7"] - 0.5 * au["au6"])
    x = np.linspace(-1, 1, 15)
    sclera = min(250.0, f.skin * 0.35 + 160)
    for sgn in (-1, 1):
        cx, cy, w = sgn * f.eye_dx, f.eye_y, f.eye_w
        bump = 1 - x**2
        ux, uy = cx + w * x, cy - up * bump * (1 + 0.15 * sgn * x)
        lx, ly = ux[::-1], (cy + lo * bump)[::-1]
        pen.fill(_join(ux, lx), _join(uy, ly), sclera)
        pen.ellipse(cx, cy + 0.002, f.iris, f.iris, f.skin * 0.3)
        pen.ellipse(cx, cy + 0.002, f.iris * 0.45, f.iris * 0.45, 10)
        cover = 2.6 * f.eye_h + 0.03
        edge = cx + w * 1.15 * np.array([1, -1])
        pen.fill(_join(ux, edge), _join(uy, cy - cover, cy - cover), f.skin)  # upper lid over the iris
        pen.fill(_join(lx, edge[::-1]), _join(ly, cy + cover, cy + cover), f.skin)
        pen.line(ux, uy, f.skin * 0.25, 0.013)
        pen.line(ux, uy - 0.022 - 0.5 * up * au["au5"], f.skin * (0.8 + 0.15 * au["au5"]), 0.008)  # crease
        pen.line(lx, ly, f.skin * 0.7, 0.007)
        if au["au6"] > 1e-3:  # crow's feet at the outer corner
            for k in (-1, 0, 1):
                ox = cx + sgn * w * 1.15
                pen.line([ox, ox + sgn * 0.04], [cy + 0.01 * k, cy + 0.025 * k],
                         f.skin * (1 - 0.4 * au["au6"]), 0.007)


def _draw_brows(pen: _Pen, f: SyntheticFace, au: dict[str, float]) -> None:
    base = f.eye_y - f.brow_gap
    th = f.brow_th * (1 + 0.3 * au["au4"])
    tone = min(f.hair, f.skin * 0.45)
    for sgn in (-1, 1):
        ix = sgn * (f.eye_dx - 0.95 * f.eye_w - 0.01 + 0.025 * au["au4"])
        ox = sgn * (f.eye_dx + 1.15 * f.eye_w)
        iy = base - 0.05 * au["au1"] + 0.05 * au["au4"] - 0.01 * au["au9"]
        oy = base + 0.012 - 0.06 * au["au2"] + 0.012 * au["au4"]
        my = (iy + oy) / 2 - f.brow_arch - 0.012 * au["au1"] - 0.03 * au["au2"]
        xs, ys = _curve((ix, iy), ((ix + ox) / 2 + sgn * 0.01, my), (ox, oy))
        half = th * np.linspace(0.5, 0.3, len(xs))
        pen.fill(_join(xs, xs[::-1]), _join(ys - half, (ys + half)[::-1]), tone)
    glabella = au["au4"] + 0.5 * au["au9"]
    if glabella > 1e-3:  # vertical frown lines between the brows
        for sgn in (-1, 1):
            pen.line([sgn * 0.022, sgn * 0.018], [base - 0.01, base + 0.05], f.skin * (1 - 0.4 * glabella),
                     0.008)


def _draw_nose(pen: _Pen, f: SyntheticFace, au: dict[str, float], corners: np.ndarray) -> None:
    ny = f.nose_y - 0.02 * au["au9"] - 0.01 * au["au10"]
    nw = f.nose_w * (1 + 0.2 * au["au9"] + 0.05 * au["au12"])
    dark = f.skin * 0.72
    for sgn in (-1, 1):
        pen.line([sgn * 0.03, sgn * 0.045, sgn * nw * 0.75], [f.eye_y + 0.05, ny - 0.05, ny - 0.01],
                 f.skin * 0.85, 0.008)
        pen.ellipse(sgn * nw * 0.4, ny + 0.005, nw * 0.22, 0.013, f.skin * 0.35)
        wing = _curve((sgn * nw * 0.75, ny - 0.01), (sgn * nw * 0.9, ny + 0.015), (sgn * nw * 0.3, ny + 0.03))
        pen.line(*wing, dark, 0.009)
        fold = 0.15 + 0.55 * max(au["au12"], au["au9"], au["au10"])  # nasolabial fold depth
        cx, cy = corners[0 if sgn < 0 else 1]
        pen.line(*_curve((sgn * (nw + 0.01), ny - 0.02), (sgn * (nw + 0.035 + 0.02 * au["au12"]), ny + 0.045),
                         (cx + sgn * 0.025, cy + 0.02)), f.skin * (1 - 0.35 * fold), 0.01)
    if au["au9"] > 1e-3:  # wrinkles across the bridge
        for k in range(3):
            y = f.eye_y + 0.03 + 0.022 * k
            pen.line(*_curve((-0.035, y + 0.006), (0, y), (0.035, y + 0.006), 7),
                     f.skin * (1 - 0.45 * au["au9"]), 0.007)


def _mouth_corners(f: SyntheticFace, au: dict[str, float]) -> np.ndarray:
    w = f.mouth_w * (1 + 0.15 * au["au12"] + 0.3 * au["au20"] - 0.15 * au["au23"] - 0.15 * au["au26"])
    y = f.mouth_y - 0.05 * au["au12"] + 0.045 * au["au15"] + 0.008 * au["au20"]
    return np.array([[-w, y], [w, y]])


def _draw_mouth(pen: _Pen, f: SyntheticFace, au: dict[str, float], corners: np.ndarray) -> None:
    left, right = corners
    gap = 0.025 * au["au25"] + 0.11 * au["au26"] + 0.012 * au["au10"]
    raise_ = 0.03 * au["au10"]
    thin = 1 - 0.6 * au["au23"]
    top_in = f.mouth_y - raise_ - 0.25 * gap
    bot_in = f.mouth_y + 0.75 * gap
    uo = _curve(left, (0, top_in - f.lip_h * thin), right)
    ui = _curve(left, (0, top_in), right)
    li = _curve(left, (0, bot_in), right)
    lo = _curve(left, (0, bot_in + 1.3 * f.lip_h * thin), right)
    pen.fill(_join(uo[0], lo[0][::-1]), _join(uo[1], lo[1][::-1]), f.lip_tone)
    if gap > 0.004:
        pen.fill(_join(ui[0], li[0][::-1]), _join(ui[1], li[1][::-1]), 25)
        teeth = min(0.35 * gap, 0.022)
        tx, ty = ui[0][2:-2], ui[1][2:-2]
        pen.fill(_join(tx, tx[::-1]), _join(ty, (ty + teeth)[::-1]), min(235.0, f.skin + 40))
    mid = ((ui[0] + li[0]) / 2, (ui[1] + li[1]) / 2)
    pen.line(*mid, f.lip_tone * (0.55 - 0.2 * au["au23"]), 0.009)
    chin_y = lo[1][6] + 0.045 + 0.3 * gap
    pen.line(*_curve((-0.04, chin_y), (0, chin_y + 0.008), (0.04, chin_y), 7), f.skin * 0.85, 0.008)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.linspace(-1, 1, size, dtype=np.float32)
    return np.meshgrid(g, g)


def _camera(img: np.ndarray, n: Nuisance, rng: np.random.Generator) -> np.ndarray:
    """Lighting gradient, contrast, blur and sensor noise on the output-size image."""
    size = img.shape[0]
    gx, gy = _grid(size)
    light = 1 + n.light * (math.cos(n.light_dir) * gx + math.sin(n.light_dir) * gy)
    out = (img.astype(np.float32) - 128) * n.contrast + 128
    out = out * light + n.brightness
    if n.blur > 0:
        out = cv2.GaussianBlur(out, (0, 0), n.blur * size / 48)
    if n.noise > 0:
        out += rng.normal(0, n.noise, out.shape).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render_face(seed: int, subject: int, expression: int, frame: int, intensity: float, size: int = 48,
                clean: bool = False) -> np.ndarray:
    """One uint8 `size` x `size` grey face; `clean` drops pose and camera nuisance (for checks)."""
    face = identity(seed, subject)
    au = action_units(face, expression, intensity)
    pose = Nuisance() if clean else nuisance(seed, subject, expression, frame)
    pen = _Pen(np.empty((size * _SUPERSAMPLE,) * 2, np.uint8), pose)
    corners = _mouth_corners(face, au)
    _draw_head(pen, face, au)
    _draw_eyes(pen, face, au)
    _draw_brows(pen, face, au)
    _draw_nose(pen, face, au, corners)
    _draw_mouth(pen, face, au, corners)
    img = cv2.resize(pen.img, (size, size), interpolation=cv2.INTER_AREA)
    if clean:
        return img
    return _camera(img, pose, np.random.default_rng((_TAG_NOISE, seed, subject, expression, frame)))


def _check(options: SourceOptions) -> None:
    """One-line errors for options the synthetic set cannot honour."""
    if options.subjects < 1:
        raise FerDistError(f"synthetic: --subjects must be at least 1, got {options.subjects}")
    if options.frames < 2:
        raise FerDistError(f"synthetic: --frames must be at least 2 (neutral and peak), got {options.frames}")
    if not 1 <= options.peak_frames < options.frames:
        raise FerDistError(f"synthetic: --peak-frames must be 1..{options.frames - 1} (frames - 1), "
                           f"got {options.peak_frames}")
    if options.image_size < 16:
        raise FerDistError(f"synthetic: --size must be at least 16, got {options.image_size}")
    if options.seed < 0:
        raise FerDistError(f"synthetic: --seed must be non-negative, got {options.seed}")


def list_records(src: list[Path], options: SourceOptions) -> Listing:
    """Every frame of every synthetic sequence; `src` is ignored (nothing is read from disk)."""
    _check(options)
    n, last = options.frames, options.frames - 1
    sub_w, frame_w = max(3, len(str(options.subjects - 1))), max(2, len(str(last)))
    records = []
    for subject in range(options.subjects):
        name = f"S{subject:0{sub_w}d}"
        for expression in EXPRESSIONS:
            sequence = f"{name}/{CLASSES[expression]}"
            for frame in range(n):
                path = f"{sequence}/frame_{frame:0{frame_w}d}.png"
                label = NEUTRAL if frame == 0 else expression if frame >= n - options.peak_frames else None
                meta = {"path": path, "subject": name, "sequence": sequence, "frame": frame, "seq_len": n,
                        "intensity": frame / last, "expression": expression}
                load = functools.partial(render_face, options.seed, subject, expression, frame, frame / last,
                                         options.image_size)
                records.append(Record(path, label, meta, load))
    return finish(records, [], [], "none")
