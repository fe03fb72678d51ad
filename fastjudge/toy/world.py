"""The shapes world: our embedded default. Procedural scenes, their instructions, answers and errors.

A scene is 1 to 3 objects on a 3x3 grid; each object has a shape, a colour, a size and a cell. Images are
48x48 RGB with 16x16 cells, so a vision patch of 16 sees exactly one cell (a deliberately easy perception
problem: the loop, not perception, is what this world exercises). Three objects at most keep captions short
(at most 3 phrases, about 25 words), so that the toy judge can compare a caption with its own word for word.

The scene ground truth builds the held-out benchmark and the base model's pretraining data; the loop never
sees it: it only sees images and instructions (`Prompt`).

All texts are lower-case words separated by single spaces, punctuation split off (" , " and " . "), so the
word-level tokenizer of `fastjudge.toy.model` round-trips them exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
SIZES = ("small", "large")
GRID = 3
CELL = 16
IMAGE_SIZE = GRID * CELL
# Position names by (row, col); one or two words each.
POSITIONS = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
POSITION_CELL = {name: cell for cell, name in POSITIONS.items()}
DIGITS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")  # the toy writes counts as digits
RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (230, 200, 30)}
OPEN_INSTRUCTIONS = ("describe the image .", "what is in the image ?", "list the objects in the image .")
CATEGORIES = ("attribute", "count", "spatial", "existence", "vqa")
# The closed question families of `questions`: a count, an attribute of the object at a cell, the option letter of
# its shape, where an object is, and a relation between two objects (scenes of two objects or more only).
CLOSED_FAMILIES = ("count", "attribute", "option", "where", "relation")


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    row: int
    col: int

    @property
    def position(self) -> str:
        return POSITIONS[(self.row, self.col)]

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} at {self.position}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # sorted in reading order (row, col): captions list them in this order

    def at(self, row: int, col: int) -> Obj | None:
        for obj in self.objects:
            if (obj.row, obj.col) == (row, col):
                return obj
        return None

    def empty_cells(self) -> list[tuple[int, int]]:
        used = {(o.row, o.col) for o in self.objects}
        return [cell for cell in POSITIONS if cell not in used]


@dataclass(frozen=True)
class Question:
    """An instruction about a scene with its ground-truth response.

    kind: "open" (caption-like, long answer) or "closed" (a short final answer that can be voted on).
    answer_type: "caption" for open; "number", "option" or "short" for closed.
    topic: which benchmark category an error in the response falls under.
    family: which question family of `questions` it is (CLOSED_FAMILIES or "caption"); "" for a bare answer.
    """

    instruction: str
    kind: str
    answer_type: str
    answer: str  # the final answer for closed questions, the caption for open ones
    topic: str
    family: str = ""


MAX_OBJECTS = 3


def random_scene(rng: random.Random, min_objects: int = 1, max_objects: int = MAX_OBJECTS) -> Scene:
    """Draw a scene; (colour, shape) pairs are unique so that "the red circle" always names one object."""
    count = rng.randint(min_objects, max_objects)
    cells = rng.sample(sorted(POSITIONS), count)
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], count)
    objs = [Obj(shape=s, colour=c, size=rng.choice(SIZES), row=r, col=k) for (r, k), (c, s) in zip(cells, kinds)]
    return Scene(tuple(sorted(objs, key=lambda o: (o.row, o.col))))


def render(scene: Scene, rng: random.Random) -> Image.Image:
    """Draw the scene: 48x48 RGB, light noisy background, each object near its cell's centre (+-2 px)."""
    background = tuple(rng.randint(225, 250) for _ in range(3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx = obj.col * CELL + CELL // 2 + rng.randint(-2, 2)
        cy = obj.row * CELL + CELL // 2 + rng.randint(-2, 2)
        radius = 3 if obj.size == "small" else 6
        colour = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in RGB[obj.colour])
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if obj.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif obj.shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    return image


# ---------------------------------------------------------------------------------------------------------
# Responses. Captions and closed answers have one canonical form each, so that a response with exactly one
# error differs from the correct one in exactly one fact and nothing else (no order or wording tells).


def caption(objects: tuple[Obj, ...] | list[Obj]) -> str:
    ordered = sorted(objects, key=lambda o: (o.row, o.col))
    return " , ".join(o.phrase() for o in ordered) + " ."


def closed_response(answer: str) -> str:
    return f"the answer is {answer} ."


def parse_caption(text: str) -> list[Obj] | None:
    """Inverse of `caption`; None when the text is not a well-formed caption."""
    body = text.strip()
    if not body.endswith(" ."):
        return None
    objs = []
    for part in body[:-2].split(" , "):
        words = part.split()
        if len(words) < 5 or words[0] != "a" or words[4] != "at":
            return None
        size, colour, shape, position = words[1], words[2], words[3], " ".join(words[5:])
        if size not in SIZES or colour not in COLOURS or shape not in SHAPES or position not in POSITION_CELL:
            return None
        row, col = POSITION_CELL[position]
        objs.append(Obj(shape, colour, size, row, col))
    return objs


def final_answer(text: str) -> str | None:
    """The final answer of a closed toy response ("the answer is X ."): everything after the last "the answer is ",
    its trailing "." dropped; None when there is none. The toy's own reading of its canonical texts, stricter than
    `fastjudge.core.answers.extract_answer` (which reads any model's responses: there "the answer is 8 . x"
    answers "8", here "8 . x", a response the toy world never writes)."""
    marker = "the answer is "
    at = text.rfind(marker)
    if at < 0:
        return None
    answer = text[at + len(marker):].strip().rstrip(".").strip()
    return answer or None


def questions(scene: Scene, rng: random.Random) -> list[Question]:
    """Every question family for this scene, one random instance each (the caller picks among them)."""
    objs = scene.objects
    out = [Question(rng.choice(OPEN_INSTRUCTIONS), "open", "caption", caption(objs), "caption", "caption")]

    # count: all objects, by colour, by shape
    colour = rng.choice(COLOURS)
    shape = rng.choice(SHAPES)
    count_q = rng.choice([
        ("how many objects are there ?", len(objs)),
        (f"how many {colour} objects are there ?", sum(o.colour == colour for o in objs)),
        (f"how many {shape} objects are there ?", sum(o.shape == shape for o in objs)),
    ])
    out.append(Question(count_q[0], "closed", "number", str(count_q[1]), "count", "count"))

    target = rng.choice(objs)
    pos = target.position
    attribute_q = rng.choice([
        (f"what colour is the object at {pos} ?", target.colour),
        (f"what shape is the object at {pos} ?", target.shape),
        (f"what size is the object at {pos} ?", target.size),
    ])
    out.append(Question(attribute_q[0], "closed", "short", attribute_q[1], "vqa", "attribute"))

    # multiple choice over the three shapes in a shuffled order; the option letter is the answer
    options = list(SHAPES)
    rng.shuffle(options)
    letters = "abc"
    listed = " ".join(f"( {letters[i]} ) {name}" for i, name in enumerate(options))
    out.append(Question(f"which shape is at {pos} ? {listed}", "closed", "option",
                        f"( {letters[options.index(target.shape)]} )", "vqa", "option"))

    out.append(Question(f"where is the {target.colour} {target.shape} ?", "closed", "short", pos, "spatial", "where"))

    if len(objs) >= 2:
        first, second = rng.sample(list(objs), 2)
        relation = rng.choice(["left of", "right of", "above", "below"])
        holds = {
            "left of": first.col < second.col, "right of": first.col > second.col,
            "above": first.row < second.row, "below": first.row > second.row,
        }[relation]
        out.append(Question(
            f"is the {first.colour} {first.shape} {relation} the {second.colour} {second.shape} ?",
            "closed", "short", "yes" if holds else "no", "spatial", "relation"))
    return out


def corrupt_caption(objs: list[Obj], rng: random.Random, error: str | None = None) -> tuple[str, str] | None:
    """A caption of `objs` with exactly one error. Returns (text, category) or None if impossible.

    error: "attribute" (colour, shape or size of one object), "spatial" (one object moved to an empty cell)
    or "existence" (one invented object in an empty cell); None picks one at random.
    """
    objs = list(objs)
    if not objs:
        return None
    used = {(o.row, o.col) for o in objs}
    empty = [cell for cell in POSITIONS if cell not in used]
    kinds = {(o.colour, o.shape) for o in objs}
    choices = ["attribute"] + (["spatial", "existence"] if empty else [])
    error = error or rng.choice(choices)
    if error not in choices:
        return None
    if error == "attribute":
        i = rng.randrange(len(objs))
        o = objs[i]
        field = rng.choice(["colour", "shape", "size"])
        if field == "colour":
            options = [c for c in COLOURS if c != o.colour and (c, o.shape) not in kinds]
            if not options:
                field = "size"
            else:
                objs[i] = Obj(o.shape, rng.choice(options), o.size, o.row, o.col)
        if field == "shape":
            options = [s for s in SHAPES if s != o.shape and (o.colour, s) not in kinds]
            if not options:
                field = "size"
            else:
                objs[i] = Obj(rng.choice(options), o.colour, o.size, o.row, o.col)
        if field == "size":
            objs[i] = Obj(o.shape, o.colour, "large" if o.size == "small" else "small", o.row, o.col)
    elif error == "spatial":
        i = rng.randrange(len(objs))
        row, col = rng.choice(empty)
        o = objs[i]
        objs[i] = Obj(o.shape, o.colour, o.size, row, col)
    else:
        row, col = rng.choice(empty)
        options = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in kinds]
        c, s = rng.choice(options)
        objs.append(Obj(s, c, rng.choice(SIZES), row, col))
    return caption(objs), error


def corrupt_answer(question: Question, rng: random.Random) -> str:
    """A different final answer of the same type (the closed-question version of "exactly one error")."""
    answer = question.answer
    if question.answer_type == "number":
        value = int(answer)
        return str(rng.choice([v for v in range(max(0, value - 2), value + 3) if v != value]))
    if question.answer_type == "option":
        letters = [f"( {x} )" for x in "abc" if f"( {x} )" != answer]
        return rng.choice(letters)
    for pool in (COLOURS, SHAPES, SIZES, ("yes", "no"), tuple(POSITIONS.values())):
        if answer in pool:
            return rng.choice([x for x in pool if x != answer])
    raise ValueError(f"cannot corrupt answer {answer!r} of question {question.instruction!r}")


def rewrite_with_error(response: str, rng: random.Random) -> str | None:
    """Rule-based corrupter over a response's text: one colour, shape, size, number, position or answer
    changed (or, for captions, one object invented). None when the text is in neither canonical form."""
    objs = parse_caption(response)
    if objs is not None:
        out = corrupt_caption(objs, rng)
        return out[0] if out else None
    answer = final_answer(response)
    if answer is None:
        return None
    if answer.isdigit():
        answer_type = "number"
    elif answer.startswith("("):
        answer_type = "option"
    else:
        answer_type = "short"
    try:
        return closed_response(corrupt_answer(Question("", "closed", answer_type, answer, ""), rng))
    except ValueError:
        return None


def same_answer(x: str, y: str) -> bool:
    """Whether two responses say the same thing: the same final answer when both are closed responses, the
    same words otherwise (captions are canonical, so equal captions are equal texts)."""
    fx, fy = final_answer(x), final_answer(y)
    if fx is not None and fy is not None:
        return fx == fy
    return x.split() == y.split()


def response_for(question: Question) -> str:
    return question.answer if question.kind == "open" else closed_response(question.answer)


def benchmark_draws(rng: random.Random, per_category: int):
    """`per_category` benchmark items for each category, drawn in order from `rng`: (category, index, scene,
    (question, correct response, response with one error)). The caller may draw from `rng` between items
    (rendering the scene, say): the sequence stays reproducible."""
    for category in CATEGORIES:
        made = 0
        while made < per_category:
            scene = random_scene(rng)
            item = benchmark_item(scene, rng, category)
            if item is not None:
                yield category, made, scene, item
                made += 1


def benchmark_item(scene: Scene, rng: random.Random, category: str) -> tuple[Question, str, str] | None:
    """(question, correct response, response with exactly one error of `category`) or None."""
    qs = questions(scene, rng)
    if category in ("attribute", "spatial", "existence") and (category != "spatial" or rng.random() < 0.5):
        bad = corrupt_caption(list(scene.objects), rng, error=category)
        if bad is None:
            return None
        return qs[0], qs[0].answer, bad[0]
    pool = [q for q in qs[1:] if q.topic == category]
    if not pool:
        return None
    q = rng.choice(pool)
    return q, closed_response(q.answer), closed_response(corrupt_answer(q, rng))
