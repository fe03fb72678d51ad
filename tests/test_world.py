"""The shapes world: scenes, rendering, captions, one-error corruptions, questions and benchmark items."""

from __future__ import annotations

import random
import re

import pytest

from fastjudge.toy import world
from fastjudge.toy.world import Obj, Scene

N_SCENES = 150  # random scenes per property test: cheap (no rendering unless needed)


def classify(pixel: tuple[int, int, int]) -> str:
    """"background" (every channel >= 225, as `render` draws it) or the palette colour nearest to `pixel`."""
    if min(pixel) >= 225:
        return "background"
    return min(world.RGB, key=lambda name: sum((p - q) ** 2 for p, q in zip(pixel, world.RGB[name])))


def by_cell(objs) -> dict[tuple[int, int], Obj]:
    return {(o.row, o.col): o for o in objs}


def attrs(o: Obj) -> tuple[str, str, str]:
    return (o.colour, o.shape, o.size)


def check_one_error(scene_objs: list[Obj], text: str, category: str) -> None:
    """Assert that the caption `text` describes `scene_objs` with exactly one error of `category`."""
    parsed = world.parse_caption(text)
    assert parsed is not None, f"not a well-formed caption: {text!r}"
    truth, got = by_cell(scene_objs), by_cell(parsed)
    assert len(got) == len(parsed), f"two objects share a cell: {text!r}"
    assert len({(o.colour, o.shape) for o in parsed}) == len(parsed), f"repeated (colour, shape): {text!r}"
    if category == "attribute":
        assert set(got) == set(truth)
        changed = [cell for cell in truth if attrs(truth[cell]) != attrs(got[cell])]
        assert len(changed) == 1, text
        before, after = attrs(truth[changed[0]]), attrs(got[changed[0]])
        assert sum(x != y for x, y in zip(before, after)) == 1, (before, after)
    elif category == "spatial":
        assert sorted(map(attrs, parsed)) == sorted(map(attrs, scene_objs))
        moved = [o for o in scene_objs if (o.row, o.col) not in got or attrs(got[(o.row, o.col)]) != attrs(o)]
        assert len(moved) == 1, text
        new_cells = set(got) - set(truth)
        assert len(new_cells) == 1, text  # the object went to a cell that was empty
        assert attrs(got[new_cells.pop()]) == attrs(moved[0])
    elif category == "existence":
        assert len(parsed) == len(scene_objs) + 1
        for cell, obj in truth.items():
            assert got.get(cell) == obj  # every original object kept, unchanged
        extra = set(got) - set(truth)
        assert len(extra) == 1 and extra.pop() in Scene(tuple(scene_objs)).empty_cells()
    else:
        raise AssertionError(f"unknown category {category}")


# A hand-built scene: every expected answer below is read off this picture.
#   row 0: large red circle (top left), -, large green circle (top right)
#   row 1: -, small blue square (center), -
#   row 2: -, -, small red triangle (bottom right)
HAND = Scene((
    Obj("circle", "red", "large", 0, 0),
    Obj("circle", "green", "large", 0, 2),
    Obj("square", "blue", "small", 1, 1),
    Obj("triangle", "red", "small", 2, 2),
))
HAND_CAPTION = ("a large red circle at top left , a large green circle at top right , "
                "a small blue square at center , a small red triangle at bottom right .")


def test_random_scenes_follow_the_rules(rng):
    sizes = set()
    for _ in range(N_SCENES):
        scene = world.random_scene(rng)
        objs = scene.objects
        sizes.add(len(objs))
        assert 1 <= len(objs) <= world.MAX_OBJECTS
        cells = [(o.row, o.col) for o in objs]
        assert len(set(cells)) == len(cells)
        assert all(cell in world.POSITIONS for cell in cells)
        assert len({(o.colour, o.shape) for o in objs}) == len(objs)
        assert cells == sorted(cells)  # reading order
        assert all(o.size in world.SIZES and o.colour in world.COLOURS and o.shape in world.SHAPES for o in objs)
        assert len(scene.empty_cells()) == 9 - len(objs)
    assert sizes == set(range(1, world.MAX_OBJECTS + 1))


def test_random_scene_respects_bounds(rng):
    for _ in range(20):
        assert len(world.random_scene(rng, min_objects=9, max_objects=9).objects) == 9
        assert len(world.random_scene(rng, min_objects=2, max_objects=3).objects) in (2, 3)


def test_render_draws_each_object_in_its_cell(rng):
    for _ in range(15):
        scene = world.random_scene(rng)
        image = world.render(scene, rng)
        assert image.size == (48, 48) and image.mode == "RGB"
        px = image.load()
        for row in range(3):
            for col in range(3):
                cy, cx = row * 16 + 8, col * 16 + 8
                obj = scene.at(row, col)
                if obj is None:  # objects never reach past their own cell
                    assert classify(px[cx, cy]) == "background", (row, col)
                    continue
                # The shape's centre is within +-2 px of the cell centre, and a shape always covers its centre.
                window = [classify(px[cx + dx, cy + dy]) for dx in range(-2, 3) for dy in range(-2, 3)]
                assert obj.colour in window, (obj, window)
                assert set(window) <= {obj.colour, "background"}, (obj, window)
                if obj.size == "large" and obj.shape != "triangle":
                    assert classify(px[cx, cy]) == obj.colour, obj


def test_caption_round_trips(rng):
    assert world.caption(HAND.objects) == HAND_CAPTION
    assert world.caption(list(reversed(HAND.objects))) == HAND_CAPTION  # order comes from the cells
    assert world.parse_caption(HAND_CAPTION) == list(HAND.objects)
    for _ in range(N_SCENES):
        objs = world.random_scene(rng).objects
        assert world.parse_caption(world.caption(objs)) == list(objs)


@pytest.mark.parametrize("text", [
    "", " .", "a large red circle at top left",  # no final " ."
    "a huge red circle at top left .", "a large purple circle at top left .", "a large red cube at top left .",
    "a large red circle at middle .", "a large red circle near top left .", "the answer is 3 .",
    "an large red circle at top left .",
])
def test_parse_caption_rejects_malformed_text(text):
    assert world.parse_caption(text) is None


@pytest.mark.parametrize("category", ["attribute", "spatial", "existence"])
def test_corrupt_caption_makes_exactly_one_error(rng, category):
    for _ in range(N_SCENES):
        objs = list(world.random_scene(rng).objects)
        out = world.corrupt_caption(objs, rng, error=category)
        assert out is not None
        text, got_category = out
        assert got_category == category
        check_one_error(objs, text, category)


def test_corrupt_caption_random_category_and_impossible_cases(rng):
    seen = set()
    for _ in range(60):
        objs = list(world.random_scene(rng).objects)
        text, category = world.corrupt_caption(objs, rng)
        check_one_error(objs, text, category)
        seen.add(category)
    assert seen == {"attribute", "spatial", "existence"}
    assert world.corrupt_caption([], rng) is None
    full = [Obj(world.SHAPES[i % 3], world.COLOURS[i // 3], "small", i // 3, i % 3) for i in range(9)]
    assert world.corrupt_caption(full, rng, error="spatial") is None  # no empty cell
    assert world.corrupt_caption(full, rng, error="existence") is None
    check_one_error(full, world.corrupt_caption(full, rng)[0], "attribute")  # the only possible error


def test_corrupt_answer_changes_the_answer_keeping_its_type(rng):
    pools = [set(world.COLOURS), set(world.SHAPES), set(world.SIZES), {"yes", "no"}, set(world.POSITIONS.values())]
    for _ in range(N_SCENES):
        for q in world.questions(world.random_scene(rng), rng)[1:]:
            bad = world.corrupt_answer(q, rng)
            assert bad != q.answer
            if q.answer_type == "number":
                assert bad.isdigit()
            elif q.answer_type == "option":
                assert re.fullmatch(r"\( [abc] \)", bad), bad
            else:
                assert any(q.answer in pool and bad in pool for pool in pools), (q.answer, bad)


def test_rewrite_with_error_on_captions_and_closed_responses(rng):
    for _ in range(40):
        objs = list(world.random_scene(rng).objects)
        text = world.caption(objs)
        out = world.rewrite_with_error(text, rng)
        assert out != text and world.parse_caption(out) is not None
    for answer, pool in [("red", world.COLOURS), ("triangle", world.SHAPES), ("large", world.SIZES),
                         ("no", ("yes", "no")), ("bottom left", tuple(world.POSITIONS.values()))]:
        out = world.rewrite_with_error(world.closed_response(answer), rng)
        new = world.final_answer(out)
        assert out == world.closed_response(new) and new != answer and new in pool
    out = world.rewrite_with_error("the answer is ( b ) .", rng)
    assert out in ("the answer is ( a ) .", "the answer is ( c ) .")


@pytest.mark.parametrize("number", range(10))
def test_rewrite_with_error_on_every_digit(number):
    # The toy vocabulary has every digit 0-9, so a model can answer "the answer is 9 ." to any count question.
    for seed in range(5):
        out = world.rewrite_with_error(world.closed_response(str(number)), random.Random(seed))
        assert out is not None
        new = world.final_answer(out)
        assert out == world.closed_response(new) and new.isdigit() and new != str(number)


@pytest.mark.parametrize("text", ["hello world", "describe the image .", "", "the answer is banana ."])
def test_rewrite_with_error_gives_none_outside_both_forms(rng, text):
    assert world.rewrite_with_error(text, rng) is None


def oracle(scene: Scene, instruction: str) -> str:
    """The answer to a closed question, worked out from the scene's objects by the question's plain meaning."""
    objs = scene.objects
    if instruction == "how many objects are there ?":
        return str(len(objs))
    if m := re.fullmatch(r"how many (\w+) objects are there \?", instruction):
        return str(sum(m.group(1) in (o.colour, o.shape) for o in objs))
    if m := re.fullmatch(r"what (colour|shape|size) is the object at ([a-z ]+) \?", instruction):
        return getattr(scene.at(*world.POSITION_CELL[m.group(2)]), m.group(1))
    if m := re.fullmatch(r"which shape is at ([a-z ]+) \? \( a \) (\w+) \( b \) (\w+) \( c \) (\w+)", instruction):
        assert sorted(m.group(2, 3, 4)) == sorted(world.SHAPES)
        shape = scene.at(*world.POSITION_CELL[m.group(1)]).shape
        return f"( {'abc'[list(m.group(2, 3, 4)).index(shape)]} )"
    named = {(o.colour, o.shape): o for o in objs}
    if m := re.fullmatch(r"where is the (\w+) (\w+) \?", instruction):
        return named[m.group(1), m.group(2)].position
    if m := re.fullmatch(r"is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+) \?", instruction):
        first, second = named[m.group(1), m.group(2)], named[m.group(4), m.group(5)]
        holds = {"left of": first.col < second.col, "right of": first.col > second.col,
                 "above": first.row < second.row, "below": first.row > second.row}[m.group(3)]
        return "yes" if holds else "no"
    raise AssertionError(f"unexpected question {instruction!r}")


def test_questions_on_a_hand_built_scene():
    families = set()
    for seed in range(150):
        qs = world.questions(HAND, random.Random(seed))
        assert qs[0].kind == "open" and qs[0].answer_type == "caption" and qs[0].answer == HAND_CAPTION
        assert qs[0].instruction in world.OPEN_INSTRUCTIONS
        assert [q.topic for q in qs] == ["caption", "count", "vqa", "vqa", "spatial", "spatial"]
        assert [q.answer_type for q in qs[1:]] == ["number", "short", "option", "short", "short"]
        assert [q.family for q in qs] == ["caption", *world.CLOSED_FAMILIES]
        for q in qs[1:]:
            assert q.kind == "closed"
            assert q.answer == oracle(HAND, q.instruction), q
            families.add(" ".join(q.instruction.split()[:3]))
    # every question family was drawn at least once across the seeds
    assert {"how many objects", "what colour is", "what shape is", "what size is", "which shape is",
            "where is the"} <= families
    assert {"how many red", "how many circle"} & families and any(f.startswith("is the") for f in families)


def test_questions_hand_checked_examples():
    # Answers written out literally from the picture above HAND, in case `oracle` shares a mistake with `world`.
    answers = {}
    for seed in range(300):
        for q in world.questions(HAND, random.Random(seed))[1:]:
            answers[q.instruction] = q.answer
    literal = {
        "how many objects are there ?": "4", "how many red objects are there ?": "2",
        "how many yellow objects are there ?": "0", "how many circle objects are there ?": "2",
        "what colour is the object at center ?": "blue", "what size is the object at top right ?": "large",
        "what shape is the object at bottom right ?": "triangle", "where is the red triangle ?": "bottom right",
        "is the red circle left of the green circle ?": "yes", "is the red circle above the green circle ?": "no",
        "is the red triangle below the blue square ?": "yes", "is the blue square right of the red triangle ?": "no",
    }
    drawn = [instruction for instruction in literal if instruction in answers]
    assert len(drawn) >= 8  # most were drawn
    for instruction in drawn:
        assert answers[instruction] == literal[instruction], instruction


def test_questions_on_random_scenes(rng):
    for _ in range(N_SCENES):
        scene = world.random_scene(rng)
        qs = world.questions(scene, rng)
        assert qs[0].answer == world.caption(scene.objects)
        for q in qs[1:]:
            assert q.answer == oracle(scene, q.instruction), q


def test_single_object_scene_has_no_relation_question(rng):
    scene = Scene((Obj("square", "yellow", "small", 1, 2),))
    qs = world.questions(scene, rng)
    assert len(qs) == 5 and not any(q.instruction.startswith("is the") for q in qs)
    assert [q.family for q in qs] == ["caption", "count", "attribute", "option", "where"]
    assert qs[-1].answer == "right"


@pytest.mark.parametrize("category", world.CATEGORIES)
def test_benchmark_item_pairs_truth_with_one_error(rng, category):
    made = 0
    for _ in range(40):
        scene = world.random_scene(rng)
        item = world.benchmark_item(scene, rng, category)
        if item is None:
            continue
        made += 1
        question, good, bad = item
        assert good != bad
        if question.kind == "open":
            assert category in ("attribute", "spatial", "existence")
            assert good == world.caption(scene.objects)
            check_one_error(list(scene.objects), bad, category)
        else:
            assert category in ("count", "vqa", "spatial") and question.topic == category
            assert question.answer == oracle(scene, question.instruction)
            assert good == world.closed_response(question.answer)
            bad_answer = world.final_answer(bad)
            assert bad == world.closed_response(bad_answer) and bad_answer != question.answer
    assert made >= 30
