"""What a run shows of itself: the summary with its best iteration, the line printed per iteration, the accuracy
curves (accuracy.png) and an evaluation's reliability diagram (reliability.png); `judgment_summary` for
`fastjudge judge`. Plain dicts in, files and lines out: no model here."""

from __future__ import annotations

from pathlib import Path

from fastjudge.data.io import write_json


def write_summary(out: Path, summary: dict, main: bool = True) -> None:
    """Set summary["best"] (the iteration with the best overall accuracy so far: a later one can be worse); on
    the main process write out/summary.json and out/accuracy.png and print the last iteration's line."""
    scored = [e for e in summary["iterations"] if e["metrics"]["overall"] is not None]
    if scored:
        best = max(scored, key=lambda e: (e["metrics"]["overall"], -e["iteration"]))
        summary["best"] = {"iteration": best["iteration"], "overall": best["metrics"]["overall"],
                           "checkpoint": None if best["iteration"] == 0 else f"iter_{best['iteration']}/checkpoint"}
    if not main:
        return
    write_json(out / "summary.json", summary)
    plot_accuracy(summary, out / "accuracy.png")
    last = summary["iterations"][-1]
    metrics = last["metrics"]
    categories = ", ".join(f"{name} {_fmt(acc)}" for name, acc in metrics["categories"].items())
    print(f"iteration {last['iteration']}: overall {_fmt(metrics['overall'])} macro {_fmt(metrics['macro'])} "
          f"({categories}); pairs {last['pairs']}, kept {last['kept']}"
          + (f" ({last['keep_rate']:.1%})" if last["keep_rate"] is not None else ""))
    rates = last.get("rates")
    if rates:
        labels = ", ".join(f"{source} {_fmt(share)}" for source, share in rates.get("labels_right", {}).items())
        kept = ", ".join(f"{source} {_fmt(share)}" for source, share in rates.get("kept_labels_right", {}).items())
        print(f"  measured against the scenes: labels right ({labels or 'n/a'}; kept pairs {kept or 'n/a'}), "
              f"verdict agrees with label "
              f"{_fmt(rates.get('verdict_agrees_label'))}; benchmark: own answer right "
              f"{_fmt(rates['own_answer_right'])}, checks right {_fmt(rates['reasoning_right'])}, verdict "
              f"follows checks {_fmt(rates['verdict_follows_reasoning'])}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"



def plot_accuracy(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iterations = [e["iteration"] for e in summary["iterations"]]
    with_rates = any(e.get("rates") for e in summary["iterations"])
    fig, axes = plt.subplots(1, 2 if with_rates else 1, figsize=(11 if with_rates else 6, 4), dpi=100,
                             squeeze=False)
    ax = axes[0][0]
    names = sorted({n for e in summary["iterations"] for n in e["metrics"]["categories"]})
    for name in names:
        ax.plot(iterations, [e["metrics"]["categories"].get(name) for e in summary["iterations"]], marker="o",
                label=name, alpha=0.8)
    ax.plot(iterations, [e["metrics"]["overall"] for e in summary["iterations"]], marker="s", color="black",
            linewidth=2.5, label="overall")
    _finish_axes(ax, iterations, "judge accuracy", "held-out judge benchmark", top=1.0)
    if with_rates:
        _plot_rates(axes[0][1], summary, iterations)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _plot_rates(ax, summary: dict, iterations: list[int]) -> None:
    """The toy preset's rates per iteration (`toy.rates`), beside the accuracy."""
    entries = [e.get("rates") or {} for e in summary["iterations"]]
    series = {"own answer right": lambda r: r.get("own_answer_right"),
              "checks right": lambda r: r.get("reasoning_right"),
              "verdict follows checks": lambda r: r.get("verdict_follows_reasoning"),
              "verdict agrees with label": lambda r: r.get("verdict_agrees_label"),
              "labels right (rewrite)": lambda r: r.get("labels_right", {}).get("rewrite"),
              "labels right (vote)": lambda r: r.get("labels_right", {}).get("vote"),
              "kept labels right (vote)": lambda r: r.get("kept_labels_right", {}).get("vote")}
    for name, get in series.items():
        values = [get(r) for r in entries]
        if any(v is not None for v in values):
            ax.plot(iterations, [float("nan") if v is None else v for v in values], marker="o", label=name)
    _finish_axes(ax, iterations, "share", "measured against the scenes (never trained on)", top=1.02)


def _finish_axes(ax, iterations: list[int], ylabel: str, title: str, top: float) -> None:
    """Chance line, labels, one tick per iteration, legend."""
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_xticks(iterations)
    ax.set_ylim(0, top)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title)


def plot_reliability(path: Path, calibration: dict | None) -> None:
    """The reliability diagram of an evaluation: accuracy against confidence per bin, and the diagonal."""
    if not calibration or not calibration.get("judgments"):
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bins = [b for b in calibration["bins"] if b["count"]]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0.5, 1.0], [0.5, 1.0], color="grey", linestyle="--", linewidth=1, label="calibrated")
    ax.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["accuracy"] for b in bins], width=0.045, alpha=0.7,
           label="accuracy")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", color="black", linewidth=1)
    ax.set_xlim(0.5, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("confidence: max(p, 1 - p) of the verdict")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {calibration['ece']:.3f}, {calibration['judgments']} judgments)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def judgment_summary(judged, skipped: int) -> dict:
    """Pairs judged and skipped, how often the two orders agreed (1 - the position-bias rate: verdicts that flip
    when the order flips), and the mean strength of preference |p_a - 0.5|."""
    agreements = [j.orders_agree for j in judged if j.orders_agree is not None]
    agree = sum(agreements) / len(agreements) if agreements else None
    return {"judged": len(judged), "skipped": skipped, "order_agreement": agree,
            "position_bias": None if agree is None else 1 - agree,
            "mean_preference_strength": sum(abs(j.p_a - 0.5) for j in judged) / max(1, len(judged)),
            "verdicts": {v: sum(j.verdict == v for j in judged) for v in ("A", "B", "tie")}}
