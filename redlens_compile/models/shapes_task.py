"""A procedurally generated visual QA task whose answers depend on a few image regions.

Images are 128x128 with coloured shapes on a textured background; each object sits in one
cell of a 16x16 grid of 8x8-pixel cells (one vision patch). Questions ask for a colour, a
shape, a count, a relative position or the presence of an object; every answer is one word.
Everything is deterministic from (split, index): the train and held-out splits draw from
disjoint seed spaces.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128
CELL = 8
GRID = IMAGE_SIZE // CELL  # 16 x 16 = 256 cells = 256 visual tokens

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 200),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
NUMBERS = ("zero", "one", "two", "three", "four", "five")
DIRECTIONS = ("left", "right", "above", "below")
QUESTION_TYPES = ("colour", "shape", "count", "position", "presence")
POSITION_MARGIN = 2  # cells by which the dominant axis of a position question must win

_SPLIT_SEEDS = {"train": 1_000_003, "test": 7_000_001}

PROMPT_WORDS = (
    "USER: ASSISTANT: what colour shape is the object how many objects are there where relative to a ? "
    "yes no"
).split()


def vocabulary() -> list[str]:
    """Every word a prompt or an answer of this task uses (the tokenizer's vocabulary)."""
    words = PROMPT_WORDS + list(COLOURS) + list(SHAPES) + list(PLURAL.values()) + list(NUMBERS) + list(DIRECTIONS)
    return list(dict.fromkeys(words))


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    row: int
    col: int


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    qtype: str


@dataclass
class Sample:
    objects: list[SceneObject]
    qas: list[QA]

    def image(self, seed: int) -> Image.Image:
        return render(self.objects, seed)


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    x0, y0 = obj.col * CELL + 1, obj.row * CELL + 1
    x1, y1 = x0 + CELL - 3, y0 + CELL - 3  # a 6x6 box inside the 8x8 cell
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    else:  # cross
        mid_x, mid_y = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((mid_x - 1, y0, mid_x, y1), fill=fill)
        draw.rectangle((x0, mid_y - 1, x1, mid_y), fill=fill)


def render(objects: list[SceneObject], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Textured background: a gentle gradient plus pixel noise, in muted greys.
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    base = 110 + 20 * np.sin(xx / rng.uniform(6, 14) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(6, 14))
    pixels = base[..., None] + rng.normal(0, 8, (IMAGE_SIZE, IMAGE_SIZE, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype("uint8"))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw_shape(draw, obj)
    return image


def make_objects(rng: random.Random, count: int) -> list[SceneObject]:
    cells = rng.sample(range(GRID * GRID), count)
    return [SceneObject(rng.choice(list(COLOURS)), rng.choice(SHAPES), c // GRID, c % GRID) for c in cells]


def _unique(objects: list[SceneObject], key) -> list[SceneObject]:
    values = [key(o) for o in objects]
    return [o for o in objects if values.count(key(o)) == 1]


def ask(rng: random.Random, objects: list[SceneObject], qtype: str) -> QA | None:
    """One question of `qtype` about the scene, or None when the scene cannot support it."""
    if qtype in ("colour", "shape"):
        # Ask for one attribute of the object named by the other, which must be unique.
        named_by = (lambda o: o.shape) if qtype == "colour" else (lambda o: o.colour)
        candidates = _unique(objects, named_by)
        if not candidates:
            return None
        obj = rng.choice(candidates)
        if qtype == "colour":
            return QA(f"what colour is the {obj.shape} ?", obj.colour, qtype)
        return QA(f"what shape is the {obj.colour} object ?", obj.shape, qtype)
    if qtype == "count":
        if rng.random() < 0.5:
            colour = rng.choice([o.colour for o in objects])
            n = sum(o.colour == colour for o in objects)
            return QA(f"how many {colour} objects are there ?", NUMBERS[n], qtype)
        shape = rng.choice([o.shape for o in objects])
        n = sum(o.shape == shape for o in objects)
        return QA(f"how many {PLURAL[shape]} are there ?", NUMBERS[n], qtype)
    if qtype == "position":
        unique = _unique(objects, lambda o: (o.colour, o.shape))
        # Only pairs with a clear dominant axis: "left" must not be a judgement call against "above".
        pairs = [(a, b) for a in unique for b in unique
                 if a is not b and abs(abs(a.row - b.row) - abs(a.col - b.col)) >= POSITION_MARGIN]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        if abs(a.col - b.col) > abs(a.row - b.row):
            answer = "left" if a.col < b.col else "right"
        else:
            answer = "above" if a.row < b.row else "below"
        return QA(f"where is the {a.colour} {a.shape} relative to the {b.colour} {b.shape} ?", answer, qtype)
    if qtype == "presence":
        present = {(o.colour, o.shape) for o in objects}
        if rng.random() < 0.5:
            colour, shape = rng.choice(sorted(present))
            return QA(f"is there a {colour} {shape} ?", "yes", qtype)
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        colour, shape = rng.choice(absent)
        return QA(f"is there a {colour} {shape} ?", "no", qtype)
    raise ValueError(f"unknown question type {qtype!r}; valid: {QUESTION_TYPES}")


def sample(split: str, index: int, num_questions: int = 1, qtypes: tuple[str, ...] = QUESTION_TYPES,
           min_objects: int = 1, max_objects: int = 5) -> tuple[Sample, int]:
    """The scene and questions of (split, index); returns (sample, image seed)."""
    if split not in _SPLIT_SEEDS:
        raise ValueError(f"split={split!r}: must be one of {sorted(_SPLIT_SEEDS)}")
    seed = _SPLIT_SEEDS[split] * 1_000_000 + index
    rng = random.Random(seed)
    objects = make_objects(rng, rng.randint(min_objects, max_objects))
    qas: list[QA] = []
    attempts = 0
    while len(qas) < num_questions and attempts < 10 * num_questions:
        attempts += 1
        qa = ask(rng, objects, qtypes[(index + len(qas) + attempts) % len(qtypes)] if len(qtypes) > 1 else qtypes[0])
        if qa is not None and qa not in qas:
            qas.append(qa)
    return Sample(objects, qas), seed


def heldout_questions(count: int, split: str = "test") -> list[tuple[Image.Image, QA]]:
    """`count` held-out (image, question) pairs, balanced over question types.

    split="train" gives training-split pairs instead (e.g. calibration inputs for the layer
    ranking, disjoint from what accuracy is measured on).
    """
    out: list[tuple[Image.Image, QA]] = []
    index = 0
    while len(out) < count:
        qtype = QUESTION_TYPES[len(out) % len(QUESTION_TYPES)]
        item, seed = sample(split, index, 1, qtypes=(qtype,))
        index += 1
        if item.qas:
            out.append((item.image(seed), item.qas[0]))
    return out


def prompt(question: str, image_token: str = "<image>") -> str:
    """The question comes before the image (each visual token can check itself against it) and
    again after it (the answer position reads what is asked from its neighbours, not from 256
    tokens back)."""
    return f"USER: {question}\n{image_token}\n{question} ASSISTANT:"


# Training-split scenes the shipped codebook is calibrated on (far from the training loop's indices).
CODEBOOK_SCENES_START = 500_000


def write_codebook_scenes(folder, count: int) -> None:
    """The first `count` codebook calibration scenes as PNG files in `folder` (the images
    scripts/build_proof_codebook.py builds the shipped codebook from)."""
    from pathlib import Path

    for index in range(count):
        item, seed = sample("train", CODEBOOK_SCENES_START + index)
        item.image(seed).save(Path(folder) / f"train_{index:04d}.png")
