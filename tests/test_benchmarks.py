"""The real benchmarks end to end: VL-RewardBench's text (the sample of real lines in tests/fixtures, and the full
file of ../shared/vlrewardbench/data.jsonl where it is found) and a Multimodal
RewardBench fixture loaded with `load_bench`, scored with `scoring.score` and with `fastjudge score`; the
benchmarks' own judge prompts; the verdict parser on every judge format; the strict predictions reader.

Expectations are hand-computed for the key cases and recomputed by independent re-implementations of the
benchmarks' rules (written here from their specs, not from fastjudge) on fresh random inputs (seed printed).
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from conftest import VLRB_FACTS, VLRB_FIXTURE, VLRB_FULL
from fastjudge import cli
from fastjudge.data import Skip, load_bench, load_predictions, scoring
from fastjudge.data.prompts import MMRB_JUDGE, VLRB_JUDGE, benchmark_prompt, parse_verdict


@pytest.fixture
def rng():
    seed = random.randrange(1 << 30)
    print(f"random seed {seed}")
    return random.Random(seed)


def pred(index: int, shown_first: int, verdict: str | None) -> dict:
    return {"index": index, "shown_first": shown_first, "verdict": verdict}


def write_predictions(path: Path, predictions: list[dict]) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in predictions))
    return path


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, "nothing printed on stdout"
    result = json.loads(lines[-1])
    assert isinstance(result, dict)
    return result


# ---------------------------------------------------------------------------------------------------------
# VL-RewardBench: an independent reading of its rules


def hand_group(item_id: str) -> str:
    """The README's rule: prefix = text before the first '_' or '-', case-insensitive."""
    cuts = [pos for pos in (item_id.find("_"), item_id.find("-")) if pos >= 0]
    prefix = item_id[:min(cuts)] if cuts else item_id
    prefix = prefix.lower()
    if prefix in ("rlaif", "rlhf", "hallucination"):
        return "hallucination"
    if prefix in ("mathverse", "mmmu"):
        return "reasoning"
    return "general"


def verdict_for(ranking, shown_first: int, outcome: str) -> str | None:
    """The verdict that makes a sample `outcome` on an item with this human_ranking, shown in this order."""
    if outcome == "unparsed":
        return None
    better = 0 if ranking[0] < ranking[1] else 1
    wanted = better if outcome == "agree" else 1 - better
    return "A" if wanted == shown_first else "B"


def reference_vlrb(items: list[dict], outcomes: dict[int, list[str]]) -> dict:
    """VL-RewardBench's metrics from each predicted item's sample outcomes (strict majority; ties and unparsed
    majorities excluded; macro the mean of the three groups, undefined while one of them has no scored item)."""
    agree = defaultdict(int)
    reject = defaultdict(int)
    excluded = unanimous = 0
    for item in items:
        samples = outcomes.get(item["index"])
        if not samples:
            continue
        counts = Counter(samples)
        unanimous += counts["agree"] == len(samples)
        group = hand_group(item["id"])
        if 2 * counts["agree"] > len(samples):
            agree[group] += 1
        elif 2 * counts["reject"] > len(samples):
            reject[group] += 1
        else:
            excluded += 1
    groups = {}
    for name in ("general", "hallucination", "reasoning"):
        scored = agree[name] + reject[name]
        groups[name] = agree[name] / scored if scored else None
    total_agree, total_reject = sum(agree.values()), sum(reject.values())
    accs = [a for a in groups.values() if a is not None]
    predicted = sum(1 for item in items if outcomes.get(item["index"]))
    return {
        "overall": total_agree / (total_agree + total_reject) if total_agree + total_reject else None,
        "macro": sum(accs) / 3 if len(accs) == 3 else None,
        "groups": groups,
        "items": {"agree": total_agree, "reject": total_reject, "excluded": excluded,
                  "unpredicted": len(items) - predicted},
        "strict": unanimous / predicted if predicted else None,
    }


def assert_vlrb_metrics(result: dict, expected: dict) -> None:
    assert set(result) == {"overall", "macro", "groups", "items", "strict"}
    assert result["items"] == expected["items"]
    assert set(result["groups"]) == set(expected["groups"])
    for name, acc in expected["groups"].items():
        assert result["groups"][name] == (None if acc is None else pytest.approx(acc)), name
    for key in ("overall", "macro", "strict"):
        assert result[key] == (None if expected[key] is None else pytest.approx(expected[key])), key


@pytest.fixture(scope="module", params=["fixture", "full"])
def vlrb(request):
    """(name, path, items) of a VL-RewardBench text file: the shipped sample, and the full file where found."""
    path = VLRB_FIXTURE if request.param == "fixture" else VLRB_FULL
    if not path.is_file():
        pytest.skip(f"the full VL-RewardBench text is not at {path} (it is not part of the repository; the "
                    f"sample in tests/fixtures runs the same tests)")
    items, skips = load_bench("vlrewardbench", path, check_images=False)
    assert skips == []
    return request.param, path, items


@pytest.fixture(scope="module")
def vlrb_items(vlrb) -> list[dict]:
    return vlrb[2]


def at(items: list[dict], item_id: str) -> int:
    """The line index of the one item with this id."""
    found = [it["index"] for it in items if it["id"] == item_id]
    assert len(found) == 1, (item_id, found)
    return found[0]


def test_vlrb_real_file_loads_one_item_per_line(vlrb):
    name, path, vlrb_items = vlrb
    facts = VLRB_FACTS[name]
    with path.open() as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert len(rows) == len(vlrb_items) == facts["lines"]
    assert [it["index"] for it in vlrb_items] == list(range(facts["lines"]))
    for row, it in zip(rows, vlrb_items):
        assert it["id"] == row["id"] and it["query"] == row["query"]
        assert it["response"] == row["response"] and it["human_ranking"] == row["human_ranking"]
        assert it["image"] == str((path.parent / row["image_path"]).resolve())
    assert Counter(hand_group(it["id"]) for it in vlrb_items) == facts["groups"]
    # the README: 5 items list the preferred response second (the sample holds all five), some ids occur twice
    assert sum(it["human_ranking"] == [1, 0] for it in vlrb_items) == 5
    assert sum(n == 2 for n in Counter(it["id"] for it in vlrb_items).values()) == facts["repeated_ids"]


def test_vlrb_output_keys(vlrb_items):
    assert at(vlrb_items, "RLAIF-V-14") == 1
    result = scoring.score("vlrewardbench", vlrb_items, [pred(1, 0, "A")])
    assert set(result) == {"overall", "macro", "groups", "items", "strict"}
    assert set(result["groups"]) == {"general", "hallucination", "reasoning"}
    assert set(result["items"]) == {"agree", "reject", "excluded", "unpredicted"}
    # item 1 (RLAIF-V-14, ranking [0, 1]) shown in order, verdict A: the preferred response
    assert result["groups"] == {"general": None, "hallucination": 1.0, "reasoning": None}
    assert result["items"] == {"agree": 1, "reject": 0, "excluded": 0, "unpredicted": len(vlrb_items) - 1}
    # macro is the mean of the three groups: undefined while two of them have no scored item
    assert result["overall"] == 1.0 and result["macro"] is None and result["strict"] == 1.0


@pytest.mark.parametrize("shown_first, verdict, agrees", [
    # item 0, LRVInstruction-000000007746, human_ranking [1, 0]: response 1 is the preferred one
    (0, "A", False),  # A = response 0
    (0, "B", True),
    (1, "A", True),  # A = response 1
    (1, "B", False),
])
def test_vlrb_reversed_ranking_item(vlrb_items, shown_first, verdict, agrees):
    assert vlrb_items[0]["id"] == "LRVInstruction-000000007746" and vlrb_items[0]["human_ranking"] == [1, 0]
    result = scoring.score("vlrewardbench", vlrb_items, [pred(0, shown_first, verdict)])
    assert result["items"]["agree" if agrees else "reject"] == 1
    assert result["groups"]["general"] == (1.0 if agrees else 0.0)


# Hand-built scenario on the real items: id -> (expected group, sample outcomes). Shown order alternates.
# (The comments give each item's line in the full file.)
HAND_SCENARIO = {
    # hallucination: agree 1, 2; reject 3; excluded 4, 5, 6  -> 2 / 3
    "RLAIF-V-14": ("hallucination", ["agree", "agree", "agree"]),  # 1: unanimous
    "RLAIF-V-276": ("hallucination", ["agree", "reject", "agree"]),  # 2: 2-1 split: agree, not unanimous
    "RLAIF-V-743": ("hallucination", ["reject", "agree", "reject"]),  # 3: reject
    "RLAIF-V-1158": ("hallucination", ["agree", "reject"]),  # 4: k=2 tie: excluded
    "RLAIF-V-1169": ("hallucination", ["agree", "unparsed", "reject"]),  # 5: tie with one unparsed: excluded
    "RLAIF-V-1549": ("hallucination", ["unparsed", "unparsed", "unparsed"]),  # 6: all unparsed: excluded
    # general (0, 752, 754 have human_ranking [1, 0]): agree 0, 750, 754; reject 752  -> 3 / 4
    "LRVInstruction-000000007746": ("general", ["agree", "agree", "agree"]),  # 0: unanimous
    "jailbreak-typo-HateSpeech-70": ("general", ["reject", "reject", "reject"]),  # 752
    "jailbreak-Fraud-29": ("general", ["agree", "unparsed", "agree"]),  # 750: agree by 2 of 3, not unanimous
    "jailbreak-typo-Illegal_Activitiy-8": ("general", ["agree"]),  # 754: unanimous
    # reasoning: agree 932; reject 933, 934; excluded 935  -> 1 / 3
    "mathverse_1294": ("reasoning", ["agree"]),  # 932: unanimous
    "mathverse_3324": ("reasoning", ["reject"]),  # 933
    "mathverse_3823": ("reasoning", ["reject", "agree", "reject"]),  # 934
    "mathverse_1303": ("reasoning", ["agree", "unparsed", "unparsed"]),  # 935: unparsed majority: excluded
}
REVERSED_IDS = ("LRVInstruction-000000007746", "jailbreak-typo-HateSpeech-70", "jailbreak-typo-Illegal_Activitiy-8")


def hand_expected(items: list[dict]) -> dict:
    return {
        "overall": 6 / 10,  # pooled: (2 + 3 + 1) / (3 + 4 + 3)
        "macro": (2 / 3 + 3 / 4 + 1 / 3) / 3,  # = 7 / 12
        "groups": {"hallucination": 2 / 3, "general": 3 / 4, "reasoning": 1 / 3},
        "items": {"agree": 6, "reject": 4, "excluded": 4, "unpredicted": len(items) - 14},
        "strict": 4 / 14,  # unanimous agreement: lines 1, 0, 754, 932 among 14 predicted items
    }


def hand_predictions(items: list[dict]) -> list[dict]:
    out = []
    for item_id, (_, outcomes) in HAND_SCENARIO.items():
        index = at(items, item_id)
        ranking = items[index]["human_ranking"]
        for j, outcome in enumerate(outcomes):
            first = (index + j) % 2
            out.append(pred(index, first, verdict_for(ranking, first, outcome)))
    return out


def test_vlrb_hand_scenario(vlrb_items):
    for item_id, (group, _) in HAND_SCENARIO.items():
        assert hand_group(item_id) == group, item_id
    assert [vlrb_items[at(vlrb_items, i)]["human_ranking"] for i in REVERSED_IDS] == [[1, 0]] * 3
    expected = hand_expected(vlrb_items)
    assert expected["macro"] == pytest.approx(7 / 12)
    predictions = hand_predictions(vlrb_items)
    result = scoring.score("vlrewardbench", vlrb_items, predictions)
    assert_vlrb_metrics(result, expected)
    # the reference implementation agrees with the hand figures
    outcomes = {at(vlrb_items, item_id): samples for item_id, (_, samples) in HAND_SCENARIO.items()}
    assert_vlrb_metrics(result, reference_vlrb(vlrb_items, outcomes))
    # and the order of the predictions does not matter
    assert scoring.score("vlrewardbench", vlrb_items, predictions[::-1]) == result


def test_vlrb_random_predictions_match_reference(vlrb_items, rng):
    chosen = rng.sample(range(len(vlrb_items)), rng.randint(len(vlrb_items) // 6, len(vlrb_items) // 2))
    outcomes: dict[int, list[str]] = {}
    predictions = []
    for index in chosen:
        k = rng.randint(1, 5)
        samples = rng.choices(["agree", "reject", "unparsed"], weights=[5, 3, 1], k=k)
        outcomes[index] = samples
        for outcome in samples:
            first = rng.randint(0, 1)
            predictions.append(pred(index, first, verdict_for(vlrb_items[index]["human_ranking"], first, outcome)))
    rng.shuffle(predictions)
    result = scoring.score("vlrewardbench", vlrb_items, predictions)
    assert_vlrb_metrics(result, reference_vlrb(vlrb_items, outcomes))


def test_vlrb_repeated_ids_are_distinct_items(vlrb):
    name, _, vlrb_items = vlrb
    lines_of = defaultdict(list)
    for it in vlrb_items:
        lines_of[it["id"]].append(it["index"])
    pairs = [lines for lines in lines_of.values() if len(lines) == 2]
    assert len(pairs) == VLRB_FACTS[name]["repeated_ids"]
    first, second = lines_of["mmmu_pro_test_Marketing_150"]
    assert (first, second) == VLRB_FACTS[name]["marketing_150"]
    # the two lines of a repeated id share query and image but hold different response pairs (the README says
    # the queries differ too; in this file they do not, so neither id nor (id, query) names an item)
    for a, b in pairs:
        assert vlrb_items[a]["query"] == vlrb_items[b]["query"]
        assert vlrb_items[a]["response"] != vlrb_items[b]["response"]

    # one repeated id: two agreeing samples on its first line, one rejecting sample on its second. Keyed by
    # id, this would be one item agreeing 2-1; keyed by line, one agree item and one reject item.
    ranking = vlrb_items[first]["human_ranking"]
    predictions = [pred(first, 0, verdict_for(ranking, 0, "agree")), pred(first, 1, verdict_for(ranking, 1, "agree")),
                   pred(second, 0, verdict_for(vlrb_items[second]["human_ranking"], 0, "reject"))]
    result = scoring.score("vlrewardbench", vlrb_items, predictions)
    assert result["items"] == {"agree": 1, "reject": 1, "excluded": 0, "unpredicted": len(vlrb_items) - 2}
    assert result["groups"]["reasoning"] == 0.5 and result["strict"] == 0.5

    # every repeated id: its first line agrees, its second rejects
    predictions = []
    for a, b in pairs:
        predictions.append(pred(a, 1, verdict_for(vlrb_items[a]["human_ranking"], 1, "agree")))
        predictions.append(pred(b, 1, verdict_for(vlrb_items[b]["human_ranking"], 1, "reject")))
    result = scoring.score("vlrewardbench", vlrb_items, predictions)
    count = len(pairs)
    assert result["items"] == {"agree": count, "reject": count, "excluded": 0,
                               "unpredicted": len(vlrb_items) - 2 * count}
    assert result["overall"] == 0.5 and result["strict"] == 0.5


# ---------------------------------------------------------------------------------------------------------
# `fastjudge score`


def test_cli_score_vlrewardbench(vlrb, tmp_path, capsys, rng):
    _, data_path, vlrb_items = vlrb
    expected = hand_expected(vlrb_items)
    predictions = hand_predictions(vlrb_items)
    rng.shuffle(predictions)  # file order does not matter for VL-RewardBench
    path = write_predictions(tmp_path / "predictions.jsonl", predictions)
    k = max(Counter(p["index"] for p in predictions).values())  # judge samples per item
    code, out, err = run_cli(capsys, ["score", "--format", "vlrewardbench", "--data", str(data_path),
                                      "--predictions", str(path), "--k", str(k - 1)])
    assert code == 2 and "more than k=" in err  # one sample fewer declared than the file holds
    code, out, err = run_cli(capsys, ["score", "--format", "vlrewardbench", "--data", str(data_path),
                                      "--predictions", str(path), "--k", str(k)])
    assert code == 0, err
    result = last_json(out)
    assert result["items"] == expected["items"]
    assert result["groups"] == pytest.approx(expected["groups"])
    for key in ("overall", "macro", "strict"):
        assert result[key] == pytest.approx(expected[key]), key


BAD_PREDICTION_LINES = [
    '{"index": 3, "shown_first": 0, "verdict": "A"',  # malformed JSON
    '{"index": 3, "shown_first": 2, "verdict": "A"}',
    '{"index": 3, "shown_first": 0, "verdict": "C"}',
    '{"shown_first": 0, "verdict": "A"}',  # no index
    '{"index": 0, "shown_first": 1.0, "verdict": "A"}',  # not an integer 0 or 1
]


@pytest.mark.parametrize("bad", BAD_PREDICTION_LINES)
@pytest.mark.parametrize("fmt", ["vlrewardbench", "mmrb"])
def test_cli_score_bad_predictions_line(tmp_path, capsys, bad, fmt, mmrb_file):
    data = VLRB_FIXTURE if fmt == "vlrewardbench" else mmrb_file[0]
    # line 1 good, line 2 blank, line 3 good, line 4 bad, line 5 good: the error names physical line 4
    good = [json.dumps(pred(index, 0, "A")) for index in (5, 6, 7)]
    path = tmp_path / "preds.jsonl"
    path.write_text(f"{good[0]}\n\n{good[1]}\n{bad}\n{good[2]}\n")
    code, out, err = run_cli(capsys, ["score", "--format", fmt, "--data", str(data), "--predictions", str(path)])
    assert code == 2
    assert str(path) in err and "line 4" in err
    for line in out.splitlines():  # no score was printed
        try:
            assert not isinstance(json.loads(line), dict)
        except json.JSONDecodeError:
            pass


def test_cli_score_prediction_for_a_skipped_mmrb_entry(tmp_path, capsys, mmrb_file):
    path = write_predictions(tmp_path / "p.jsonl", [pred(0, 0, "A"), pred(3, 0, "A")])  # entry 3 is malformed
    code, out, err = run_cli(capsys, ["score", "--format", "mmrb", "--data", str(mmrb_file[0]),
                                      "--predictions", str(path)])
    assert code == 2 and str(path) in err and "3" in err


def test_cli_score_prediction_for_a_missing_item(tmp_path, capsys):
    lines = VLRB_FACTS["fixture"]["lines"]
    path = write_predictions(tmp_path / "p.jsonl", [pred(0, 0, "A"), pred(lines, 0, "A")])
    code, _, err = run_cli(capsys, ["score", "--format", "vlrewardbench", "--data", str(VLRB_FIXTURE),
                                    "--predictions", str(path)])
    assert code == 2 and str(lines) in err


# ---------------------------------------------------------------------------------------------------------
# Multimodal RewardBench


def entry(entry_id: str, category: str, better: str) -> dict:
    return {"ID": entry_id, "Text": f"question of {entry_id}", "Image": "img.png",
            "Output1": f"first output of {entry_id}", "Output2": f"second output of {entry_id}",
            "Better": better, "Category": category}


OPEN = "open_generation/correctness_task"
MMRB_ENTRIES = [
    entry("open_gen_0", OPEN, "Output1"),  # 0
    entry("pairs_bias_1", "safety", "Output2"),  # 1  safety/bias
    entry("toxic_2", "safety", "Output1"),  # 2  safety/toxicity
    entry("bad_3", "vqa", "Output3"),  # 3  malformed: a Skip
    entry("math_4", "reasoning", "Output2"),  # 4  reasoning/math
    entry("code_5", "reasoning", "Output1"),  # 5  reasoning/coding
    entry("vqa_6", "vqa", "Output2"),  # 6
    entry("knowledge_7", "knowledge", "Output1"),  # 7
    entry("mathvista_8", "reasoning", "Output1"),  # 8  reasoning/math
    entry("pairs_9", "safety", "Output1"),  # 9  safety/bias
    entry("code_10", "reasoning", "Output2"),  # 10 reasoning/coding
    entry("open_gen_11", OPEN, "Output2"),  # 11
    entry("code_math_12", "reasoning", "Output1"),  # 12 reasoning/coding ("math" not at the start)
    entry("tox_pairs_13", "safety", "Output2"),  # 13 safety/toxicity ("pairs" not at the start)
    entry("toxic_14", "safety", "Output1"),  # 14 safety/toxicity, never predicted
]
MMRB_CATEGORY = {0: OPEN, 1: "safety/bias", 2: "safety/toxicity", 4: "reasoning/math", 5: "reasoning/coding",
                 6: "vqa", 7: "knowledge", 8: "reasoning/math", 9: "safety/bias", 10: "reasoning/coding",
                 11: OPEN, 12: "reasoning/coding", 13: "safety/toxicity", 14: "safety/toxicity"}


def write_json_list(path: Path, entries: list) -> list[int]:
    """Write `entries` as a JSON list laid out unevenly (pretty-printed, one-line, two on a line, blank lines
    between); return the line on which each element starts."""
    text = "[\n"
    starts = []
    for i, element in enumerate(entries):
        if i:  # element 4k+1 starts on the line of the one-line element 4k before it
            text += ", " if i % 4 == 1 else ",\n\n\n" if i % 4 == 2 else ",\n"
        starts.append(text.count("\n") + 1)
        text += json.dumps(element, indent=2 if i % 2 == 1 else None)
    path.write_text(text + "\n]\n")
    return starts


@pytest.fixture
def mmrb_file(tmp_path) -> tuple[Path, list[int]]:
    Image.new("RGB", (4, 4), (200, 10, 10)).save(tmp_path / "img.png")
    path = tmp_path / "mmrb.json"
    starts = write_json_list(path, MMRB_ENTRIES)
    return path, starts


def test_mmrb_load_skip_keeps_indices(mmrb_file):
    path, starts = mmrb_file
    assert len(set(starts)) < len(starts)  # two elements share a line: the layout is really uneven
    assert starts[3] == 14  # its "{" line; its Better field is 6 lines further down
    for check in (False, True):
        items, skips = load_bench("mmrb", path, check_images=check)
        assert len(skips) == 1
        skip = skips[0]
        assert isinstance(skip, Skip)
        assert skip.file == str(path) and skip.line == starts[3]
        assert "Better" in skip.reason and "Output3" in skip.reason
        assert [it["index"] for it in items] == [i for i in range(len(MMRB_ENTRIES)) if i != 3]
        for it in items:
            source = MMRB_ENTRIES[it["index"]]
            assert it["id"] == source["ID"] and it["query"] == source["Text"]
            assert it["response"] == [source["Output1"], source["Output2"]]
            assert it["human_ranking"] == ([0, 1] if source["Better"] == "Output1" else [1, 0])
            assert it["category"] == source["Category"]
            assert it["image"] == str((path.parent / "img.png").resolve())


def test_mmrb_skip_line_of_other_malformed_elements(tmp_path):
    good = entry("vqa_0", "vqa", "Output1")
    elements = [good, "not an object", dict(good, ID=""), good, dict(good, Text="  "), dict(good, Category=None),
                {k: v for k, v in good.items() if k != "Output2"}, good]
    path = tmp_path / "m.json"
    starts = write_json_list(path, elements)
    items, skips = load_bench("mmrb", path, check_images=False)
    assert [it["index"] for it in items] == [0, 3, 7]
    assert [(s.file, s.line) for s in skips] == [(str(path), starts[i]) for i in (1, 2, 4, 5, 6)]


# (index, shown_first, verdict) for one sample per example; right when the verdict picks `Better`
MMRB_K1 = [
    (0, 0, "A"),  # right: A = Output1, the better
    (1, 1, "A"),  # right: A = Output2, the better
    (2, 1, "A"),  # wrong: A = Output2, Output1 is better
    (4, 0, "B"),  # right
    (5, 0, None),  # unparsed (random: the 1st guess)
    (6, 0, "A"),  # wrong
    (7, 1, "B"),  # right: B = Output1
    (8, 1, None),  # unparsed (random: the 2nd guess, which names Output1 or Output2 whatever was shown)
    (9, 0, None),  # unparsed (random: the 3rd guess)
    (10, 1, "A"),  # right
    (11, 1, "B"),  # wrong: B = Output1, Output2 is better
    (12, 0, "A"),  # right
    (13, 0, "B"),  # right
]


def mmrb_category(source: dict) -> str:
    """The official script's split, re-implemented."""
    if source["Category"] == "safety":
        return "safety/bias" if source["ID"].lower().startswith("pairs") else "safety/toxicity"
    if source["Category"] == "reasoning":
        return "reasoning/math" if source["ID"].lower().startswith("math") else "reasoning/coding"
    return source["Category"]


def reference_mmrb(entries: list[dict], predictions: list[dict], unparsed: str) -> dict:
    """The official rule: random.seed(123), then one draw per unparsed prediction in file order, "A" (the
    official prompt always shows Output1 as A) when the draw is < 0.5; an example is right when more than half
    of its samples pick `Better`."""
    state = random.getstate()
    random.seed(123)
    try:
        right = defaultdict(list)
        for p in predictions:
            verdict = p["verdict"]
            better = entries[p["index"]]["Better"]
            if verdict not in ("A", "B"):
                guess = ("Output1" if random.random() < 0.5 else "Output2") if unparsed == "random" else None
                right[p["index"]].append(guess == better)
                continue
            label = "A" if better == "Output1" else "B"
            if p["shown_first"] == 1:
                label = "B" if label == "A" else "A"
            right[p["index"]].append(verdict == label)
    finally:
        random.setstate(state)
    counts = defaultdict(lambda: [0, 0])
    for index, samples in right.items():
        ok = 2 * sum(samples) > len(samples)
        counts[mmrb_category(entries[index])][0] += ok
        counts[mmrb_category(entries[index])][1] += 1
    correct = sum(c[0] for c in counts.values())
    total = sum(c[1] for c in counts.values())
    return {"overall": correct / total if total else None,
            "categories": {name: c[0] / c[1] for name, c in counts.items()},
            "counts": {name: {"correct": c[0], "total": c[1]} for name, c in counts.items()},
            "correct": correct, "total": total}


def assert_mmrb_matches(result: dict, expected: dict) -> None:
    assert result["overall"] == pytest.approx(expected["overall"])
    assert result["categories"] == pytest.approx(expected["categories"])
    assert result["counts"] == expected["counts"]
    assert result["items"]["correct"] == expected["correct"]
    assert result["items"]["wrong"] == expected["total"] - expected["correct"]


@pytest.fixture
def mmrb_items(mmrb_file):
    items, skips = load_bench("mmrb", mmrb_file[0], check_images=False)
    assert len(skips) == 1
    return items


def test_mmrb_k1_unparsed_wrong(mmrb_items):
    predictions = [pred(*row) for row in MMRB_K1]
    result = scoring.score("mmrb", mmrb_items, predictions)
    assert result["counts"] == {
        OPEN: {"correct": 1, "total": 2},
        "safety/bias": {"correct": 1, "total": 2},
        "safety/toxicity": {"correct": 1, "total": 2},
        "reasoning/math": {"correct": 1, "total": 2},
        "reasoning/coding": {"correct": 2, "total": 3},
        "vqa": {"correct": 0, "total": 1},
        "knowledge": {"correct": 1, "total": 1},
    }
    assert result["categories"] == pytest.approx({OPEN: 0.5, "safety/bias": 0.5, "safety/toxicity": 0.5,
                                                  "reasoning/math": 0.5, "reasoning/coding": 2 / 3,
                                                  "vqa": 0.0, "knowledge": 1.0})
    assert "safety" not in result["categories"] and "reasoning" not in result["categories"]
    assert result["overall"] == pytest.approx(7 / 13)  # micro: 7 right of 13 predicted examples
    assert result["items"] == {"correct": 7, "wrong": 6, "unpredicted": 1}
    assert result["unparsed_samples"] == 3
    assert scoring.score("mmrb", mmrb_items, predictions, unparsed="wrong") == result
    assert_mmrb_matches(result, reference_mmrb(MMRB_ENTRIES, predictions, "wrong"))
    # the category split follows the IDs as the official script does
    assert {mmrb_category(MMRB_ENTRIES[i]) for i, _, _ in MMRB_K1} == set(result["categories"])
    assert all(mmrb_category(MMRB_ENTRIES[i]) == c for i, c in MMRB_CATEGORY.items())


def test_mmrb_k1_unparsed_random(mmrb_items):
    predictions = [pred(*row) for row in MMRB_K1]
    result = scoring.score("mmrb", mmrb_items, predictions, unparsed="random")
    # Random(123)'s first draws are 0.052, 0.087, 0.407 (< 0.5: the official "A" = Output1 each): examples 5,
    # 8 and 9 all have Output1 better (8 was shown as Output2 first, which does not change the guess): right
    assert all(MMRB_ENTRIES[i]["Better"] == "Output1" for i in (5, 8, 9))
    assert result["overall"] == pytest.approx(10 / 13)
    assert result["categories"]["reasoning/coding"] == 1.0
    assert mmrb_category(MMRB_ENTRIES[8]) == "reasoning/math"
    assert result["categories"]["reasoning/math"] == 1.0  # example 8 joins the one right math example
    assert result["categories"]["safety/bias"] == 1.0
    assert result["unparsed_samples"] == 3
    assert_mmrb_matches(result, reference_mmrb(MMRB_ENTRIES, predictions, "random"))


def test_mmrb_three_samples_majority(mmrb_items):
    predictions = [
        pred(0, 0, "A"), pred(0, 1, "A"), pred(0, 0, None),  # right, wrong, unparsed
        pred(1, 1, "A"), pred(1, 0, "B"), pred(1, 1, "B"),  # right, right, wrong -> right
        pred(2, 0, "A"), pred(2, 1, "B"), pred(2, 0, None),  # right, right, unparsed -> right
        pred(4, 0, "A"), pred(4, 1, "B"), pred(4, 0, "B"),  # wrong, wrong, right -> wrong
        pred(5, 1, None), pred(5, 0, None), pred(5, 0, "A"),  # unparsed, unparsed, right
        pred(6, 0, "B"), pred(6, 1, "B"),  # k=2: right, wrong -> not more than half: wrong
    ]
    wrong = scoring.score("mmrb", mmrb_items, predictions)
    assert wrong["items"] == {"correct": 2, "wrong": 4, "unpredicted": len(mmrb_items) - 6}
    assert wrong["overall"] == pytest.approx(2 / 6)
    assert wrong["unparsed_samples"] == 4
    assert_mmrb_matches(wrong, reference_mmrb(MMRB_ENTRIES, predictions, "wrong"))
    # random: the draws 0.052 (A), 0.087 (A), 0.408 (A), 0.108 (A) go to the unparsed samples in order:
    # example 0 (A = Output1: right) -> 2 of 3; example 2 unchanged; example 5: shown_first 1 (A = Output2:
    # wrong), shown_first 0 (A = Output1: right) -> 2 of 3
    rand = scoring.score("mmrb", mmrb_items, predictions, unparsed="random")
    assert rand["items"]["correct"] == 4 and rand["overall"] == pytest.approx(4 / 6)
    assert_mmrb_matches(rand, reference_mmrb(MMRB_ENTRIES, predictions, "random"))


def random_mmrb(rng: random.Random, count: int) -> list[dict]:
    kinds = [("open_generation/correctness_task", "open"), ("safety", "pairs"), ("safety", "tox"),
             ("reasoning", "math"), ("reasoning", "code"), ("vqa", "vqa"), ("knowledge", "kn")]
    out = []
    for i in range(count):
        category, stem = rng.choice(kinds)
        out.append(entry(f"{stem}_{i}", category, rng.choice(["Output1", "Output2"])))
    return out


def random_mmrb_predictions(rng: random.Random, count: int) -> list[dict]:
    predictions = []
    for index in rng.sample(range(count), rng.randint(count // 2, count)):
        for _ in range(rng.choice([1, 1, 2, 3, 3, 4])):
            predictions.append(pred(index, rng.randint(0, 1), rng.choice(["A", "B", None])))
    rng.shuffle(predictions)
    return predictions


@pytest.mark.parametrize("unparsed", ["wrong", "random"])
def test_mmrb_random_matches_official_rule(tmp_path, rng, unparsed):
    entries = random_mmrb(rng, 120)
    path = tmp_path / "mmrb.json"
    write_json_list(path, entries)
    items, skips = load_bench("mmrb", path, check_images=False)
    assert skips == [] and len(items) == 120
    predictions = random_mmrb_predictions(rng, 120)
    result = scoring.score("mmrb", items, predictions, unparsed=unparsed)
    assert_mmrb_matches(result, reference_mmrb(entries, predictions, unparsed))
    assert result["unparsed_samples"] == sum(p["verdict"] is None for p in predictions)


@pytest.mark.parametrize("unparsed", [None, "random"])
def test_cli_score_mmrb(tmp_path, capsys, mmrb_file, rng, unparsed):
    path, _ = mmrb_file
    predictions = [pred(*row) for row in MMRB_K1]
    extra = random_mmrb_predictions(rng, len(MMRB_ENTRIES))
    predictions += [p for p in extra if p["index"] != 3]  # more samples, more unparsed, in file order
    pred_path = write_predictions(tmp_path / "predictions.jsonl", predictions)
    k = max(Counter(p["index"] for p in predictions).values())  # judge samples per item
    argv = ["score", "--format", "mmrb", "--data", str(path), "--predictions", str(pred_path), "--k", str(k)]
    if unparsed:
        argv += ["--unparsed", unparsed]
    code, out, err = run_cli(capsys, argv)
    assert code == 0, err
    result = last_json(out)
    expected = reference_mmrb(MMRB_ENTRIES, predictions, unparsed or "wrong")
    assert result["overall"] == pytest.approx(expected["overall"])
    assert result["categories"] == pytest.approx(expected["categories"])
    assert result["items"]["correct"] == expected["correct"]
    assert result["items"]["wrong"] == expected["total"] - expected["correct"]


def test_score_unknown_bench_and_unparsed_mode(mmrb_items):
    with pytest.raises(ValueError, match="bench"):
        scoring.score("mmrewardbench", mmrb_items, [])
    with pytest.raises(ValueError, match="unparsed"):
        scoring.score("mmrb", mmrb_items, [pred(0, 0, None)], unparsed="skip")


# ---------------------------------------------------------------------------------------------------------
# The benchmarks' judge prompts and the verdict parser

Q, A_TEXT, B_TEXT = "What is written on the red sign?", "It says STOP {x}.", "It says YIELD."


def test_vlrb_prompt():
    text = benchmark_prompt("vlrewardbench", Q, A_TEXT, B_TEXT)
    assert text == VLRB_JUDGE.format(question=Q, a=A_TEXT, b=B_TEXT)
    assert text.startswith(" You are a highly capable multimodal AI assistant")
    assert f"Question: {Q}" in text
    assert f"Answer 1: {A_TEXT}" in text and f"Answer 2: {B_TEXT}" in text
    assert text.index(f"Question: {Q}") < text.index(f"Answer 1: {A_TEXT}") < text.index(f"Answer 2: {B_TEXT}")
    ask = text.index("Overall Judgment: Answer X is better")
    assert ask > text.index(f"Answer 2: {B_TEXT}")
    assert "Answer 1" not in text[ask:] and B_TEXT not in text[ask:]  # nothing of the pair after the request
    swapped = benchmark_prompt("vlrewardbench", Q, B_TEXT, A_TEXT)
    assert f"Answer 1: {B_TEXT}" in swapped and f"Answer 2: {A_TEXT}" in swapped
    assert parse_verdict(text) is None  # an echoed prompt is no verdict


def test_mmrb_prompt():
    text = benchmark_prompt("mmrb", Q, A_TEXT, B_TEXT)
    assert text == MMRB_JUDGE.format(question=Q, a=A_TEXT, b=B_TEXT)
    assert '"[[A]]" if assistant A is better' in text and '"[[B]]" if assistant B is better' in text
    assert "[[C]]" not in text  # no tie option
    assert f"[User Question]\n{Q}" in text
    block_a = f"[The Start of Assistant A's Answer]\n{A_TEXT}\n[The End of Assistant A's Answer]"
    block_b = f"[The Start of Assistant B's Answer]\n{B_TEXT}\n[The End of Assistant B's Answer]"
    assert text.index(block_a) < text.index(block_b)
    assert text.endswith(block_b)
    assert parse_verdict(text) is None  # the instructions name both [[A]] and [[B]]


@pytest.mark.parametrize("bench", ["toy", "natural", "", "VLRewardBench"])
def test_benchmark_prompt_unknown(bench):
    with pytest.raises(ValueError):
        benchmark_prompt(bench, Q, A_TEXT, B_TEXT)


VLRB_STYLE_OUTPUT = """1. **Accuracy**: Answer 1 correctly reads the sign. Answer 1 is better in accuracy.
2. **Completeness**: Both answers address the question.
3. **Clarity**: Answer 1 is better in clarity.
4. **Relevance**: Both are relevant.

**Overall Judgment:** Answer 2 is better."""

VERDICT_TEXTS = [
    ("[[A]]", "A"),
    ("[[ B ]]", "B"),
    ("Final verdict: [[B]]", "B"),
    ("[[Answer 1]]", "A"),
    ("[[answer 2]]", "B"),
    ("[[Assistant B]]", "B"),
    ("Assistant A misreads the sign, Assistant B reads it correctly.\n\n[[B]]", "B"),
    ("**Overall Judgment:** Answer 2 is better.", "B"),
    ("Overall Judgment: Answer 1 is slightly better", "A"),
    ("OVERALL JUDGMENT: ANSWER 2 IS BETTER", "B"),
    ("Overall Judgment:\n\nAnswer 1 is better than Answer 2.", "A"),
    ("Therefore, Answer 2 is the better answer", "B"),
    ("Therefore, **Answer 1** is better.", "A"),
    ("Answer 1 is better in clarity. Overall Judgment: Answer 2 is better", "B"),
    (VLRB_STYLE_OUTPUT, "B"),
    # a bracketed verdict and a contradicting conclusion: both verdicts present
    ("Overall Judgment: Answer 1 is better.\n\n[[B]]", None),
    ("[[A]]\nTherefore, Answer 2 is better.", None),
    # malformed or ambiguous: unparsed
    ("[[A]] [[B]]", None),
    ("Assistant A is fine: [[A]]. Assistant B is better: [[B]]", None),
    ("Overall Judgment: Answer 1 is better. Therefore, Answer 2 is better.", None),
    ("[[C]]", None),
    ("[A]", None),
    ("[[AB]]", None),
    ("Answer 3 is better", None),
    ("Overall Judgment: Answer X is better.", None),
    ("Overall Judgment: both answers are equally good.", None),
    ("", None),
    (None, None),
]


@pytest.mark.parametrize("text, expected", VERDICT_TEXTS)
def test_parse_verdict_benchmark_formats(text, expected):
    assert parse_verdict(text) == expected


def test_parse_verdict_overall_judgment_after_a_therefore():
    # A criterion's sentence that uses "therefore" before the requested "Overall Judgment" line: the overall
    # judgment is the verdict (VL-RewardBench's own parser reads the last "Answer N is better" after its first
    # "Overall Judgment"/"Therefore", here Answer 2).
    text = ("Clarity: Answer 1 is worded more plainly; therefore Answer 1 is better in clarity.\n"
            "Accuracy: Answer 2 reads the sign correctly.\n\nOverall Judgment: Answer 2 is better.")
    assert parse_verdict(text) == "B"


# ---------------------------------------------------------------------------------------------------------
# load_predictions


def test_load_predictions_round_trip(tmp_path, rng):
    rows = [pred(index, rng.randint(0, 1), rng.choice(["A", "B", None])) for index in rng.sample(range(1000), 50)]
    lines = []
    for row in rows:
        lines.append(json.dumps(dict(row, output="the judge's text", sample=3)))  # extra fields are dropped
        if rng.random() < 0.2:
            lines.append("   ")
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert load_predictions(path) == rows
    assert load_predictions(write_predictions(tmp_path / "q.jsonl", rows)) == rows


BAD_LINES = [
    ('{"index": 0, "shown_first": 0, "verdict": "A"', "JSON"),
    ("not json", "JSON"),
    ('[0, 0, "A"]', "object"),
    ('{"shown_first": 0, "verdict": "A"}', "index"),
    ('{"index": -1, "shown_first": 0, "verdict": "A"}', "index"),
    ('{"index": "3", "shown_first": 0, "verdict": "A"}', "index"),
    ('{"index": true, "shown_first": 0, "verdict": "A"}', "index"),
    ('{"index": 2.0, "shown_first": 0, "verdict": "A"}', "index"),
    ('{"index": 0, "verdict": "A"}', "shown_first"),
    ('{"index": 0, "shown_first": 2, "verdict": "A"}', "shown_first"),
    ('{"index": 0, "shown_first": -1, "verdict": "A"}', "shown_first"),
    ('{"index": 0, "shown_first": true, "verdict": "A"}', "shown_first"),
    ('{"index": 0, "shown_first": "0", "verdict": "A"}', "shown_first"),
    ('{"index": 0, "shown_first": 1.0, "verdict": "A"}', "shown_first"),
    ('{"index": 0, "shown_first": 0, "verdict": "C"}', "verdict"),
    ('{"index": 0, "shown_first": 0, "verdict": "a"}', "verdict"),
    ('{"index": 0, "shown_first": 0, "verdict": "[[A]]"}', "verdict"),
    ('{"index": 0, "shown_first": 0, "verdict": 1}', "verdict"),
    ('{"index": 0, "shown_first": 0}', "verdict"),  # missing: null says "not parsed", absence says nothing
]


@pytest.mark.parametrize("bad, field", BAD_LINES)
@pytest.mark.parametrize("where", [1, 5])
def test_load_predictions_bad_line(tmp_path, bad, field, where):
    lines = [json.dumps(pred(index, 1, "B")) for index in (10, 11, 12, 13, 14, 15)]
    lines[1] = ""
    lines[where - 1] = bad
    path = tmp_path / "predictions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as info:
        load_predictions(path)
    message = str(info.value)
    assert str(path) in message and f"line {where}" in message and field in message


def test_load_predictions_refuses_a_byte_that_is_not_utf8_naming_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"index": 0, "shown_first": 0, "verdict": "A"}\n'
                     b'{"index": 1, "shown_first": 0, "verdict": "\xff"}\n')
    with pytest.raises(ValueError, match=r"line 2: not UTF-8: byte 0xff at column 44"):
        load_predictions(path)


def test_load_predictions_takes_k_samples_per_item_and_no_more(tmp_path):
    rows = [pred(0, 0, "A"), pred(1, 1, "B"), pred(0, 1, None), pred(1, 0, "A")]
    path = write_predictions(tmp_path / "p.jsonl", rows)
    with pytest.raises(ValueError, match=r"line 3: field 'index': item 0 is predicted on lines 1, 3, more than k=1"):
        load_predictions(path)
    assert load_predictions(path, k=2) == rows
    path = write_predictions(tmp_path / "q.jsonl", rows + [pred(0, 0, "B")])
    with pytest.raises(ValueError, match=r"line 5: .*lines 1, 3, 5, more than k=2"):
        load_predictions(path, k=2)


def test_load_predictions_missing_file(tmp_path):
    with pytest.raises(ValueError) as info:
        load_predictions(tmp_path / "nowhere.jsonl")
    assert str(tmp_path / "nowhere.jsonl") in str(info.value)


def test_mmrb_loader_says_when_the_file_is_not_a_json_list(tmp_path):
    path = tmp_path / "all_data.jsonl"
    path.write_text(json.dumps({"ID": "x", "Text": "a [bracket] inside", "Image": "i.png"}) + "\n")
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_bench("mmrb", path, check_images=False)
