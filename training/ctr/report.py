"""The review report: a markdown page with PNG plots (matplotlib, Agg), the same page as self-contained
HTML with the plots embedded (the one that shows them in the MLflow UI), and the one-screen text summary
printed on stdout.

Plots: AUC/GAUC per model (every ctr-model version on the same snapshot, labelled by feature mode),
per-category AUC gain of the challenger over the champion sorted like the paper's Fig. 4, the training
curves, and a t-SNE of item embeddings coloured by category and by the simulator's hidden hue (like
Figs. 5/6) when an item_embeddings table is given.
"""
from __future__ import annotations

import math
import os

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a job host
    import matplotlib.pyplot as plt

    return plt


def _fmt(x, spec: str = ".4f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _gain(x) -> str:
    return _fmt(x, "+.4f")


def plot_models(outcome, path: str) -> None:
    plt = _plt()
    rows = {r["version"]: r for r in outcome.others}
    for v, rep in outcome.reports.items():  # re-scored numbers win over logged ones
        rows[v] = {"version": v, "feature_mode": outcome.tags[v].get("feature_mode"),
                   "auc": rep["overall"]["auc"], "gauc": rep["overall"]["gauc"]}
    items = sorted(rows.values(), key=lambda r: int(r["version"]))
    labels = [f"v{r['version']}\n{r['feature_mode']}" + ("\n(challenger)" if r["version"] == outcome.challenger else
                                                       "\n(champion)" if r["version"] == outcome.champion else "")
              for r in items]
    x = np.arange(len(items))
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(items) + 2), 4))
    ax.bar(x - 0.2, [r["auc"] for r in items], 0.4, label="AUC")
    ax.bar(x + 0.2, [r["gauc"] for r in items], 0.4, label="GAUC")
    vals = [v for r in items for v in (r["auc"], r["gauc"]) if not math.isnan(v)]
    if vals:
        ax.set_ylim(max(0.0, min(vals) - 0.02), min(1.0, max(vals) + 0.02))
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_title(f"ctr-model on {outcome.snapshot}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def category_gains(outcome) -> list[tuple[str, float, int]]:
    """(category, challenger AUC - champion AUC, rows), sorted by gain (the paper's Fig. 4 order)."""
    if outcome.champion not in outcome.reports:
        return []
    a, b = outcome.reports[outcome.challenger]["by_category"], outcome.reports[outcome.champion]["by_category"]
    out = [(c, a[c]["auc"] - b[c]["auc"], a[c]["rows"]) for c in a if c in b]
    return sorted((r for r in out if not math.isnan(r[1])), key=lambda r: r[1])


def plot_category_gains(outcome, path: str) -> bool:
    gains = category_gains(outcome)
    if not gains:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(gains) + 2), 3.5))
    ax.bar([g[0] for g in gains], [100 * g[1] for g in gains],
           color=["tab:red" if g[1] < 0 else "tab:green" for g in gains])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("AUC gain (%)")
    ax.set_title(f"v{outcome.challenger} vs champion v{outcome.champion} per category", fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_curves(outcome, path: str) -> bool:
    curves = {v: c for v, c in outcome.curves.items() if c}
    if not curves:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for v, c in sorted(curves.items(), key=lambda kv: int(kv[0])):
        label = f"v{v} {outcome.tags[v].get('feature_mode')}"
        axes[0].plot([p["epoch"] for p in c], [p.get("train_loss", np.nan) for p in c], marker="o", label=label)
        axes[1].plot([p["epoch"] for p in c], [p.get("eval_auc", np.nan) for p in c], marker="o", label=label)
    axes[0].set(title="train loss", xlabel="epoch")
    axes[1].set(title="eval AUC", xlabel="epoch")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def panel_colours(values: list, plt) -> list:
    """One colour per value. Values that are colour names (the hidden hue families: red, ..., magenta)
    are drawn in that colour, so the "green" cluster is green; unknown values ("?") grey; anything
    else (categories) from the tab10/tab20 palette."""
    from matplotlib.colors import is_color_like, to_rgba

    if values and all(is_color_like(v) or v == "?" for v in values):
        return [to_rgba(v) if v != "?" else to_rgba("lightgrey") for v in values]
    cmap = plt.get_cmap("tab10" if len(values) <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(len(values))]


def plot_tsne(embeddings: np.ndarray, colourings: dict[str, np.ndarray], path: str, seed: int = 0) -> bool:
    """t-SNE of item embeddings (rows) with one panel per colouring (e.g. category, hidden hue)."""
    if len(embeddings) < 10 or not colourings:
        return False
    from sklearn.manifold import TSNE

    xy = TSNE(n_components=2, perplexity=min(30, max(5, len(embeddings) // 20)), init="pca",
              random_state=seed).fit_transform(np.asarray(embeddings, dtype=np.float32))
    plt = _plt()
    fig, axes = plt.subplots(1, len(colourings), figsize=(5 * len(colourings), 4.5), squeeze=False)
    for ax, (name, values) in zip(axes[0], colourings.items()):
        cats = sorted(set(values.tolist()))
        for c, colour in zip(cats, panel_colours(cats, plt)):
            m = values == c
            ax.scatter(xy[m, 0], xy[m, 1], s=4, color=colour, label=str(c))
        ax.set_title(f"item embeddings, coloured by {name}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=6, markerscale=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def summary_text(outcome) -> str:
    """The one-screen stdout summary."""
    lines = [f"== ctr-model review: challenger v{outcome.challenger} vs champion "
             f"{'v' + outcome.champion if outcome.champion else '(none)'} ==",
             f"snapshot: {outcome.snapshot}", *[f"note: {n}" for n in outcome.notes]]
    if outcome.reports:
        lines.append(f"{'model':<30}{'AUC':>8}{'GAUC':>8}{'logloss':>9}{'cold AUC':>10}{'rows':>9}")
        for v, rep in sorted(outcome.reports.items(), key=lambda kv: int(kv[0])):
            o, cold = rep["overall"], rep.get("cold_start", {})
            role = "challenger" if v == outcome.challenger else "champion"
            name = f"v{v} {outcome.tags[v].get('feature_mode')} ({role})"
            lines.append(f"{name:<30}{_fmt(o['auc']):>8}{_fmt(o['gauc']):>8}{_fmt(o['logloss']):>9}"
                         f"{_fmt(cold.get('auc')):>10}{o['rows']:>9}")
        gains = category_gains(outcome)
        if gains:
            lines.append("category AUC gain: " + ", ".join(f"{c} {100 * g:+.2f}%" for c, g, _ in gains))
        for v, levels in sorted(outcome.level_gains.items(), key=lambda kv: int(kv[0])):
            lines.append(f"v{v} gain per cluster level (AUC / GAUC with the level hidden -> full): " + ", ".join(
                f"{g['level']} [{g['ids']} ids] {_gain(g['auc_gain'])} / {_gain(g['gauc_gain'])}" for g in levels))
    for g in outcome.gates:
        lines.append(f"  [{'PASS' if g.passed else 'FAIL'}] {g.name}: {g.detail}")
    lines.append(f"decision: {outcome.decision.upper()} - " + "; ".join(outcome.reasons))
    return "\n".join(lines)


def _report_blocks(outcome, folder: str, tsne) -> list[tuple]:
    """The report as blocks, drawn into folder's PNGs on the way; rendered to markdown and to HTML so the
    two pages say the same. Blocks: ("h1"|"h2", text), ("p", spans), ("ul", [spans, ..]),
    ("table", header, rows), ("img", alt, file name); spans are [(style, text)], style "" | "b" | "code"."""
    blocks: list[tuple] = [
        ("h1", f"ctr-model review: v{outcome.challenger}"),
        ("p", [("b", f"Decision: {outcome.decision}"), ("", " — " + "; ".join(outcome.reasons))]),
        ("ul", [[("", f"challenger: v{outcome.challenger} "
                      f"({outcome.tags.get(outcome.challenger, {}).get('feature_mode')})")],
                [("", f"champion: {'v' + outcome.champion if outcome.champion else 'none'}")],
                [("", "evaluation snapshot: "), ("code", str(outcome.snapshot)),
                 ("", " (both models re-scored on it)")],
                *[[("", n)] for n in outcome.notes],
                *[[("", f"v{v} model selection: validation dates "), ("code", t.get("validation.dates", "none")),
                   ("", f", {t.get('selected_epochs', 'n/a')} epoch(s) chosen there (the eval dates choose nothing)")]
                  for v, t in sorted(outcome.tags.items(), key=lambda kv: int(kv[0]))]])]
    if outcome.gates:
        blocks.append(("table", ["gate", "result", "detail"],
                       [[g.name, "pass" if g.passed else "FAIL", g.detail] for g in outcome.gates]))
    if outcome.reports:
        rows = []
        for v, rep in sorted(outcome.reports.items(), key=lambda kv: int(kv[0])):
            o = rep["overall"]
            rows.append([f"v{v}", str(outcome.tags[v].get("feature_mode")), _fmt(o["auc"]), _fmt(o["gauc"]),
                         _fmt(o["logloss"]), _fmt(rep.get("cold_start", {}).get("auc")),
                         _fmt(rep.get("warm", {}).get("auc")), str(o["rows"])])
        blocks.append(("table", ["model", "feature mode", "AUC", "GAUC", "log loss", "cold-start AUC", "warm AUC",
                                 "rows"], rows))
        plot_models(outcome, os.path.join(folder, "auc_gauc.png"))
        blocks += [("h2", "AUC and GAUC per model"), ("img", "AUC/GAUC", "auc_gauc.png")]
    for v, levels in sorted(outcome.level_gains.items(), key=lambda kv: int(kv[0])):
        blocks += [("h2", f"Gain per cluster level, v{v}"),
                   ("p", [("", "What each level of the multi-granularity cluster ids adds: the model's metric "
                                "minus the same model's metric with that level's ids hidden (scored as "
                                "\"no usable image\"), on the evaluation snapshot.")]),
                   ("table", ["level", "ids in eval", "AUC without it", "AUC gain", "GAUC without it", "GAUC gain"],
                    [[g["level"], str(g["ids"]), _fmt(g["auc"]), _gain(g["auc_gain"]), _fmt(g["gauc"]),
                      _gain(g["gauc_gain"])] for g in levels])]
    if plot_category_gains(outcome, os.path.join(folder, "category_gain.png")):
        blocks += [("h2", "Per-category AUC gain (challenger − champion; cf. the paper's Fig. 4)"),
                   ("img", "category gains", "category_gain.png"),
                   ("table", ["category", "gain", "rows"],
                    [[c, f"{100 * g:+.2f}%", str(n)] for c, g, n in category_gains(outcome)])]
    if plot_curves(outcome, os.path.join(folder, "training_curves.png")):
        blocks += [("h2", "Training curves"), ("img", "curves", "training_curves.png")]
        refit = [f"v{v}" for v in sorted(outcome.curves, key=int)
                 if outcome.curves[v] and outcome.tags.get(v, {}).get("validation.dates", "none") != "none"]
        if refit:  # the curve is the epoch-selection fit's; its last point is not the registered model's AUC
            blocks += [("p", [("", f"{', '.join(refit)}: the curve is the epoch-selection fit's (validation dates "
                                   "held out); the registered model is the refit on every training date for the "
                                   "chosen number of epochs, so its eval AUC need not equal the curve's last point.")])]
    if tsne is not None and plot_tsne(tsne[0], tsne[1], os.path.join(folder, "tsne.png")):
        blocks += [("h2", "t-SNE of item embeddings (cf. the paper's Figs. 5/6)"), ("img", "t-SNE", "tsne.png")]
    return blocks


def _markdown(blocks: list[tuple]) -> str:
    def spans(parts):
        return "".join(f"**{t}**" if s == "b" else f"`{t}`" if s == "code" else t for s, t in parts)

    md: list[str] = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            md.append(("# " if kind == "h1" else "## ") + rest[0])
        elif kind == "p":
            md.append(spans(rest[0]))
        elif kind == "ul":
            md += ["- " + spans(item) for item in rest[0]]
        elif kind == "table":
            header, rows = rest
            md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            md += ["| " + " | ".join(r) + " |" for r in rows]
        elif kind == "img":
            md.append(f"![{rest[0]}]({rest[1]})")
        md.append("")
    return "\n".join(md) + "\n"


_CSS = ("body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;font-size:14px;margin:1em;color:#1f2328}"
        "table{border-collapse:collapse;margin:.5em 0 1em}th,td{border:1px solid #d0d7de;padding:3px 8px}"
        "th{background:#f6f8fa}img{max-width:100%;height:auto;display:block;margin:.5em 0}")


def _html(blocks: list[tuple], folder: str) -> str:
    """One self-contained page: the PNGs are embedded as data: URIs. The MLflow UI shows an .html artifact
    in a sandboxed iframe, while its markdown view renders relative image links as text and drops
    data: URIs, so this page is the one where the plots are seen inline."""
    import base64
    from html import escape

    def spans(parts):
        return "".join(f"<strong>{escape(t)}</strong>" if s == "b" else f"<code>{escape(t)}</code>" if s == "code"
                       else escape(t) for s, t in parts)

    body: list[str] = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{escape(rest[0])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{spans(rest[0])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{spans(item)}</li>" for item in rest[0]) + "</ul>")
        elif kind == "table":
            header, rows = rest
            body.append("<table><thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr></thead><tbody>"
                        + "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                        + "</tbody></table>")
        elif kind == "img":
            with open(os.path.join(folder, rest[1]), "rb") as fh:
                data = base64.b64encode(fh.read()).decode("ascii")
            body.append(f'<img alt="{escape(rest[0])}" data-file="{escape(rest[1])}" '
                        f'src="data:image/png;base64,{data}">')
    title = escape(blocks[0][1])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(outcome, folder: str, tsne: tuple[np.ndarray, dict] | None = None) -> str:
    """Write review.md, its PNGs and review.html (the same report with the PNGs embedded, for the MLflow
    UI) into folder; returns the markdown path."""
    os.makedirs(folder, exist_ok=True)
    blocks = _report_blocks(outcome, folder, tsne)
    with open(os.path.join(folder, "review.html"), "w", encoding="utf-8") as fh:
        fh.write(_html(blocks, folder))
    path = os.path.join(folder, "review.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(_markdown(blocks))
    return path
