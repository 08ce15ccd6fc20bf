"""What the synthetic world looks like: palettes, domain specs, identity and camera-style sampling."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

RGB = tuple[float, float, float]

# A few dozen clothing colours shared by all domains; each domain weights them differently.
COLORS: dict[str, tuple[int, int, int]] = {
    "white": (238, 238, 234), "cream": (228, 218, 192), "light_grey": (178, 180, 182),
    "grey": (122, 122, 126), "dark_grey": (72, 72, 76), "charcoal": (48, 50, 56), "black": (24, 24, 28),
    "navy": (28, 38, 84), "blue": (38, 82, 172), "light_blue": (132, 172, 222), "sky": (76, 178, 214),
    "teal": (28, 118, 120), "dark_green": (30, 78, 44), "green": (58, 150, 72), "olive": (98, 104, 48),
    "lime": (162, 204, 58), "yellow": (236, 212, 48), "mustard": (198, 158, 38), "orange": (236, 128, 38),
    "red": (202, 34, 40), "burgundy": (108, 24, 40), "pink": (236, 152, 182), "hot_pink": (222, 58, 142),
    "purple": (108, 48, 140), "lavender": (172, 152, 212), "brown": (112, 70, 40),
    "dark_brown": (64, 44, 30), "khaki": (188, 164, 118), "beige": (210, 194, 164), "denim": (68, 94, 142),
    "light_denim": (120, 146, 182), "coral": (240, 118, 98), "mint": (150, 220, 188), "camel": (180, 130, 70),
    "rust": (160, 70, 34),
}
SKINS: dict[str, tuple[int, int, int]] = {
    "pale": (238, 204, 180), "light": (224, 180, 148), "medium": (198, 148, 108),
    "tan": (164, 112, 74), "dark": (104, 68, 46),
}
HAIRS: dict[str, tuple[int, int, int]] = {
    "black": (22, 20, 20), "dark_brown": (52, 36, 26), "brown": (96, 64, 38), "blonde": (200, 168, 104),
    "grey": (150, 148, 146), "auburn": (124, 52, 28),
}
CAR_COLORS = ("white", "light_grey", "grey", "black", "navy", "red", "dark_grey", "blue")
PATTERNS = ("plain", "hstripes", "vstripes", "checks", "twotone", "logo", "backprint")
BAGS = ("none", "backpack", "shoulder", "handbag")
LOWER_KINDS = ("trousers", "shorts", "skirt")
LOGO_SHAPES = ("circle", "square", "diamond", "bar", "ring")
SCENES = ("pavement", "greenery", "shopfront", "brick", "street", "snow", "indoor")
VIEWS = ("front", "back", "left", "right")


def rgb(name: str, table: dict[str, tuple[int, int, int]] = COLORS) -> RGB:
    r, g, b = table[name]
    return (r / 255.0, g / 255.0, b / 255.0)


@dataclass(frozen=True)
class DomainSpec:
    """Distributions of one domain: clothing, people, camera styles and the camera network."""

    name: str
    description: str
    num_cameras: int
    upper_colors: dict[str, float]
    lower_colors: dict[str, float]
    skins: dict[str, float]
    hairs: dict[str, float]
    lower_kinds: dict[str, float]
    patterns: dict[str, float]
    bags: dict[str, float]
    short_sleeves: float
    coat: float
    hat: float
    scarf: float
    confuser: float  # chance that an identity copies an earlier one but for one local detail
    scenes: dict[str, float]
    gain: tuple[float, float]  # median brightness gain, log-spread over cameras
    cast: RGB  # mean colour cast (white balance) of the network
    cast_spread: float
    saturation: tuple[float, float]
    gamma: tuple[float, float]
    blur: tuple[float, float]  # Gaussian sigma in pixels at 128 rows
    noise: tuple[float, float]  # sensor noise std (0..1 intensity)
    resolution: tuple[float, float]  # effective sensor resolution relative to the crop size
    jpeg: tuple[int, int]
    side_view: tuple[float, float]  # range over cameras of P(side view)
    jitter: float  # std of box scale/shift
    cut: float  # P(crop cuts the head or the feet)
    poles: tuple[int, int]
    car: float
    crowd: float  # P(another person overlaps the box)
    area: tuple[float, float]  # size of the camera network in metres


DOMAINS: dict[str, DomainSpec] = {
    "A": DomainSpec(
        name="A",
        description="sunny summer campus (Market-like): bright warm light, pale pavement, lawns and shop "
        "windows, vivid clothes, shorts and skirts common, low-resolution blurry cameras",
        num_cameras=6,
        upper_colors={
            "white": 3.0, "black": 2.0, "grey": 1.2, "light_grey": 1.0, "red": 1.5, "blue": 1.2,
            "light_blue": 1.2, "yellow": 1.0, "pink": 1.0, "orange": 0.8, "green": 1.0, "lime": 0.5,
            "navy": 1.0, "purple": 0.6, "hot_pink": 0.5, "mint": 0.5, "coral": 0.6, "sky": 0.6, "teal": 0.4,
            "beige": 0.5, "mustard": 0.4, "lavender": 0.4, "burgundy": 0.3, "dark_green": 0.3, "khaki": 0.3,
        },
        lower_colors={
            "denim": 3.0, "light_denim": 2.0, "black": 2.5, "grey": 1.0, "khaki": 1.2, "white": 0.8,
            "navy": 1.0, "beige": 0.6, "dark_grey": 0.8, "brown": 0.3, "light_grey": 0.5, "olive": 0.3,
            "red": 0.2, "pink": 0.2,
        },
        skins={"pale": 1.0, "light": 2.0, "medium": 2.0, "tan": 1.0, "dark": 0.5},
        hairs={"black": 4.0, "dark_brown": 2.0, "brown": 1.0, "blonde": 0.4, "grey": 0.3, "auburn": 0.3},
        lower_kinds={"trousers": 0.5, "shorts": 0.35, "skirt": 0.15},
        patterns={"plain": 0.45, "hstripes": 0.12, "vstripes": 0.05, "checks": 0.08, "twotone": 0.06,
                  "logo": 0.18, "backprint": 0.06},
        bags={"none": 0.4, "backpack": 0.3, "shoulder": 0.2, "handbag": 0.1},
        short_sleeves=0.7, coat=0.04, hat=0.12, scarf=0.02, confuser=0.3,
        scenes={"pavement": 0.35, "greenery": 0.3, "shopfront": 0.35},
        gain=(1.08, 0.12), cast=(1.06, 1.0, 0.9), cast_spread=0.04, saturation=(1.0, 1.25),
        gamma=(0.9, 1.05), blur=(0.5, 1.1), noise=(0.012, 0.03), resolution=(0.5, 0.8), jpeg=(70, 88),
        side_view=(0.1, 0.45), jitter=0.05, cut=0.12, poles=(0, 2), car=0.03, crowd=0.12,
        area=(260.0, 180.0),
    ),
    "B": DomainSpec(
        name="B",
        description="overcast winter streets (Duke-like): dim cool light, brick, asphalt and snow, parked "
        "cars, dark coats and long trousers, sharper higher-resolution cameras",
        num_cameras=6,
        upper_colors={
            "black": 4.0, "charcoal": 2.0, "dark_grey": 2.0, "navy": 2.0, "grey": 1.2, "dark_brown": 1.0,
            "brown": 1.0, "camel": 1.0, "burgundy": 1.0, "olive": 1.0, "dark_green": 1.0, "rust": 0.6,
            "beige": 0.8, "white": 1.0, "red": 0.8, "blue": 0.6, "khaki": 0.6, "purple": 0.3, "mustard": 0.4,
            "teal": 0.4, "light_grey": 0.6, "denim": 0.4, "cream": 0.5, "orange": 0.2, "light_blue": 0.3,
        },
        lower_colors={
            "black": 3.0, "denim": 2.0, "dark_grey": 1.5, "charcoal": 1.5, "navy": 1.2, "khaki": 0.6,
            "brown": 0.6, "grey": 0.8, "light_denim": 0.5, "olive": 0.4, "dark_brown": 0.4, "camel": 0.3,
            "beige": 0.3,
        },
        skins={"pale": 2.0, "light": 2.0, "medium": 1.0, "tan": 0.6, "dark": 1.0},
        hairs={"black": 2.0, "dark_brown": 2.0, "brown": 1.5, "blonde": 1.0, "grey": 0.5, "auburn": 0.4},
        lower_kinds={"trousers": 0.86, "shorts": 0.02, "skirt": 0.12},
        patterns={"plain": 0.58, "hstripes": 0.06, "vstripes": 0.03, "checks": 0.1, "twotone": 0.07,
                  "logo": 0.1, "backprint": 0.06},
        bags={"none": 0.35, "backpack": 0.35, "shoulder": 0.2, "handbag": 0.1},
        short_sleeves=0.08, coat=0.45, hat=0.3, scarf=0.25, confuser=0.3,
        scenes={"brick": 0.35, "street": 0.4, "snow": 0.25},
        gain=(0.8, 0.15), cast=(0.92, 0.98, 1.08), cast_spread=0.05, saturation=(0.7, 0.9),
        gamma=(1.0, 1.2), blur=(0.0, 0.5), noise=(0.008, 0.02), resolution=(0.8, 1.0), jpeg=(84, 95),
        side_view=(0.2, 0.55), jitter=0.07, cut=0.18, poles=(0, 3), car=0.18, crowd=0.2,
        area=(320.0, 220.0),
    ),
    "C": DomainSpec(
        name="C",
        description="indoor station at night: dim sodium-yellow light, tiled floors and plain walls, heavy "
        "sensor noise, low resolution, mixed clothing",
        num_cameras=5,
        upper_colors={
            "black": 2.5, "white": 2.0, "grey": 1.5, "navy": 1.5, "blue": 1.0, "red": 1.0, "green": 0.6,
            "dark_grey": 1.2, "brown": 0.8, "beige": 0.8, "light_blue": 0.6, "yellow": 0.4, "pink": 0.4,
            "purple": 0.4, "olive": 0.4, "orange": 0.3, "camel": 0.4, "burgundy": 0.5, "teal": 0.3,
        },
        lower_colors={
            "black": 3.0, "denim": 2.5, "grey": 1.0, "khaki": 0.8, "navy": 1.0, "dark_grey": 1.0,
            "light_denim": 1.0, "brown": 0.5, "beige": 0.4, "white": 0.3,
        },
        skins={"pale": 1.0, "light": 2.0, "medium": 2.0, "tan": 1.0, "dark": 1.0},
        hairs={"black": 3.0, "dark_brown": 2.0, "brown": 1.0, "blonde": 0.5, "grey": 0.5, "auburn": 0.2},
        lower_kinds={"trousers": 0.75, "shorts": 0.1, "skirt": 0.15},
        patterns={"plain": 0.5, "hstripes": 0.1, "vstripes": 0.05, "checks": 0.1, "twotone": 0.07,
                  "logo": 0.12, "backprint": 0.06},
        bags={"none": 0.4, "backpack": 0.3, "shoulder": 0.2, "handbag": 0.1},
        short_sleeves=0.35, coat=0.2, hat=0.15, scarf=0.1, confuser=0.3,
        scenes={"indoor": 0.8, "shopfront": 0.2},
        gain=(0.62, 0.12), cast=(1.16, 1.0, 0.74), cast_spread=0.05, saturation=(0.6, 0.85),
        gamma=(1.0, 1.15), blur=(0.8, 1.5), noise=(0.035, 0.06), resolution=(0.4, 0.65), jpeg=(65, 80),
        side_view=(0.15, 0.5), jitter=0.06, cut=0.15, poles=(1, 3), car=0.0, crowd=0.25,
        area=(200.0, 140.0),
    ),
}


@dataclass(frozen=True)
class Identity:
    """Stable appearance of one person (colours are sRGB in 0..1; sizes in person heights)."""

    build: float  # shoulder half-width
    hip: float  # hip height from the top of the head
    head: float  # head radius
    skin: RGB
    hair: RGB
    hair_long: bool
    hat: RGB | None
    upper: RGB
    upper2: RGB
    pattern: str
    period: float
    logo: str
    short_sleeves: bool
    coat: bool
    lower: RGB
    lower_kind: str
    shoes: RGB
    bag: str
    bag_color: RGB
    bag_side: int  # +1: carried on the person's left, -1: right
    scarf: RGB | None


@dataclass(frozen=True)
class CameraStyle:
    """How one camera sees: light, colour, optics, viewpoint, crops, occluders and its scene."""

    index: int
    scene: str
    scene_seed: int
    gain: float
    cast: RGB
    saturation: float
    gamma: float
    blur: float
    noise: float
    resolution: float
    jpeg: int
    views: tuple[float, float, float, float]  # P(front, back, left, right)
    light_side: float  # horizontal shading direction and strength
    jitter: float
    cut: float
    poles: tuple[float, ...]  # pole positions as fractions of the panorama width
    pole_color: RGB
    car: float
    crowd: float


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    p = np.array([weights[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _color_jitter(rng: np.random.Generator, c: RGB, amount: float = 0.04) -> RGB:
    """The same named colour varies a little between garments (dye, fading)."""
    j = 1.0 + rng.normal(0.0, amount, 3)
    return tuple(float(np.clip(x * y, 0.0, 1.0)) for x, y in zip(c, j, strict=True))  # type: ignore[return-value]


def _garment(rng: np.random.Generator, weights: dict[str, float], avoid: str | None = None
             ) -> tuple[str, RGB]:
    name = _pick(rng, weights)
    if avoid is not None and name == avoid:
        name = _pick(rng, weights)
    return name, _color_jitter(rng, rgb(name))


def sample_identity(rng: np.random.Generator, spec: DomainSpec) -> Identity:
    """A fresh random person of this domain."""
    upper_name, upper = _garment(rng, spec.upper_colors)
    _, upper2 = _garment(rng, spec.upper_colors, avoid=upper_name)
    _, lower = _garment(rng, spec.lower_colors)
    bag = _pick(rng, spec.bags)
    _, bag_color = _garment(rng, {"black": 3, "dark_grey": 1, "navy": 1, "brown": 1, "red": 0.5,
                                  "blue": 0.5, "grey": 0.6, "khaki": 0.4, "pink": 0.3, "green": 0.3})
    shoes = rgb(_pick(rng, {"black": 3, "white": 2.5, "dark_brown": 1, "grey": 1, "brown": 0.5, "red": 0.3,
                            "blue": 0.3}))
    hat = _garment(rng, spec.upper_colors)[1] if rng.random() < spec.hat else None
    scarf = _garment(rng, spec.upper_colors)[1] if rng.random() < spec.scarf else None
    return Identity(
        build=float(rng.uniform(0.098, 0.135)),
        hip=float(rng.uniform(0.47, 0.53)),
        head=float(rng.uniform(0.056, 0.066)),
        skin=_color_jitter(rng, rgb(_pick(rng, spec.skins), SKINS), 0.03),
        hair=_color_jitter(rng, rgb(_pick(rng, spec.hairs), HAIRS), 0.05),
        hair_long=bool(rng.random() < 0.3),
        hat=hat,
        upper=upper,
        upper2=upper2,
        pattern=_pick(rng, spec.patterns),
        period=float(rng.uniform(0.035, 0.06)),
        logo=LOGO_SHAPES[int(rng.integers(len(LOGO_SHAPES)))],
        short_sleeves=bool(rng.random() < spec.short_sleeves),
        coat=bool(rng.random() < spec.coat),
        lower=lower,
        lower_kind=_pick(rng, spec.lower_kinds),
        shoes=shoes,
        bag=bag,
        bag_color=bag_color,
        bag_side=int(rng.choice([-1, 1])),
        scarf=scarf,
    )


def confuser_of(rng: np.random.Generator, spec: DomainSpec, parent: Identity) -> Identity:
    """A different person dressed like ``parent`` except for one local detail; build varies slightly."""
    other = sample_identity(rng, spec)
    detail = ("bag", "shoes", "lower", "hair", "hat", "pattern", "upper2", "scarf", "sleeves")
    which = detail[int(rng.integers(len(detail)))]
    base = replace(parent, build=float(np.clip(parent.build + rng.normal(0, 0.006), 0.095, 0.14)),
                   skin=other.skin if rng.random() < 0.5 else parent.skin)
    if which == "bag":
        bag = other.bag if other.bag != parent.bag else ("none" if parent.bag != "none" else "backpack")
        return replace(base, bag=bag, bag_color=other.bag_color, bag_side=other.bag_side)
    if which == "shoes":
        return replace(base, shoes=other.shoes)
    if which == "lower":
        return replace(base, lower=other.lower, lower_kind=other.lower_kind)
    if which == "hair":
        return replace(base, hair=other.hair, hair_long=not parent.hair_long)
    if which == "hat":
        return replace(base, hat=None if parent.hat is not None else other.upper2)
    if which == "pattern":
        pattern = other.pattern if other.pattern != parent.pattern else "plain"
        return replace(base, pattern=pattern, logo=other.logo, period=other.period)
    if which == "upper2":
        return replace(base, upper2=other.upper2, logo=other.logo)
    if which == "scarf":
        return replace(base, scarf=None if parent.scarf is not None else other.upper2)
    return replace(base, short_sleeves=not parent.short_sleeves)


def sample_population(rng: np.random.Generator, spec: DomainSpec, n: int,
                      parents: list[Identity] | None = None) -> list[Identity]:
    """``n`` identities; a share of them are one-detail confusers of earlier ones (or of ``parents``)."""
    people: list[Identity] = []
    for _ in range(n):
        pool = people if parents is None else parents
        if pool and rng.random() < spec.confuser:
            people.append(confuser_of(rng, spec, pool[int(rng.integers(len(pool)))]))
        else:
            people.append(sample_identity(rng, spec))
    return people


def sample_camera(rng: np.random.Generator, spec: DomainSpec, index: int) -> CameraStyle:
    """One camera's style drawn from the domain's distributions."""
    cast = np.array(spec.cast) * np.exp(rng.normal(0.0, spec.cast_spread, 3))
    cast /= cast.mean() / np.mean(spec.cast)
    p_side = rng.uniform(*spec.side_view)
    p_front = rng.uniform(0.25, 0.75) * (1.0 - p_side)
    p_left = rng.uniform(0.3, 0.7) * p_side
    n_poles = int(rng.integers(spec.poles[0], spec.poles[1] + 1))
    return CameraStyle(
        index=index,
        scene=_pick(rng, spec.scenes),
        scene_seed=int(rng.integers(2**31)),
        gain=float(spec.gain[0] * np.exp(rng.normal(0.0, spec.gain[1]))),
        cast=tuple(float(c) for c in cast),  # type: ignore[arg-type]
        saturation=float(rng.uniform(*spec.saturation)),
        gamma=float(rng.uniform(*spec.gamma)),
        blur=float(rng.uniform(*spec.blur)),
        noise=float(rng.uniform(*spec.noise)),
        resolution=float(rng.uniform(*spec.resolution)),
        jpeg=int(rng.integers(spec.jpeg[0], spec.jpeg[1] + 1)),
        views=(float(p_front), float(1.0 - p_side - p_front), float(p_left), float(p_side - p_left)),
        light_side=float(rng.uniform(-0.25, 0.25)),
        jitter=float(spec.jitter * rng.uniform(0.6, 1.4)),
        cut=float(spec.cut * rng.uniform(0.5, 1.5)),
        poles=tuple(float(x) for x in np.sort(rng.uniform(0.05, 0.95, n_poles))),
        pole_color=rgb(_pick(rng, {"grey": 2, "dark_grey": 2, "dark_green": 1, "black": 1})),
        car=float(spec.car * rng.uniform(0.3, 1.7)),
        crowd=float(spec.crowd * rng.uniform(0.5, 1.5)),
    )
