"""Vectorised numpy drawing of synthetic people, scenes, occluders and the camera pipeline.

Shapes are signed-distance fields on the pixel grid, so edges are anti-aliased at any image size.
Person coordinates: ``u`` horizontal and ``v`` vertical (0 = top of head, 1 = soles), both in
person heights; the person's axis is at ``u = 0``.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageFilter

from .synth_style import CAR_COLORS, CameraStyle, DomainSpec, Identity, rgb, sample_identity

F = np.float32


@lru_cache(maxsize=16)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:h, 0:w].astype(F)
    return x + F(0.5), y + F(0.5)


def _ellipse(u, v, cu, cv, a, b):
    return (np.sqrt(((u - cu) / a) ** 2 + ((v - cv) / b) ** 2) - 1.0) * min(a, b)


def _box(u, v, u0, u1, v0, v1, r=0.0):
    du = np.maximum(u0 + r - u, u - u1 + r)
    dv = np.maximum(v0 + r - v, v - v1 + r)
    outside = np.sqrt(np.maximum(du, 0) ** 2 + np.maximum(dv, 0) ** 2)
    return outside + np.minimum(np.maximum(du, dv), 0) - r


def _capsule(u, v, p0, p1, r0, r1):
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((u - p0[0]) * dx + (v - p0[1]) * dy) / (dx * dx + dy * dy + 1e-9), 0.0, 1.0)
    return np.sqrt((u - p0[0] - t * dx) ** 2 + (v - p0[1] - t * dy) ** 2) - (r0 + (r1 - r0) * t)


def _trapezoid(u, v, cu, v0, v1, w0, w1):
    t = np.clip((v - v0) / (v1 - v0), 0.0, 1.0)
    return np.maximum(np.abs(u - cu) - (w0 + (w1 - w0) * t), np.maximum(v0 - v, v - v1))


def _shape(u, v, kind, cu, cv, s):
    """Logo / print shapes centred at (cu, cv) with size ``s``."""
    if kind == "circle":
        return _ellipse(u, v, cu, cv, s, s)
    if kind == "square":
        return _box(u, v, cu - s, cu + s, cv - s, cv + s)
    if kind == "diamond":
        return (np.abs(u - cu) + np.abs(v - cv) - 1.3 * s) * 0.7
    if kind == "bar":
        return _box(u, v, cu - 1.3 * s, cu + 1.3 * s, cv - 0.45 * s, cv + 0.45 * s)
    return np.abs(_ellipse(u, v, cu, cv, s, s)) - 0.3 * s  # ring


def _darker(c, k=0.7):
    return tuple(x * k for x in c)


# Shapes: (signed distance function of (u, v), bounding box (u0, u1, v0, v1)).
def _sh_ellipse(cu, cv, a, b):
    return (lambda u, v: _ellipse(u, v, cu, cv, a, b)), (cu - a, cu + a, cv - b, cv + b)


def _sh_box(u0, u1, v0, v1, r=0.0):
    u0, u1 = min(u0, u1), max(u0, u1)
    return (lambda u, v: _box(u, v, u0, u1, v0, v1, r)), (u0, u1, v0, v1)


def _sh_capsule(p0, p1, r0, r1):
    r = max(r0, r1)
    box = (min(p0[0], p1[0]) - r, max(p0[0], p1[0]) + r, min(p0[1], p1[1]) - r, max(p0[1], p1[1]) + r)
    return (lambda u, v: _capsule(u, v, p0, p1, r0, r1)), box


def _sh_trapezoid(cu, v0, v1, w0, w1):
    m = max(w0, w1)
    return (lambda u, v: _trapezoid(u, v, cu, v0, v1, w0, w1)), (cu - m, cu + m, v0, v1)


class _Layer:
    """Premultiplied RGBA person layer painted back to front; each shape touches only its bounding box."""

    def __init__(self, h: int, w: int, cx: float, top: float, height: float, aspect: float):
        self.rgb = np.zeros((h, w, 3), F)
        self.alpha = np.zeros((h, w), F)
        self.u = ((np.arange(w, dtype=F) + F(0.5) - F(cx)) / F(height * aspect))
        self.v = ((np.arange(h, dtype=F) + F(0.5) - F(top)) / F(height))
        self.inv_aa = F(height)
        self.margin = 1.5 / height

    def paint(self, shape, color, vmin: float = -1e9, vmax: float = 1e9) -> None:
        """Paint ``shape`` in ``color`` (RGB or a function of (u, v)), only on rows with vmin <= v < vmax."""
        fn, (u0, u1, v0, v1) = shape
        m = self.margin
        r0 = int(np.searchsorted(self.v, max(v0 - m, vmin)))
        r1 = int(np.searchsorted(self.v, min(v1 + m, vmax)))
        c0 = int(np.searchsorted(self.u, u0 - m * 2))
        c1 = int(np.searchsorted(self.u, u1 + m * 2))
        if r1 <= r0 or c1 <= c0:
            return
        uu, vv = self.u[None, c0:c1], self.v[r0:r1, None]
        a = np.clip(F(0.5) - fn(uu, vv) * self.inv_aa, F(0.0), F(1.0))[..., None]
        col = color(uu, vv) if callable(color) else np.asarray(color, F)
        sub = self.rgb[r0:r1, c0:c1]
        sub *= F(1.0) - a
        sub += a * col
        al = self.alpha[r0:r1, c0:c1]
        al += a[..., 0] * (F(1.0) - al)


def _upper_color(who: Identity, view: str, top: float):
    """Colour of the upper garment as a function of (u, v): patterns, front logo, back print."""
    c1, c2 = np.asarray(who.upper, F), np.asarray(who.upper2, F)
    p, per = who.pattern, who.period
    if p == "plain" or (p == "logo" and view != "front") or (p == "backprint" and view != "back"):
        return c1

    def field(u, v):
        if p == "hstripes":
            m = ((v - top) / per % 1.0) < 0.5
        elif p == "vstripes":
            m = (u / per + 0.25) % 1.0 < 0.5
        elif p == "checks":
            m = (((v - top) / (1.3 * per) % 1.0) < 0.5) ^ ((u / (1.3 * per) + 0.25) % 1.0 < 0.5)
        elif p == "twotone":
            m = v > who.hip - 0.14 + 0 * u
        elif p == "logo":
            m = _shape(u, v, who.logo, 0.0, top + 0.1, 0.042) < 0
        else:  # back print: a big shape on the back
            m = _shape(u, v, who.logo, 0.0, top + 0.13, 0.07) < 0
        return np.where(m[..., None], c2, c1)

    return field


def draw_person(canvas: np.ndarray, who: Identity, view: str, phase: float, cx: float, top: float,
                height: float, aspect: float = 1.0, light: float = 0.0, shadow: bool = True) -> None:
    """Paint ``who`` seen from ``view`` onto ``canvas`` (H,W,3 float) with its head top at ``top`` px."""
    h, w = canvas.shape[:2]
    L = _Layer(h, w, cx, top, height, aspect)
    if shadow:
        fn, _ = _sh_ellipse(0.0, 1.0, 0.17, 0.025)
        d = fn(L.u[None, :], L.v[:, None])
        canvas *= (1.0 - 0.35 * np.clip(0.5 - d * height / 2.0, 0.0, 1.0))[..., None]
    side = view in ("left", "right")
    face = -1.0 if view == "left" else 1.0  # facing direction in the image for side views
    ws = who.build * (0.62 if side else 1.0)
    wh = ws * 0.84
    hip, sh, hv, hr = who.hip, 0.16, 0.075, who.head
    s, c = math.sin(phase), math.cos(phase)
    upper = _upper_color(who, view, sh)
    lower, skin = who.lower, who.skin
    bare = {"trousers": 2.0, "shorts": 0.66, "skirt": 0.7}[who.lower_kind]  # legs bare below this height
    if who.coat and who.lower_kind == "skirt":
        bare = 0.74
    bag_vis = who.bag_side if view == "front" else -who.bag_side  # image side of the bag (front/back)
    bag_near = side and ((view == "left") == (who.bag_side > 0))  # side bag faces the camera

    # Things behind the body.
    if who.hair_long and view != "back":
        L.paint(_sh_box(-hr * 0.95, hr * 0.95, hv, sh + 0.07, 0.02) if not side
                else _sh_box(-face * hr * 0.9 - 0.02 * face, -face * hr * 0.1, hv, sh + 0.07, 0.02), who.hair)
    if who.bag == "backpack" and view == "front":
        L.paint(_sh_box(-ws - 0.012, ws + 0.012, sh + 0.03, hip - 0.06, 0.02), _darker(who.bag_color))
    if who.bag in ("shoulder", "handbag") and side and not bag_near:
        L.paint(_sh_box(-0.05, 0.05, 0.43, 0.55, 0.012), _darker(who.bag_color, 0.6))

    # Legs and shoes.
    knee = 0.73
    if side:
        for sign, shade in ((-1.0, 0.75), (1.0, 1.0)):
            sw = 0.16 * s * sign
            hip_p = (0.0, hip + 0.02)
            foot = (face * sw, 0.955 - 0.015 * max(0.0, -sign * c))
            k = (face * sw * 0.55 + face * 0.02, knee)
            col, sk = _darker(lower, shade), _darker(skin, shade)
            for p0, p1, r0, r1 in ((hip_p, k, 0.05, 0.042), (k, foot, 0.042, 0.034)):
                leg = _sh_capsule(p0, p1, r0, r1)
                L.paint(leg, col, vmax=bare)
                L.paint(leg, sk, vmin=bare)
            shoe = _sh_ellipse(foot[0] + face * 0.025, foot[1] + 0.022, 0.055, 0.022)
            L.paint(shoe, _darker(who.shoes, shade))
    else:
        for sign in (-1.0, 1.0):
            lift = 0.018 * max(0.0, sign * s)
            x0, x1 = sign * 0.045, sign * (0.05 + 0.01 * c)
            leg = _sh_capsule((x0, hip + 0.02), (x1, 0.955 - lift), 0.048, 0.036)
            L.paint(leg, lower, vmax=bare)
            L.paint(leg, skin, vmin=bare)
            L.paint(_sh_ellipse(x1, 0.977 - lift, 0.045, 0.024), who.shoes)
    if who.lower_kind == "skirt":
        L.paint(_sh_trapezoid(0.0, hip - 0.02, 0.7, wh, wh * (1.25 if side else 1.55)), lower)
    elif not side:
        L.paint(_sh_box(-wh, wh, hip - 0.02, hip + 0.08, 0.01), lower)  # hips

    # Torso (and coat), neck, shoulders, scarf.
    L.paint(_sh_trapezoid(0.0, sh, hip + 0.01, ws, wh), upper)
    if who.coat:
        L.paint(_sh_trapezoid(0.0, hip - 0.05, 0.74, wh, wh * 1.3), upper)
    L.paint(_sh_box(-0.022, 0.022, hv + hr * 0.6, sh + 0.01), skin)
    L.paint(_sh_ellipse(0.0, sh + 0.012, ws * 0.95, 0.03), upper)

    # Bags in front of the torso.
    if who.bag == "backpack":
        if view == "back":
            L.paint(_sh_box(-ws * 0.82, ws * 0.82, sh + 0.03, hip - 0.06, 0.025), who.bag_color)
            L.paint(_sh_box(-ws * 0.6, ws * 0.6, hip - 0.16, hip - 0.09, 0.01), _darker(who.bag_color))
        elif side:
            L.paint(_sh_box(-face * ws, -face * (ws + 0.08), sh + 0.03, hip - 0.07, 0.02), who.bag_color)
            L.paint(_sh_box(-0.012, 0.012, sh, sh + 0.17), _darker(who.bag_color, 0.5))
        else:
            for sign in (-1.0, 1.0):
                L.paint(_sh_box(sign * ws * 0.55 - 0.011, sign * ws * 0.55 + 0.011, sh - 0.005, sh + 0.2),
                        _darker(who.bag_color, 0.6))
    if who.bag == "shoulder" and not side:
        L.paint(_sh_capsule((-bag_vis * ws * 0.6, sh), (bag_vis * (wh + 0.02), 0.44), 0.008, 0.008),
                _darker(who.bag_color, 0.5))
    if who.scarf is not None:
        L.paint(_sh_box(-ws * 0.6, ws * 0.6, 0.125, 0.175, 0.015), who.scarf)
        if view == "front":
            L.paint(_sh_box(0.01, 0.045, 0.15, 0.3, 0.008), who.scarf)

    # Arms.
    sleeve_end = 0.31 if who.short_sleeves else 0.46
    arms = [(face * 0.09 * -s, 0.47, 0.0)] if side else [
        (sign * (ws + 0.018), 0.47 + 0.01 * sign * s, sign * (ws - 0.012)) for sign in (-1.0, 1.0)]
    for hu, hvv, su in arms:
        arm = _sh_capsule((su, sh + 0.025), (hu, hvv), 0.033, 0.027)
        L.paint(arm, upper, vmax=sleeve_end)
        L.paint(arm, skin, vmin=sleeve_end)
        L.paint(_sh_ellipse(hu, hvv + 0.025, 0.024, 0.027), skin)
    if who.bag == "shoulder" and (not side or bag_near):
        bu = bag_vis * (wh + 0.035) if not side else face * 0.01
        L.paint(_sh_box(bu - 0.05, bu + 0.05, 0.42, 0.55, 0.012), who.bag_color)
        if side:
            L.paint(_sh_box(-0.01, 0.01, sh, 0.43), _darker(who.bag_color, 0.5))
    if who.bag == "handbag" and (not side or bag_near):
        bu = bag_vis * (ws + 0.03) if not side else face * 0.02
        L.paint(_sh_box(bu - 0.04, bu + 0.04, 0.51, 0.6, 0.01), who.bag_color)

    # Head, hair, hat.
    if view == "back":
        L.paint(_sh_ellipse(0.0, hv, hr * 0.82, hr), who.hair)
        if who.hair_long:
            L.paint(_sh_box(-hr * 0.95, hr * 0.95, hv, sh + 0.08, 0.02), who.hair)
    elif side:
        L.paint(_sh_ellipse(face * 0.006, hv, hr * 0.85, hr), skin)

        def hair(u, v):
            back = np.maximum(_ellipse(u, v, 0.0, hv - 0.004, hr * 0.86, hr * 1.02), face * u - hr * 0.15)
            return np.minimum(back, _ellipse(u, v, 0.0, hv - hr * 0.35, hr * 0.86, hr * 0.68))

        L.paint((hair, (-hr, hr, hv - hr * 1.1, hv + hr * 1.1)), who.hair)
    else:
        L.paint(_sh_ellipse(0.0, hv, hr * 0.85, hr), who.hair)
        L.paint(_sh_ellipse(0.0, hv + hr * 0.2, hr * 0.74, hr * 0.82), skin)
    if who.hat is not None:
        L.paint(_sh_ellipse(0.0, hv - hr * 0.45, hr * 0.92, hr * 0.62), who.hat, vmax=hv - hr * 0.15)
        if side:
            L.paint(_sh_box(0.0, face * hr * 1.5, hv - hr * 0.28, hv - hr * 0.14), _darker(who.hat))

    # Cylindrical shading plus a sideways light, then composite.
    x = np.clip(L.u / F(ws + 0.03), F(-1.0), F(1.0))[None, :]
    shade = (F(1.0) - F(0.28) * x * x + F(light) * x) * (F(1.05) - F(0.1) * L.v[:, None])
    canvas *= (F(1.0) - L.alpha)[..., None]
    canvas += L.rgb * shade[..., None]


def _value_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth noise in [-1, 1] with features about ``cell`` pixels wide."""
    small = rng.uniform(-1.0, 1.0, (max(2, int(h / cell) + 2), max(2, int(w / cell) + 2))).astype(F)
    return np.asarray(Image.fromarray(small, mode="F").resize((w, h), Image.BICUBIC), F).clip(-1, 1)


def _jit(rng, c, k=0.08):
    return np.clip(np.asarray(c, F) * (1 + rng.normal(0, k, 3)), 0, 1).astype(F)


def _fill(img, x0, x1, y0, y1, color):
    h, w = img.shape[:2]
    x0, x1 = max(0, int(x0)), min(w, int(x1))
    y0, y1 = max(0, int(y0)), min(h, int(y1))
    if x1 > x0 and y1 > y0:
        img[y0:y1, x0:x1] = color


def make_panorama(cam: CameraStyle, h: int, w: int) -> np.ndarray:
    """The camera's fixed background: an (h, 4w, 3) float scene a crop window slides over."""
    rng = np.random.default_rng(cam.scene_seed)
    pw = 4 * w
    x = (np.arange(pw, dtype=F) / h)[None, :]
    y = (np.arange(h, dtype=F) / h)[:, None]
    hz = float(rng.uniform(0.38, 0.6))
    img = np.zeros((h, pw, 3), F)
    wall, ground = y < hz, ~(y < hz)
    tex = _value_noise(rng, h, pw, h / 10)[..., None]
    fine = _value_noise(rng, h, pw, 2.0)[..., None]
    depth = np.maximum(y - hz, 1e-3)
    vx = float(rng.uniform(0.3, 0.7)) * pw / h
    tiles = (((0.09 / depth) % 1.0) < 0.08) | ((((x - vx) / depth * 0.5) % 1.0) < 0.06)
    kind = cam.scene
    if kind in ("pavement", "shopfront", "greenery", "indoor"):
        base = {"pavement": ("light_grey", "beige"), "shopfront": ("grey", "light_grey"),
                "greenery": ("beige", "khaki"), "indoor": ("cream", "light_grey")}[kind]
        gcol = _jit(rng, rgb(base[int(rng.integers(2))]))
        gimg = gcol * (1 + 0.08 * tex + 0.04 * fine) * np.where(tiles[..., None], 0.85, 1.0)
    elif kind == "snow":
        slush = (_value_noise(rng, h, pw, h / 6) > 0.15)[..., None]
        snow = _jit(rng, (0.9, 0.92, 0.95), 0.03)
        gimg = np.where(slush, _jit(rng, (0.45, 0.45, 0.47)), snow) * (1 + 0.05 * fine)
    else:  # brick, street: asphalt
        gimg = _jit(rng, (0.3, 0.3, 0.32)) * (1 + 0.12 * tex + 0.08 * fine)
        if kind == "street":
            lane = (np.abs(y - hz - 0.25) < 0.012) & ((x * 2.0) % 1.0 < 0.6)
            gimg = np.where(lane[..., None], np.asarray((0.85, 0.82, 0.6), F), gimg)
    img[:] = np.where(ground[..., None], gimg, 0)

    if kind == "pavement":
        wcol = _jit(rng, rgb(["cream", "white", "light_grey", "beige"][int(rng.integers(4))]))
        wimg = wcol * (1 + 0.05 * tex)
        win = (((x * 2.2) % 1.0) < 0.55) & (((y / max(hz, 0.1) * 3.0) % 1.0) > 0.35)
        wimg = np.where(win[..., None], _jit(rng, (0.25, 0.3, 0.36)) * (1 + 0.2 * tex), wimg)
    elif kind == "greenery":
        sky = _jit(rng, (0.82, 0.88, 0.92), 0.04)
        leaves = _value_noise(rng, h, pw, h / 14) + 0.6 * _value_noise(rng, h, pw, h / 40)
        canopy = (leaves > -0.3 + 1.2 * (y / hz - 0.6))[..., None]
        wimg = np.where(canopy, _jit(rng, (0.2, 0.38, 0.16)) * (1 + 0.35 * fine), sky)
        grass = (y > hz) & (y < hz + 0.08 + 0.04 * tex[..., 0])
        img[:] = np.where(grass[..., None], _jit(rng, (0.3, 0.55, 0.22)) * (1 + 0.2 * fine), img)
    elif kind == "shopfront":
        glass = _jit(rng, (0.42, 0.5, 0.56)) * (1 + 0.25 * np.sin(6.0 * (x + y))[..., None] + 0.1 * tex)
        frame = ((x * 1.6) % 1.0) < 0.05
        wimg = np.where(frame[..., None], _jit(rng, (0.2, 0.2, 0.22)), glass)
        sign = y < hz * 0.22
        wimg = np.where(sign[..., None], _jit(rng, rgb(["red", "blue", "green", "orange", "navy"][
            int(rng.integers(5))])), wimg)
    elif kind == "brick":
        row = np.floor(y / 0.035)
        off = (row % 2) * 0.5
        bid = np.floor(x / 0.08 + off)
        mortar = ((y / 0.035) % 1.0 < 0.12) | (((x / 0.08 + off) % 1.0) < 0.08)
        tint = 1 + 0.12 * np.sin(bid * 12.9898 + row * 78.233)[..., None]
        wimg = np.where(mortar[..., None], _jit(rng, (0.62, 0.6, 0.56)), _jit(rng, (0.52, 0.26, 0.2)) * tint)
    elif kind == "street":
        wimg = np.zeros((h, pw, 3), F)
        pos = 0.0
        while pos < pw / h:
            seg = float(rng.uniform(0.5, 1.5))
            facade = ("beige", "grey", "brown", "cream", "dark_grey", "khaki")[int(rng.integers(6))]
            col = _jit(rng, rgb(facade))
            band = (x >= pos) & (x < pos + seg)
            wimg = np.where(band[..., None], col * (1 + 0.06 * tex), wimg)
            pos += seg
        win = (((x * 3.0) % 1.0) < 0.4) & (((y * 6.0) % 1.0) < 0.5)
        wimg = np.where(win[..., None], wimg * 0.45, wimg)
    elif kind == "snow":
        sky = _jit(rng, (0.72, 0.74, 0.78), 0.03)
        wimg = np.broadcast_to(sky, (h, pw, 3)).copy()
        for tx in rng.uniform(0, pw / h, int(rng.integers(3, 7))):
            branch = np.abs((x - tx) - 0.5 * (hz - y) * np.sign(np.sin((y * 40 + tx) * 3))) < 0.005
            trunk = (np.abs(x - tx) < 0.012 + 0.02 * (y / hz)) | (branch & (y < 0.7 * hz))
            wimg = np.where(trunk[..., None], _jit(rng, (0.2, 0.17, 0.15)), wimg)
    else:  # indoor
        wimg = _jit(rng, rgb(["cream", "light_grey", "beige", "mint", "light_blue"][int(rng.integers(5))]))
        wimg = wimg * (1 + 0.04 * tex) * (1 + 0.25 * np.clip(1 - y / 0.12, 0, 1))[..., None]
        skirting = (y > hz - 0.04) & (y < hz)
        wimg = np.where(skirting[..., None], _jit(rng, (0.3, 0.28, 0.26)), wimg)
    img[:] = np.where(wall[..., None], wimg, img)

    # Clutter: doors, posters, bins, signs, parked cars in the street.
    for _ in range(int(rng.integers(2, 7))):
        cx, cw = rng.uniform(0, pw), rng.uniform(0.05, 0.25) * h
        ch = rng.uniform(0.08, 0.35) * h
        y1 = hz * h + rng.uniform(-0.05, 0.1) * h
        _fill(img, cx, cx + cw, y1 - ch, y1, _jit(rng, rgb(list(CAR_COLORS + ("red", "yellow", "green"))[
            int(rng.integers(11))]), 0.1))
    if kind == "street":
        for cx in np.cumsum(rng.uniform(0.8, 1.8, 6)) * h:
            y1 = hz * h + 0.04 * h
            col = _jit(rng, rgb(CAR_COLORS[int(rng.integers(len(CAR_COLORS)))]))
            _fill(img, cx, cx + 0.7 * h, y1 - 0.16 * h, y1, col)
            _fill(img, cx + 0.12 * h, cx + 0.55 * h, y1 - 0.25 * h, y1 - 0.15 * h, col * 0.4)
    return np.clip(img, 0, 1).astype(F)


def draw_occluders(canvas: np.ndarray, cam: CameraStyle, rng: np.random.Generator, window: float) -> None:
    """Poles fixed in the scene (seen when the crop window passes them) and a car in front."""
    h, w = canvas.shape[:2]
    for p in cam.poles:
        px = (4.0 * p - 3.0 * window) * w
        if -0.1 * w < px < 1.1 * w:
            pw = 0.07 * w + 0.03 * w * (p * 7 % 1)
            _fill(canvas, px, px + pw, 0, h, np.asarray(cam.pole_color, F))
            _fill(canvas, px + 0.2 * pw, px + 0.4 * pw, 0, h, np.asarray(cam.pole_color, F) * 1.3)
    if rng.random() < cam.car:
        col = _jit(rng, rgb(CAR_COLORS[int(rng.integers(len(CAR_COLORS)))]))
        y0 = h * rng.uniform(0.55, 0.78)
        left = rng.random() < 0.5
        x1 = w * rng.uniform(0.4, 1.0)
        xa, xb = (-1, x1) if left else (w - x1, w + 1)
        gx, gy = _grid(h, w)
        body = _box(gx, gy, xa, xb, y0, h + 20, 0.08 * h)
        a = np.clip(0.5 - body, 0, 1)[..., None]
        canvas *= 1 - a
        canvas += a * col * (1.1 - 0.3 * (gy - y0) / (h - y0 + 1))[..., None]
        _fill(canvas, xa + 0.1 * w, xb - 0.1 * w, y0 + 0.03 * h, y0 + 0.1 * h, col * 0.35)


@lru_cache(maxsize=4)
def _noise_bank(h: int, w: int) -> np.ndarray:
    """A fixed field of sensor noise (luma in channel 3); images take random shifted windows of it."""
    return np.random.default_rng(12345).standard_normal((2 * h, 2 * w, 4), dtype=F)


def camera_pipeline(canvas: np.ndarray, cam: CameraStyle, rng: np.random.Generator, quality: int | None = None
                    ) -> bytes:
    """Saturation, light and white balance, tone curve, sensor resolution, optics blur, noise, JPEG bytes."""
    h, w = canvas.shape[:2]
    gray = (canvas @ np.full(3, 1.0 / 3.0, F))[..., None]
    img = canvas * F(cam.saturation) + gray * F(1.0 - cam.saturation)
    pil = Image.fromarray((np.clip(img, 0.0, 1.0) * F(255.0) + F(0.5)).astype(np.uint8))
    gain = cam.gain * math.exp(rng.normal(0.0, 0.06))
    ramp = np.arange(256) / 255.0
    lut = np.concatenate([np.clip(ramp * gain * c, 0.0, 1.0) ** cam.gamma for c in cam.cast])
    pil = pil.point((lut * 255.0 + 0.5).astype(np.uint8).tolist())
    if cam.resolution < 0.98:
        small = (max(4, round(w * cam.resolution)), max(8, round(h * cam.resolution)))
        pil = pil.resize(small, Image.BOX).resize((w, h), Image.BILINEAR)
    sigma = cam.blur * h / 128.0 * float(rng.uniform(0.8, 1.25))
    if sigma > 0.2:
        pil = pil.filter(ImageFilter.BoxBlur(1.2 * sigma))
    arr = np.asarray(pil, F)
    bank = _noise_bank(h, w)
    r, c = int(rng.integers(h)), int(rng.integers(w))
    noise = bank[r:r + h, c:c + w]
    n = F(cam.noise * 255.0)
    arr = arr + noise[..., :3] * n + noise[..., 3:] * (F(0.6) * n)
    out = Image.fromarray(np.clip(arr + F(0.5), 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=quality or cam.jpeg)
    return buf.getvalue()


def render_image(who: Identity, view: str, cam: CameraStyle, spec: DomainSpec, panorama: np.ndarray,
                 window: float, rng: np.random.Generator) -> bytes:
    """One JPEG crop of ``who`` in camera ``cam``; ``window`` is the crop's place in the panorama (0..1)."""
    h = panorama.shape[0]
    w = panorama.shape[1] // 4
    x0 = int(round(window * 3 * w))
    canvas = panorama[:, x0:x0 + w].copy()
    canvas *= F(math.exp(rng.normal(0.0, 0.05)))
    j = cam.jitter
    height = h * 0.9 * math.exp(rng.normal(0.0, j))
    aspect = 0.85 * math.exp(rng.normal(0.0, 0.08)) * (w / h) / 0.5  # boxes resized to 2:1 widen people
    cx = w / 2 + rng.normal(0.0, j) * w * 0.6
    top = (h - height) / 2 + rng.normal(0.0, j) * h * 0.4
    if rng.random() < cam.cut:
        top += (1 if rng.random() < 0.5 else -1) * rng.uniform(0.06, 0.16) * h
    phase = float(rng.uniform(0, 2 * math.pi))
    crowd = rng.random() < cam.crowd
    if crowd:
        other = sample_identity(rng, spec)
        ov = ("front", "back", "left", "right")[int(rng.choice(4, p=cam.views))]
        ox = cx + (1 if rng.random() < 0.5 else -1) * rng.uniform(0.5, 0.8) * w
        oh = height * rng.uniform(0.9, 1.1)
        in_front = rng.random() < 0.4
        if not in_front:
            draw_person(canvas, other, ov, phase + 1.0, ox, top + rng.normal(0, 0.03) * h, oh, aspect)
    draw_person(canvas, who, view, phase, cx, top, height, aspect, cam.light_side)
    if crowd and in_front:
        draw_person(canvas, other, ov, phase + 2.0, ox, top + rng.normal(0, 0.03) * h, oh, aspect)
    draw_occluders(canvas, cam, rng, window)
    return camera_pipeline(np.clip(canvas, 0.0, 1.0), cam, rng)
