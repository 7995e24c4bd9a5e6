"""The quality-vs-speed plot of ``benchmarks.quality``'s JSON: accuracy against tokens per forward.

    python -m benchmarks.quality --batch 16 --json quality.json
    python -m benchmarks.quality_plot quality.json --out docs/quality_vs_speed.png

One panel per task (held-out additions: exact match; held-out counts: exact match, i.e. the
count right and stopped at b), one point per (algorithm, schedule) at the chosen batch, x =
tokens per forward (reply tokens / NFE, the decoder's speed on any hardware), y = accuracy.
Points are coloured by schedule family (fixed, threshold, factor, entropy bound, multi-block) and shaped by
algorithm; the Pareto front (no other point both faster and at least as accurate) is drawn as a
step line and listed on stdout as a table. Needs matplotlib (the ``notebook`` extra).
"""

from __future__ import annotations

import argparse
import json

FAMILIES = {"fixed": "tab:gray", "threshold": "tab:blue", "factor": "tab:orange", "entropy bound": "tab:green",
            "multi-block": "tab:red"}
MARKERS = {"basic": "s", "no_cache": "D", "prefix_cache": "^", "dual_cache": "o", "dinfer_blockwise": "v",
           "dinfer_hierarchy": "P", "dinfer_credit": "X"}


def family(schedule: str) -> str:
    return next((f for f in FAMILIES if schedule.startswith(f)), "fixed")


def pareto(points: list[dict]) -> list[dict]:
    """The points no other point dominates (higher tokens per forward at no lower accuracy, or
    higher accuracy at no lower tokens per forward), by tokens per forward."""
    front = [p for p in points
             if not any((q["tokens_per_forward"] >= p["tokens_per_forward"] and q["accuracy"] >= p["accuracy"])
                        and (q["tokens_per_forward"], q["accuracy"]) != (p["tokens_per_forward"], p["accuracy"])
                        for q in points)]
    return sorted(front, key=lambda p: p["tokens_per_forward"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="benchmarks.quality --json output")
    ap.add_argument("--out", default="docs/quality_vs_speed.png")
    ap.add_argument("--batch", type=int, default=16, help="the batch size whose rows are plotted")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.load(open(args.json))
    rows = [r for r in data["rows"] if r["batch"] == args.batch]
    if not rows:
        raise SystemExit(f"no rows at batch {args.batch} in {args.json}")
    tasks = [t for t in ("add", "count") if any(r["task"] == t for r in rows)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 5), squeeze=False)
    titles = {"add": "held-out additions (exact)", "count": "held-out counts (exact, stops at b)"}
    for ax, task in zip(axes[0], tasks):
        points = [r for r in rows if r["task"] == task]
        for r in points:
            ax.scatter(r["tokens_per_forward"], 100 * r["accuracy"], c=FAMILIES[family(r["schedule"])],
                       marker=MARKERS.get(r["algorithm"], "o"), s=46, alpha=0.8, edgecolors="black", linewidths=0.4)
        front = pareto(points)
        ax.step([p["tokens_per_forward"] for p in front], [100 * p["accuracy"] for p in front], where="post",
                color="black", linewidth=1, alpha=0.6)
        ax.set_title(f"{titles[task]}, n={points[0]['n']}, batch {args.batch}")
        ax.set_xlabel("tokens per forward (reply tokens / NFE)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        print(f"\nPareto front, {task} (batch {args.batch}):\n")
        print("| algorithm | schedule | accuracy | tokens/forward | NFE |")
        print("|---|---|---:|---:|---:|")
        for p in front:
            print(f"| {p['algorithm']} | {p['schedule']} | {p['accuracy']:.1%} | {p['tokens_per_forward']:.2f} | "
                  f"{p['nfe']:.1f} |")
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="", label=f) for f, c in FAMILIES.items()]
    handles += [plt.Line2D([], [], color="black", marker=m, linestyle="", label=a, markerfacecolor="none")
                for a, m in MARKERS.items() if any(r["algorithm"] == a for r in rows)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle(f"Quality vs speed on the demo model ({data.get('device', '')}; T=0, canvas 128, block 32)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(args.out, dpi=110)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
