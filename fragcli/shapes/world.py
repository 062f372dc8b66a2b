"""The "shapes" world: a procedural, seeded data set of 64x64 images of one or two shapes with captions.

Everything here is pure Python + numpy + PIL (no torch), deterministic, and generated on the fly.

* A :class:`Scene` is one or two :class:`Obj` (shape, colour, size, grid position) on a coloured background,
  plus a ``variant`` integer that seeds small rendering nuances (a pixel or two of position jitter, a little
  colour jitter). ``render(scene)`` is a pure function of the scene.
* ``captions(scene)`` gives a *paraphrase family*: several complete wordings of the same scene (synonyms,
  reorderings), the canonical wording first. Wordings come from templates; some templates are held out
  (never used in training), see :func:`wording_split`.
* Scenes are split deterministically by hashing the scene key (objects + background, not the variant):
  :func:`split_of` gives ``"train"`` or ``"heldout"``.
* Zero-shot classes: every colour x shape pair, as the text ``"a {colour} {shape}"`` (:func:`zero_shot_classes`).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # image side in pixels
SUPERSAMPLE = 4  # render at 4x and downsample (anti-aliasing)
HELDOUT_PERCENT = 10  # share of scene keys held out

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 40),
    "green": (35, 165, 60),
    "blue": (35, 75, 215),
    "purple": (135, 45, 175),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SIZES: tuple[str, ...] = ("small", "large")
RADIUS = {"small": 8.0, "large": 13.0}  # "radius" in pixels of the 64x64 image
# 3x3 grid, row-major: name -> (column, row)
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
POSITION_NAMES: tuple[str, ...] = tuple(POSITIONS)
GRID_CENTERS = (15.0, 32.0, 49.0)  # pixel centre of grid column/row 0, 1, 2

# -- words -------------------------------------------------------------------------------------------------------
COLOR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "orange": ("orange", "tangerine", "amber"),
    "yellow": ("yellow", "golden", "lemon"),
    "green": ("green", "emerald", "grass green"),
    "blue": ("blue", "azure", "cobalt"),
    "purple": ("purple", "violet", "plum"),
    "white": ("white", "ivory", "snow white"),
    "black": ("black", "ebony", "jet black"),
}
SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "wedge", "pyramid"),
    "star": ("star", "five-pointed star", "starlet"),
    "diamond": ("diamond", "rhombus", "lozenge"),
}
SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "large": ("large", "big", "huge"),
}
# full phrase ("at the top left") and short phrase ("top left") per position, with synonyms
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("at the top left", "in the upper left", "in the top left corner"),
    "top": ("at the top", "at the top center", "in the upper middle"),
    "top right": ("at the top right", "in the upper right", "in the top right corner"),
    "left": ("on the left", "at the middle left", "on the left side"),
    "center": ("in the center", "in the middle", "at the center"),
    "right": ("on the right", "at the middle right", "on the right side"),
    "bottom left": ("at the bottom left", "in the lower left", "in the bottom left corner"),
    "bottom": ("at the bottom", "at the bottom center", "in the lower middle"),
    "bottom right": ("at the bottom right", "in the lower right", "in the bottom right corner"),
}
POSITION_SHORT: dict[str, tuple[str, ...]] = {
    "top left": ("top left", "upper left"),
    "top": ("top", "top center"),
    "top right": ("top right", "upper right"),
    "left": ("left", "middle left"),
    "center": ("center", "middle"),
    "right": ("right", "middle right"),
    "bottom left": ("bottom left", "lower left"),
    "bottom": ("bottom", "bottom center"),
    "bottom right": ("bottom right", "lower right"),
}
BACKGROUND_WORDS: tuple[str, ...] = ("background", "backdrop")


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    position: str

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}")


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str
    variant: int = field(default=0, compare=True)

    def __post_init__(self):
        if not 1 <= len(self.objects) <= 2:
            raise ValueError("a scene has one or two objects")
        if self.background not in COLORS:
            raise ValueError(f"unknown background colour {self.background!r}")
        if any(o.color == self.background for o in self.objects):
            raise ValueError("an object cannot have the background colour")
        if len(self.objects) == 2 and self.objects[0].position == self.objects[1].position:
            raise ValueError("two objects cannot share a position")

    @property
    def key(self) -> str:
        """The scene's identity for splitting: objects (order-free) and background; not the variant."""
        objs = sorted(f"{o.size}-{o.color}-{o.shape}@{o.position}" for o in self.objects)
        return "|".join(objs) + f"|bg={self.background}"

    @property
    def single(self) -> bool:
        return len(self.objects) == 1

    @property
    def class_index(self) -> int:
        """Zero-shot class (colour x shape) of a single-shape scene."""
        if not self.single:
            raise ValueError("only single-shape scenes have a zero-shot class")
        o = self.objects[0]
        return class_index(o.color, o.shape)


# -- classes -----------------------------------------------------------------------------------------------------
def zero_shot_classes() -> list[tuple[str, str, str]]:
    """All colour x shape classes as ``(colour, shape, text)``; text is ``"a {colour} {shape}"``."""
    return [(c, s, fix_articles(f"a {c} {s}")) for c in COLOR_NAMES for s in SHAPES]


def class_texts() -> list[str]:
    return [t for _, _, t in zero_shot_classes()]


def class_index(color: str, shape: str) -> int:
    return COLOR_NAMES.index(color) * len(SHAPES) + SHAPES.index(shape)


def class_of_index(index: int) -> tuple[str, str]:
    return COLOR_NAMES[index // len(SHAPES)], SHAPES[index % len(SHAPES)]


# -- split -------------------------------------------------------------------------------------------------------
def _hash_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def split_of(scene: Scene) -> str:
    """``"heldout"`` for about HELDOUT_PERCENT% of scene keys (by hash), else ``"train"``."""
    return "heldout" if _hash_int("shapes-split:" + scene.key) % 100 < HELDOUT_PERCENT else "train"


# -- sampling ----------------------------------------------------------------------------------------------------
def _adjacent(a: str, b: str) -> bool:
    (ax, ay), (bx, by) = POSITIONS[a], POSITIONS[b]
    return max(abs(ax - bx), abs(ay - by)) <= 1


def _as_rng(rng) -> random.Random:
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, np.random.Generator):
        return random.Random(int(rng.integers(0, 2**63 - 1)))
    return random.Random(rng)


def sample_scene(rng, n_objects: int | None = None, split: str | None = None, p_single: float = 0.6) -> Scene:
    """Draw a random scene. ``rng``: a ``random.Random``, a numpy Generator or an int seed.

    ``n_objects`` (1 or 2; default random with ``p_single``), ``split`` ("train" | "heldout" | None = any).
    Two objects never share a grid cell; when either is large they are not in neighbouring cells (no overlap).
    """
    r = _as_rng(rng)
    if split not in (None, "train", "heldout"):
        raise ValueError(f"unknown split {split!r}")
    for _ in range(10_000):
        n = n_objects if n_objects is not None else (1 if r.random() < p_single else 2)
        objs: list[Obj] = []
        for _i in range(n):
            for _try in range(100):
                o = Obj(r.choice(SHAPES), r.choice(COLOR_NAMES), r.choice(SIZES), r.choice(POSITION_NAMES))
                if objs:
                    p = objs[0]
                    if o.position == p.position:
                        continue
                    if "large" in (o.size, p.size) and _adjacent(o.position, p.position):
                        continue  # (a large shape in the centre has no free cell: the scene is redrawn)
                    if (o.color, o.shape) == (p.color, p.shape):
                        continue  # two identical-looking shapes make captions ambiguous
                objs.append(o)
                break
        if len(objs) != n:
            continue
        used = {o.color for o in objs}
        bg = r.choice([c for c in COLOR_NAMES if c not in used])
        scene = Scene(tuple(objs), bg, variant=r.randrange(2**31))
        if split is None or split_of(scene) == split:
            return scene
    raise RuntimeError("could not sample a scene in the requested split")


def sample_scenes(n: int, seed: int, **kw) -> list[Scene]:
    r = random.Random(seed)
    return [sample_scene(r, **kw) for _ in range(n)]


# -- rendering ---------------------------------------------------------------------------------------------------
def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        h = r * 0.86
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        R = r * 1.2  # circumradius; centroid at (cx, cy), pointing up
        return [(cx + R * math.sin(a), cy - R * math.cos(a)) for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
    if shape == "diamond":
        return [(cx, cy - r * 1.15), (cx + r * 0.85, cy), (cx, cy + r * 1.15), (cx - r * 0.85, cy)]
    if shape == "star":
        R, ri = r * 1.2, r * 1.2 * 0.45
        pts = []
        for k in range(10):
            a = k * math.pi / 5
            rad = R if k % 2 == 0 else ri
            pts.append((cx + rad * math.sin(a), cy - rad * math.cos(a)))
        return pts
    return None  # circle


def _jitter_color(rgb: tuple[int, int, int], r: random.Random, amount: int = 12) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c + r.randint(-amount, amount)))) for c in rgb)


def object_center(obj: Obj, scene: Scene, index: int) -> tuple[float, float]:
    """The pixel centre at which ``render`` draws object ``index`` of ``scene`` (includes the variant's jitter)."""
    r = random.Random(f"{scene.variant}:{index}:pos")
    col, row = POSITIONS[obj.position]
    return GRID_CENTERS[col] + r.uniform(-2.0, 2.0), GRID_CENTERS[row] + r.uniform(-2.0, 2.0)


def render(scene: Scene) -> Image.Image:
    """Render a scene as a 64x64 RGB PIL image (deterministic)."""
    s = SUPERSAMPLE
    r = random.Random(f"{scene.variant}:colors")
    img = Image.new("RGB", (SIZE * s, SIZE * s), _jitter_color(COLORS[scene.background], r))
    draw = ImageDraw.Draw(img)
    for i, obj in enumerate(scene.objects):
        cx, cy = object_center(obj, scene, i)
        rad = RADIUS[obj.size] * random.Random(f"{scene.variant}:{i}:size").uniform(0.92, 1.08)
        fill = _jitter_color(COLORS[obj.color], r)
        poly = _shape_polygon(obj.shape, cx * s, cy * s, rad * s)
        if poly is None:
            draw.ellipse([(cx - rad) * s, (cy - rad) * s, (cx + rad) * s, (cy + rad) * s], fill=fill)
        else:
            draw.polygon(poly, fill=fill)
    return img.resize((SIZE, SIZE), Image.Resampling.BOX)


def render_array(scene: Scene) -> np.ndarray:
    """``render`` as a uint8 array of shape (64, 64, 3)."""
    return np.asarray(render(scene), dtype=np.uint8)


# -- captions ----------------------------------------------------------------------------------------------------
# Full templates carry every attribute of the scene; ids in HELDOUT_TEMPLATES are never used for training.
# Slots per object: {size} {color} {shape} {pos} (full phrase) {pshort} (short phrase); scene: {bg} {bgword}.
SINGLE_TEMPLATES: tuple[str, ...] = (
    "a {size} {color} {shape} {pos} on a {bg} background",  # 0: canonical (always the base words)
    "a {size} {color} {shape} {pos} on a {bg} {bgword}",
    "a {size} {color} {shape}, {pshort}, {bg} {bgword}",
    "{pos}, a {size} {color} {shape} on a {bg} {bgword}",
    "a {bg} {bgword} with a {size} {color} {shape} {pos}",
    "a picture of a {size} {color} {shape} {pos} against a {bg} {bgword}",  # held out
    "{bg} {bgword}; {size} {color} {shape} {pos}",  # held out
)
PAIR_TEMPLATES: tuple[str, ...] = (
    "a {size1} {color1} {shape1} {pos1} and a {size2} {color2} {shape2} {pos2} on a {bg} background",  # canonical
    "a {size2} {color2} {shape2} {pos2} and a {size1} {color1} {shape1} {pos1} on a {bg} {bgword}",
    "a {size1} {color1} {shape1}, {pshort1}, and a {size2} {color2} {shape2}, {pshort2}, {bg} {bgword}",
    "on a {bg} {bgword}, a {size1} {color1} {shape1} {pos1} and a {size2} {color2} {shape2} {pos2}",
    "a {bg} {bgword} with a {size1} {color1} {shape1} {pos1} and a {size2} {color2} {shape2} {pos2}",
    "a picture of a {size2} {color2} {shape2} {pos2} and a {size1} {color1} {shape1} {pos1} against a {bg} {bgword}",  # held out
    "{bg} {bgword}; {size1} {color1} {shape1} {pos1}; {size2} {color2} {shape2} {pos2}",  # held out
)
HELDOUT_TEMPLATES = frozenset({5, 6})
# Partial wordings (not paraphrases: they leave attributes out), used in training only.
SINGLE_PARTIAL: tuple[str, ...] = (
    "a {color} {shape}",
    "a {size} {color} {shape}",
    "a {color} {shape} {pos}",
    "a {color} {shape} on a {bg} background",
)
PAIR_PARTIAL: tuple[str, ...] = (
    "a {color1} {shape1} and a {color2} {shape2}",
    "a {color2} {shape2} and a {color1} {shape1}",
    "a {color1} {shape1} {pos1} and a {color2} {shape2} {pos2}",
)


_ARTICLE = re.compile(r"\ba (?=[aeiou])")


def fix_articles(text: str) -> str:
    """``"a orange"`` -> ``"an orange"``."""
    return _ARTICLE.sub("an ", text)


def wording_split(template_id: int) -> str:
    """``"heldout"`` for held-out caption templates, else ``"train"``."""
    return "heldout" if template_id in HELDOUT_TEMPLATES else "train"


def _slots(scene: Scene, r: random.Random | None, canonical: bool) -> dict[str, str]:
    def pick(options: tuple[str, ...]) -> str:
        return options[0] if canonical or r is None else r.choice(options)

    slots: dict[str, str] = {"bg": pick(COLOR_SYNONYMS[scene.background]), "bgword": pick(BACKGROUND_WORDS)}
    if canonical:
        slots["bg"] = scene.background
    for i, o in enumerate(scene.objects, start=1):
        suffix = "" if scene.single else str(i)
        slots["size" + suffix] = pick(SIZE_SYNONYMS[o.size])
        slots["color" + suffix] = pick(COLOR_SYNONYMS[o.color])
        slots["shape" + suffix] = pick(SHAPE_SYNONYMS[o.shape])
        slots["pos" + suffix] = pick(POSITION_PHRASES[o.position])
        slots["pshort" + suffix] = pick(POSITION_SHORT[o.position])
    return slots


def caption_for(scene: Scene, template_id: int, rng: random.Random | None = None) -> str:
    """One full wording: template ``template_id`` with synonyms drawn by ``rng`` (None: base words)."""
    templates = SINGLE_TEMPLATES if scene.single else PAIR_TEMPLATES
    return fix_articles(templates[template_id].format(**_slots(scene, rng, canonical=rng is None)))


def canonical_caption(scene: Scene) -> str:
    return caption_for(scene, 0, None)


def wordings(scene: Scene) -> list[tuple[str, int, str]]:
    """The paraphrase family as ``(text, template_id, wording split)``, canonical first, deterministic.

    Every template appears once; non-canonical templates draw synonyms from a scene-seeded RNG.
    """
    r = random.Random("wordings:" + scene.key + f":{scene.variant}")
    n = len(SINGLE_TEMPLATES if scene.single else PAIR_TEMPLATES)
    out = [(canonical_caption(scene), 0, wording_split(0))]
    seen = {out[0][0]}
    for t in range(1, n):
        text = caption_for(scene, t, r)
        if text in seen:
            continue
        seen.add(text)
        out.append((text, t, wording_split(t)))
    return out


def captions(scene: Scene, split: str | None = None) -> list[str]:
    """Complete wordings of ``scene`` (a paraphrase family), canonical first.

    ``split``: None = all wordings, ``"train"`` or ``"heldout"`` = only wordings from those templates
    (the canonical wording is a train wording).
    """
    return [t for t, _, s in wordings(scene) if split is None or s == split]


def partial_captions(scene: Scene) -> list[str]:
    """Wordings that leave attributes out (e.g. ``"a red circle"``), with base words."""
    templates = SINGLE_PARTIAL if scene.single else PAIR_PARTIAL
    slots = _slots(scene, None, canonical=True)
    return [fix_articles(t.format(**slots)) for t in templates]


def random_training_caption(scene: Scene, r: random.Random, p_partial: float = 0.25) -> str:
    """A random train wording for training: a train template with random synonyms, or a partial wording."""
    if r.random() < p_partial:
        templates = SINGLE_PARTIAL if scene.single else PAIR_PARTIAL
        return fix_articles(templates[r.randrange(len(templates))].format(**_slots(scene, r, canonical=False)))
    n = len(SINGLE_TEMPLATES if scene.single else PAIR_TEMPLATES)
    t = r.choice([i for i in range(n) if i not in HELDOUT_TEMPLATES])
    return caption_for(scene, t, None if (t == 0 and r.random() < 0.5) else r)


def heldout_paraphrase_families(n: int = 8, seed: int = 0, single: bool = True, size: int = 4) -> list[list[str]]:
    """``n`` families of wordings of held-out scenes (canonical first, then ``size - 1`` paraphrases,
    held-out templates preferred). Deterministic in ``seed``. ``single``: single-shape scenes only."""
    r = random.Random(f"families:{seed}")
    fams: list[list[str]] = []
    keys: set[str] = set()
    while len(fams) < n:
        scene = sample_scene(r, n_objects=1 if single else None, split="heldout")
        if scene.key in keys:
            continue
        keys.add(scene.key)
        ws = wordings(scene)
        held = [t for t, _, s in ws if s == "heldout"]
        rest = [t for t, tid, s in ws if s == "train" and tid != 0]
        fams.append([ws[0][0]] + (held + rest)[: max(0, size - 1)])
    return fams


def heldout_single_scenes(n: int, seed: int = 0) -> list[Scene]:
    """``n`` held-out single-shape scenes, cycling through all colour x shape classes (balanced)."""
    r = random.Random(f"heldout-singles:{seed}")
    classes = zero_shot_classes()
    out: list[Scene] = []
    while len(out) < n:
        color, shape, _ = classes[len(out) % len(classes)]
        while True:
            s = sample_scene(r, n_objects=1, split="heldout")
            o = s.objects[0]
            if o.color == color and o.shape == shape:
                out.append(s)
                break
            # re-draw only the attributes we control
            o2 = Obj(shape, color, o.size, o.position)
            bgs = [c for c in COLOR_NAMES if c != color]
            s2 = Scene((o2,), r.choice(bgs), s.variant)
            if split_of(s2) == "heldout":
                out.append(s2)
                break
    return out
