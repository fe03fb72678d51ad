"""`fastjudge report RUN`: RUN/report.html, one self-contained page to read what a run did.

Accuracy per iteration and category (the table and accuracy.png), the rates per iteration (pairs, keep rate,
labels right where measured), then for each iteration a sample of its pairs, kept and dropped: the image, the
instruction, the two responses, how the pair was made, the judge's judgments in each order and why the filter kept
or dropped it; last, benchmark items the judge got wrong at its best iteration. Images are inline (data: URIs),
the page has no script and fetches nothing: it opens from a file anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import json
import random
from pathlib import Path

from fastjudge.data import load_bench, load_image, read_jsonl, read_records
from fastjudge.data.io import write_text

PAIRS_SHOWN = 3  # kept and dropped pairs shown per iteration, each
WRONG_SHOWN = 6  # benchmark items the best judge got wrong
THUMBNAIL = 192  # pixels on the longer side

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.card { display: flex; gap: 1em; border: 1px solid #ddd; border-radius: 6px; padding: 0.8em; margin: 0.8em 0; }
.card img { width: 192px; height: auto; align-self: flex-start; image-rendering: pixelated; flex: none; }
.kept { border-left: 6px solid #3a3; } .dropped { border-left: 6px solid #c33; }
.response { white-space: pre-wrap; background: #f7f7f7; padding: 0.3em; margin: 0.2em 0; }
.judgment { font-family: monospace; font-size: 0.85em; white-space: pre-wrap; margin: 0.1em 0; }
.why { font-weight: bold; }
"""


def write_report(run: Path | str) -> Path:
    """Write RUN/report.html from the run's files; returns its path. A ValueError names a folder that holds no
    `fastjudge iterate` run (no summary.json)."""
    run = Path(run)
    if not (run / "summary.json").is_file():
        raise ValueError(f"report: {run} holds no fastjudge run (no summary.json)")
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    parts = [f"<h1>fastjudge run {html.escape(run.name)}</h1>", _settings(config, summary), _accuracy(run, summary),
             _rates(summary)]
    for entry in summary["iterations"][1:]:
        parts.append(_iteration(run, entry["iteration"], seed=config.get("seed", 0)))
    parts.append(_wrong(run, summary, config))
    page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>fastjudge report</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    path = run / "report.html"
    write_text(path, page)
    return path


def _e(value) -> str:
    return html.escape(str(value))


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else _e(value)


def _image_uri(path: str | Path) -> str:
    """A PNG thumbnail of the image as a data: URI ("" when it cannot be read)."""
    try:
        image = load_image(path)
    except Exception:  # a report of a moved or partial run still shows the rest
        return ""
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _img(path) -> str:
    uri = _image_uri(path)
    return f'<img src="{uri}" alt="the prompt\'s image">' if uri else "<div>(image not found)</div>"


def _settings(config: dict, summary: dict) -> str:
    shown = {"model": config.get("model") or "the shipped toy base", "prompts": config.get("prompts") or "toy pool",
             "bench": config.get("bench"), "seed": config.get("seed"), "iterations run":
             summary["iterations"][-1]["iteration"], "best": (summary.get("best") or {}).get("iteration")}
    return "<p>" + "; ".join(f"{_e(k)}: <b>{_e(v)}</b>" for k, v in shown.items()) + "</p>"


def _accuracy(run: Path, summary: dict) -> str:
    names = sorted({n for e in summary["iterations"] for n in e["metrics"]["categories"]})
    head = "".join(f"<th>{_e(n)}</th>" for n in names)
    rows = "".join(f"<tr><td>iteration {e['iteration']}</td><td>{_fmt(e['metrics']['overall'])}</td>"
                   + "".join(f"<td>{_fmt(e['metrics']['categories'].get(n))}</td>" for n in names) + "</tr>"
                   for e in summary["iterations"])
    plot = ""
    if (run / "accuracy.png").is_file():
        uri = "data:image/png;base64," + base64.b64encode((run / "accuracy.png").read_bytes()).decode()
        plot = f'<p><img src="{uri}" alt="accuracy per iteration" style="max-width:100%"></p>'
    return (f"<h2>Accuracy on the benchmark</h2><table><tr><th></th><th>overall</th>{head}</tr>{rows}</table>"
            + plot)


def _rates(summary: dict) -> str:
    rows = []
    for e in summary["iterations"][1:]:
        rates = e.get("rates") or {}
        labels = ", ".join(f"{k} {_fmt(v)}" for k, v in rates.get("labels_right", {}).items()) or "not measured"
        kept = ", ".join(f"{k} {_fmt(v)}" for k, v in rates.get("kept_labels_right", {}).items()) or "not measured"
        rows.append(f"<tr><td>iteration {e['iteration']}</td><td>{e['pairs']}</td><td>{e['kept']}</td>"
                    f"<td>{_fmt(e['keep_rate'])}</td><td>{labels}</td><td>{kept}</td></tr>")
    return ("<h2>Pairs and the filter</h2><table><tr><th></th><th>pairs</th><th>kept</th><th>keep rate</th>"
            "<th>labels right (measured against the scenes)</th><th>labels right, kept pairs</th></tr>"
            + "".join(rows) + "</table>")


def _iteration(run: Path, k: int, seed: int) -> str:
    folder = run / f"iter_{k}"
    if not (folder / "pairs.jsonl").is_file():
        return f"<h2>Iteration {k}</h2><p>(no pairs yet)</p>"
    pairs = read_records(folder / "pairs.jsonl")
    judgments = read_jsonl(folder / "judgments.jsonl") if (folder / "judgments.jsonl").is_file() else []
    kept = {t["pair"] for t in read_jsonl(folder / "sft.jsonl")} if (folder / "sft.jsonl").is_file() else set()
    by_pair: dict[int, list[dict]] = {}
    for j in judgments:
        by_pair.setdefault(j["pair"], []).append(j)
    rng = random.Random(seed * 31 + k)  # the same sample each time the report is written
    kept_ids = sorted(i for i in range(len(pairs)) if i in kept)
    dropped_ids = sorted(i for i in range(len(pairs)) if i not in kept and i in by_pair)
    chosen = [(i, True) for i in rng.sample(kept_ids, min(PAIRS_SHOWN, len(kept_ids)))]
    chosen += [(i, False) for i in rng.sample(dropped_ids, min(PAIRS_SHOWN, len(dropped_ids)))]
    cards = [_pair_card(pairs[i], by_pair.get(i, []), is_kept) for i, is_kept in chosen]
    return (f"<h2>Iteration {k}: {len(kept)} of {len(pairs)} pairs kept</h2>"
            f"<p>A sample of kept and dropped pairs.</p>" + "".join(cards))


def _pair_card(pair: dict, judgments: list[dict], kept: bool) -> str:
    made = {"rewrite": "the model's answer against its own degraded rewrite",
            "rules": "the answer against a rule-based corruption of it",
            "vote": "the majority answer against a minority one"}.get(pair.get("source"), pair.get("source"))
    if pair.get("votes"):
        made += " (votes: " + ", ".join(f"{_e(a)} {n}" for a, n in pair["votes"].items()) + ")"
    orders = {}
    for j in judgments:
        orders.setdefault(j["order"], []).append(j)
    agree = {order: sum(j["verdict"] == j["expected"] for j in js) for order, js in orders.items()}
    count = {order: len(js) for order, js in orders.items()}
    if kept:
        why = "kept: a judgment in each order picked the synthetic preference"
    elif not agree.get("good_first") and not agree.get("bad_first"):
        why = "dropped: no judgment in either order picked the synthetic preference"
    else:
        missing = "good shown first" if not agree.get("good_first") else "bad shown first"
        why = f"dropped: no judgment picked the synthetic preference with the {missing}"
    shown = []
    for order in ("good_first", "bad_first"):
        js = orders.get(order, [])
        label = "good shown as A" if order == "good_first" else "bad shown as A"
        lines = "".join(f'<div class="judgment">[{_e(j["verdict"])}] {_e(j["output"])}</div>' for j in js[:2])
        more = f"<div>... {len(js) - 2} more</div>" if len(js) > 2 else ""
        shown.append(f"<div><b>{label}</b>: {agree.get(order, 0)} of {count.get(order, 0)} judgments picked the "
                     f"preference{lines}{more}</div>")
    return (f'<div class="card {"kept" if kept else "dropped"}">{_img(pair["image"])}<div>'
            f'<div><b>{_e(pair["id"])}</b> ({_e(pair.get("kind"))}): {_e(pair["instruction"])}</div>'
            f'<div>good:</div><div class="response">{_e(pair["good"])}</div>'
            f'<div>bad:</div><div class="response">{_e(pair["bad"])}</div>'
            f"<div>made from {made}</div>{''.join(shown)}<div class=\"why\">{_e(why)}</div></div></div>")


def _wrong(run: Path, summary: dict, config: dict) -> str:
    best = (summary.get("best") or {}).get("iteration")
    folder = run / f"iter_{best}"
    if best is None or not (folder / "outputs.jsonl").is_file():
        return ""
    bench_data = config.get("bench_data") or run / "benchmark" / "benchmark.jsonl"
    try:
        items, _ = load_bench(config.get("bench", "toy"), bench_data, config.get("images"), check_images=False,
                              extract_to=run / "bench-images")
    except (ValueError, OSError):  # the benchmark has moved: the rest of the report stands
        return f"<h2>Benchmark items judged wrong at iteration {best}</h2><p>(the benchmark file is not found)</p>"
    by_index = {item["index"]: item for item in items}
    wrong = []
    for output in read_jsonl(folder / "outputs.jsonl"):
        item = by_index.get(output["index"])
        if item is None or output["verdict"] is None:
            continue
        preferred = min(range(2), key=lambda r: item["human_ranking"][r])
        picked = output["shown_first"] if output["verdict"] == "A" else 1 - output["shown_first"]
        if picked != preferred:
            wrong.append((item, output, preferred))
    cards = []
    for item, output, preferred in wrong[:WRONG_SHOWN]:
        first = output["shown_first"]
        cards.append(f'<div class="card dropped">{_img(item["image"])}<div><div><b>{_e(item["id"])}</b>'
                     f'{" (" + _e(item["category"]) + ")" if item.get("category") else ""}: {_e(item["query"])}</div>'
                     f'<div>A:</div><div class="response">{_e(item["response"][first])}</div>'
                     f'<div>B:</div><div class="response">{_e(item["response"][1 - first])}</div>'
                     f'<div>people prefer {"A" if preferred == first else "B"}; the judge wrote:</div>'
                     f'<div class="judgment">{_e(output["output"])}</div></div></div>')
    return (f"<h2>Benchmark items judged wrong at iteration {best} (the best)</h2>"
            f"<p>{len(wrong)} wrong judgments; the first {len(cards)}.</p>" + "".join(cards))
