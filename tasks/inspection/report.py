"""A static HTML report of one data-engine run: what each stage did, to which samples, how well.

`render_report(ReportData, out_dir)` writes `out_dir/index.html` and the PNGs it shows
(figures/, samples/, crops/). Everything is drawn with PIL, so the report needs no plotting
library and no network: the page has no scripts and no external resources. All text taken from
the data is HTML-escaped.

ReportData holds plain data only; the caller (the flow) fills it from the store.
"""
from __future__ import annotations

import html
import io
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from storage.shards import image_member

from tasks.stages.evaluate import ablation_columns
from tasks.shared.truth import load_ground_truth, normalise_truth, rekey_truth
from tasks.shared.labels import load_labels
from tasks.shared.lineage import key_tags, labels_version, nearest_versions
from tasks.stages import OUTPUTS


@dataclass
class StageSummary:
    name: str
    version: str = ""
    rows_in: int = 0
    rows_out: int = 0
    rows_rejected: int = 0
    seconds: float = 0.0
    note: str = ""

    @property
    def reconciles(self) -> bool:
        return self.rows_in == self.rows_out + self.rows_rejected


@dataclass
class BoxView:
    tag: str
    box: tuple[float, float, float, float]   # x0, y0, x1, y1 in source pixels
    score: float | None = None


@dataclass
class SampleView:
    key: str
    image: bytes                                   # encoded image (JPEG / PNG / WebP)
    tags_by_stage: dict[str, list[str]]            # stage name -> tags, in stage order
    boxes: list[BoxView] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    truth: list[str] | None = None                 # known in the demo: marks tags that are wrong
    removed_reasons: dict[str, str] = field(default_factory=dict)   # tag -> why cleaning removed it

    def __post_init__(self) -> None:
        self.boxes = [b if isinstance(b, BoxView) else BoxView(**b) for b in self.boxes]


@dataclass
class CropView:
    key: str
    image: bytes
    cluster: int | None = None
    outlier: bool = False
    distance: float | None = None
    wrong: bool | None = None                      # known in the demo: the tag is not on this image


@dataclass
class ReportData:
    title: str = "RAM data engine run"
    stages: list[StageSummary] = field(default_factory=list)
    tag_histograms: dict[str, dict[str, int]] = field(default_factory=dict)   # stage -> tag -> count
    samples: list[SampleView] = field(default_factory=list)
    crops_by_tag: dict[str, list[CropView]] = field(default_factory=dict)
    evaluation: list[dict[str, Any]] = field(default_factory=list)            # e.g. evaluate.ablation_table rows
    cleaning_removal: list[dict[str, Any]] = field(default_factory=list)      # evaluate.removal_quality rows
    ablation: list[dict[str, Any]] = field(default_factory=list)              # tasks.stages.ablation.summarise rows
    ablation_note: str = ""                                                    # tasks.stages.ablation.heldout_note
    # tag -> {"added": n, "<reason>": n, ...}: what generation added and cleaning removed, per reason
    tag_changes: dict[str, dict[str, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    created: str = ""

    def __post_init__(self) -> None:
        # Accept plain dicts (as read from JSON or the store) as well as the view classes.
        self.stages = [s if isinstance(s, StageSummary) else StageSummary(**s) for s in self.stages]
        self.samples = [s if isinstance(s, SampleView) else SampleView(**s) for s in self.samples]
        self.crops_by_tag = {t: [c if isinstance(c, CropView) else CropView(**c) for c in cs]
                             for t, cs in self.crops_by_tag.items()}
        if not self.created:
            self.created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ---------------------------------------------------------------------------------------------
# Drawing with PIL.

def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # PIL without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def tag_colour(tag: str) -> tuple[int, int, int]:
    """A stable, saturated colour per tag (the same in every figure and run)."""
    h = zlib.crc32(tag.encode()) % 360
    import colorsys
    r, g, b = colorsys.hsv_to_rgb(h / 360, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def bar_chart(items: Sequence[tuple[str, float]], title: str, value_fmt: str = "{:g}", width: int = 640,
              row: int = 18, colour: tuple[int, int, int] | None = None) -> Image.Image:
    """A horizontal bar chart, one row per (label, value), in the given order."""
    font, title_font = _font(12), _font(14)
    label_w = min(width // 3, 16 + max([int(font.getlength(str(lbl))) for lbl, _ in items] + [40]))
    height = 34 + row * max(1, len(items)) + 8
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 8), title, fill=(20, 20, 20), font=title_font)
    if not items:
        d.text((8, 34), "(no data)", fill=(120, 120, 120), font=font)
        return img
    vmax = max(float(v) for _, v in items) or 1.0
    bar_w = width - label_w - 70
    for i, (label, value) in enumerate(items):
        y = 34 + i * row
        text = str(label)
        while font.getlength(text) > label_w - 12 and len(text) > 2:
            text = text[:-2] + "…"
        d.text((label_w - 8 - font.getlength(text), y + 2), text, fill=(30, 30, 30), font=font)
        w = int(bar_w * float(value) / vmax)
        d.rectangle((label_w, y + 2, label_w + max(w, 1), y + row - 3), fill=colour or tag_colour(str(label)))
        d.text((label_w + w + 6, y + 2), value_fmt.format(value), fill=(60, 60, 60), font=font)
    return img


REASON_COLOURS = {"outlier": (214, 39, 40), "baseline-disagrees": (240, 128, 128), "no-box": (150, 60, 60)}


def _by_change(changes: Mapping[str, Mapping[str, int]]) -> list[tuple[str, Mapping[str, int]]]:
    return sorted(changes.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))


def change_chart(changes: Mapping[str, Mapping[str, int]], width: int = 720, row: int = 18,
                 max_tags: int = 40) -> Image.Image:
    """Per tag (most changed first): removals by reason as bars to the left of a centre line, additions
    to the right, with their counts."""
    items = _by_change(changes)[:max_tags]
    font, title_font = _font(12), _font(14)
    label_w = min(width // 4, 16 + max([int(font.getlength(t)) for t, _ in items] + [40]))
    reasons = sorted({r for _, c in items for r in c if r != "added"})
    legend_h = 20
    img = Image.new("RGB", (width, 34 + legend_h + row * max(1, len(items)) + 8), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 8), "Tags added by generation (right) and removed by cleaning (left)", fill=(20, 20, 20),
           font=title_font)
    x = 8
    for name, colour in [("added", (44, 160, 44))] + [(r, REASON_COLOURS.get(r, (120, 0, 0))) for r in reasons]:
        d.rectangle((x, 34, x + 10, 44), fill=colour)
        d.text((x + 14, 32), name, fill=(40, 40, 40), font=font)
        x += 24 + int(font.getlength(name))
    half = (width - label_w - 16) // 2
    centre = label_w + half
    vmax = max([max(c.get("added", 0), sum(v for k, v in c.items() if k != "added")) for _, c in items] + [1])
    for i, (tag, c) in enumerate(items):
        y = 34 + legend_h + i * row
        d.text((label_w - 8 - font.getlength(tag[:30]), y + 2), tag[:30], fill=(30, 30, 30), font=font)
        left = centre
        for r in reasons:
            w = int((half - 40) * c.get(r, 0) / vmax)
            if w:
                d.rectangle((left - w, y + 2, left, y + row - 3), fill=REASON_COLOURS.get(r, (120, 0, 0)))
                left -= w
        removed = sum(c.get(r, 0) for r in reasons)
        if removed:
            text = f"-{removed}"
            d.text((left - 4 - font.getlength(text), y + 2), text, fill=(120, 0, 0), font=font)
        w = int((half - 40) * c.get("added", 0) / vmax)
        if w:
            d.rectangle((centre, y + 2, centre + w, y + row - 3), fill=(44, 160, 44))
        if c.get("added"):
            d.text((centre + w + 4, y + 2), f"+{c['added']}", fill=(0, 90, 0), font=font)
    d.line((centre, 34 + legend_h, centre, img.height - 4), fill=(90, 90, 90))
    return img


def _decode(data: bytes) -> tuple[Image.Image, bool]:
    """(the image, True), or (a grey placeholder saying why it cannot be shown, False): a report
    never fails on bad pixels."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB"), True
    except Exception as e:  # noqa: BLE001 - any decoder error becomes a visible placeholder
        img = Image.new("RGB", (160, 60), (200, 200, 200))
        ImageDraw.Draw(img).text((6, 6), f"cannot decode:\n{type(e).__name__}", fill=(120, 0, 0), font=_font(11))
        return img, False


def draw_boxes(image: Image.Image, boxes: Sequence[BoxView], min_side: int = 256) -> Image.Image:
    """The image scaled up to at least `min_side` with each box and its tag (and score) drawn."""
    scale = max(1.0, min_side / max(1, min(image.size)))
    out = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC) \
        if scale != 1.0 else image.copy()
    d = ImageDraw.Draw(out)
    font = _font(12)
    for b in boxes:
        x0, y0, x1, y1 = (float(v) * scale for v in b.box)
        c = tag_colour(b.tag)
        d.rectangle((x0, y0, x1, y1), outline=c, width=2)
        label = b.tag if b.score is None else f"{b.tag} {b.score:.2f}"
        tw = font.getlength(label)
        ty = y0 - 15 if y0 >= 15 else y0
        d.rectangle((x0, ty, x0 + tw + 6, ty + 15), fill=c)
        d.text((x0 + 3, ty + 1), label, fill="black" if sum(c) > 380 else "white", font=font)
    return out


# ---------------------------------------------------------------------------------------------
# HTML.

def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:1.5em}h2{margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.mismatch{background:#fff1cc}.tag{display:inline-block;margin:1px 3px;padding:0 4px;border-radius:3px;
background:#eef}ins.added{background:#d9f5d9;color:#075e07;text-decoration:none;font-weight:600}
del.removed{background:#fbdede;color:#a00000}.wrong{box-shadow:inset 0 -2px 0 #e08000}
.sample{display:flex;gap:16px;margin:16px 0;padding-bottom:12px;border-bottom:1px solid #eee}
.sample img{image-rendering:auto;border:1px solid #ccc}.captions{color:#555;font-size:.9em}
.crops{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start}.cluster{border:1px solid #ddd;
padding:4px;margin:4px}.crop{display:inline-block;text-align:center;font-size:.75em;margin:2px}
.crop img{border:3px solid #9c9}.crop.outlier img{border-color:#d22}.crop.wrong-label span.badge{color:#d22}
.legend{font-size:.9em;color:#555}.reason{font-size:.8em;color:#a00000}.figures{display:flex;flex-wrap:wrap;gap:12px}ul.notes li{margin:4px 0}
table{max-width:100%}td,th{overflow-wrap:anywhere}
.crop{vertical-align:top;width:100px;margin:2px 6px}.crop span{display:block;overflow-wrap:anywhere;line-height:1.2}
.verdict{font-size:1.1em;padding:8px 12px;margin:6px 0;border-left:6px solid #999;background:#f7f7f7}
.verdict.yes{border-color:#2a8a2a}.verdict.no{border-color:#c07000}.verdict b{font-size:1.1em}
"""

# A table with more columns than this is turned a quarter (one column per row): wide tables (the ablation has
# ~20 figures per label version) ran to ~2,500 px, their deciding column off-screen at 1,400 px.
MAX_COLUMNS = 10
GAIN = "mAP gain ± paired std (> 2 std)"   # the CLI's column (tasks.stages.ablation.summary_markdown)


def _cell(v: Any) -> str:
    num = isinstance(v, (int, float)) and not isinstance(v, bool)
    return f'<td class="num">{_e(_fmt(v))}</td>' if num else f"<td>{_e(_fmt(v))}</td>"


def _table(rows: Sequence[Mapping[str, Any]], css_class: str = "", columns: Sequence[str] | None = None,
           headers: Mapping[str, str] | None = None) -> str:
    """An HTML table of `rows`; `headers` renames columns on screen. Over MAX_COLUMNS columns (and fewer rows
    than columns) it is transposed: its first column's values head the columns, one figure per row."""
    if not rows:
        return "<p>(none)</p>"
    cols: list[str] = list(columns or [])
    for r in rows:
        cols += [c for c in r if c not in cols]
    head = {c: (headers or {}).get(c, c) for c in cols}
    if len(cols) > MAX_COLUMNS and len(rows) < len(cols):
        out = [f'<table class="{_e(css_class)} transposed"><thead><tr><th>{_e(head[cols[0]])}</th>'
               + "".join(f"<th>{_e(_fmt(r.get(cols[0], '')))}</th>" for r in rows) + "</tr></thead><tbody>"]
        for c in cols[1:]:
            out.append(f"<tr><th>{_e(head[c])}</th>" + "".join(_cell(r.get(c, "")) for r in rows) + "</tr>")
        out.append("</tbody></table>")
        return "".join(out)
    out = [f'<table class="{_e(css_class)}"><thead><tr>' + "".join(f"<th>{_e(head[c])}</th>" for c in cols)
           + "</tr></thead><tbody>"]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            cells.append(f'<td class="num">{_e(_fmt(v))}</td>' if num else f"<td>{_e(_fmt(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _tag_diff(prev: list[str] | None, cur: list[str], truth: set[str] | None,
              reasons: Mapping[str, str] | None = None) -> str:
    """Tags of a stage against the previous stage: kept plain, added green '+', removed struck red
    (with the reason cleaning gave, when known)."""
    def span(t: str, kind: str) -> str:
        wrong = truth is not None and t not in truth
        cls = f"tag {kind}" + (" wrong" if wrong and kind != "removed" else "")
        title = " title=\"not in the ground truth\"" if wrong and kind != "removed" else ""
        if kind == "added":
            return f'<ins class="{cls}"{title}>+{_e(t)}</ins>'
        if kind == "removed":
            why = (reasons or {}).get(t)
            note = f' <span class="reason">({_e(why)})</span>' if why else ""
            return f'<del class="{cls}" title="{_e(why or "removed")}">{_e(t)}</del>{note}'
        return f'<span class="{cls}"{title}>{_e(t)}</span>'
    if prev is None:
        return "".join(span(t, "kept") for t in cur)
    p, c = set(prev), set(cur)
    parts = [span(t, "kept" if t in p else "added") for t in cur]
    parts += [span(t, "removed") for t in prev if t not in c]
    return "".join(parts) or "<i>(no tags)</i>"


def render_report(report_data: ReportData, out_dir: str | Path, *, max_hist_tags: int = 30,
                  max_crops_per_tag: int = 60, crop_side: int = 64, hist_width: int = 380) -> Path:
    """Write the report to `out_dir` (created if needed) and return the path of index.html."""
    data = report_data if isinstance(report_data, ReportData) else ReportData(**report_data)
    out = Path(out_dir)
    for sub in ("figures", "samples", "crops"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    body: list[str] = [f"<h1>{_e(data.title)}</h1>", f"<p class=\"legend\">Created {_e(data.created)}</p>"]

    # What matters most first: the answer (did the engine's labels train a better model), then how good the
    # labels and models are, then what each stage changed.
    body += verdict_section(data.ablation)

    body.append("<h2 id=\"evaluation\">Evaluation</h2>")
    if data.evaluation:
        body.append("<p class=\"legend\">Label quality of each stage's labels, and each model's on held-out "
                    "keys, against the ground truth. (A model's own manifest also has a held-out mAP: that one is "
                    "scored against the noisy labels it trained on.)</p>")
    body.append(_table(data.evaluation, "evaluation", columns=ablation_columns(data.evaluation),
                       headers={"mAP": "mAP vs truth", "precision": "precision vs truth", "recall": "recall vs truth",
                                "f1": "F1 vs truth"})
                if data.evaluation else "<p>(no evaluate version in this lineage: set evaluate.ground_truth)</p>")
    body += data_engine_sections(data, out)   # cleaning's removals against the truth, the ablation

    body.append("<h2 id=\"changes\">Tags added and removed, per tag</h2>")
    if data.tag_changes:
        fig = change_chart(data.tag_changes)
        fig.save(out / "figures" / "tag_changes.png")
        reasons = sorted({r for c in data.tag_changes.values() for r in c if r != "added"})
        body.append("<p class=\"legend\">Per tag: keys the generation stage added it to (green, right) and "
                    "keys the cleaning stage removed it from, by reason (red shades, left).</p>"
                    '<img src="figures/tag_changes.png" alt="tags added and removed per tag">')
        rows = [{"tag": t, "added": c.get("added", 0), **{f"removed: {r}": c.get(r, 0) for r in reasons},
                 "net": c.get("added", 0) - sum(c.get(r, 0) for r in reasons)}
                for t, c in _by_change(data.tag_changes)]
        body.append(_table(rows, "changes"))
    else:
        body.append("<p>(no generated and clean versions in this lineage)</p>")

    if data.notes:
        body.append("<h2 id=\"notes\">Notes</h2><ul class=\"notes\">"
                    + "".join(f"<li>{_e(n)}</li>" for n in data.notes) + "</ul>")

    # Samples.
    body.append("<h2 id=\"samples\">Samples</h2><p class=\"legend\">Samples where a stage changed the tags, "
                "each kind of change shown. Per stage against the stage before: "
                "<ins class=\"tag added\">+added</ins> <del class=\"tag removed\">removed</del> "
                "<span class=\"reason\">(why cleaning removed it)</span> "
                "<span class=\"tag wrong\">not in the ground truth</span> (where the truth is known).</p>")
    for i, s in enumerate(data.samples):
        img, ok = _decode(s.image)
        if ok:
            img = draw_boxes(img, s.boxes)
        name = f"samples/{i:04d}.png"
        img.save(out / name)
        truth = set(s.truth) if s.truth is not None else None
        trs, prev = [], None
        for stage, tags in s.tags_by_stage.items():
            # Only cleaning removes tags, so a removed tag's reason is the one the clean version stored.
            trs.append(f"<tr><th>{_e(stage)}</th><td>{_tag_diff(prev, list(tags), truth, s.removed_reasons)}</td></tr>")
            prev = list(tags)
        if s.truth is not None:
            trs.append("<tr><th>ground truth</th><td>" + "".join(f'<span class="tag">{_e(t)}</span>'
                                                                  for t in s.truth) + "</td></tr>")
        caps = "".join(f"<li>{_e(c)}</li>" for c in s.captions)
        body.append(f'<div class="sample" id="{_e("sample-" + s.key)}"><img src="{name}" '
                    f'alt="{_e("sample " + s.key)}" width="{img.width}" height="{img.height}"><div>'
                    f"<h3>{_e(s.key)}</h3><ul class=\"captions\">{caps}</ul>"
                    f"<table class=\"tags\">{''.join(trs)}</table></div></div>")

    # Stages.
    body.append("<h2 id=\"stages\">Stages</h2>")
    rows = []
    for s in data.stages:
        rows.append({"stage": s.name, "version": s.version, "rows in": s.rows_in, "rows out": s.rows_out,
                     "rejected": s.rows_rejected, "in = out + rejected": "yes" if s.reconciles else "no",
                     "seconds": float(s.seconds), "note": s.note})
    body.append(_table(rows, "stages"))
    if data.stages:
        fig = bar_chart([(s.name, float(s.seconds)) for s in data.stages], "Wall time per stage (s)",
                        "{:.1f} s", colour=(70, 110, 190))
        fig.save(out / "figures" / "timings.png")
        body.append('<img src="figures/timings.png" alt="wall time per stage">')

    # Tag histograms.
    body.append("<h2 id=\"histograms\">Tag histograms</h2>")
    if not data.tag_histograms:
        body.append("<p>(none)</p>")
    figs = []
    for i, (stage, hist) in enumerate(data.tag_histograms.items()):
        items = sorted(hist.items(), key=lambda kv: (-kv[1], kv[0]))
        shown = items[:max_hist_tags]
        more = f" (top {len(shown)} of {len(items)} tags)" if len(items) > len(shown) else ""
        fig = bar_chart(shown, f"{stage}: {sum(hist.values())} labels{more}", "{:d}", width=hist_width)
        name = f"figures/hist_{i:02d}.png"
        fig.save(out / name)
        figs.append(f'<img src="{name}" alt="{_e("tag histogram " + stage)}">')
    body.append(f'<div class="figures">{"".join(figs)}</div>')

    # Crops.
    body.append("<h2 id=\"crops\">Crops per tag, by cluster</h2><p class=\"legend\">Red frame: an outlier "
                "whose tag the cleaning stage removed; ✗: the tag is not on that image (where the truth is "
                "known).</p>")
    if not data.crops_by_tag:
        body.append("<p>(none)</p>")
    for ti, (tag, crops) in enumerate(data.crops_by_tag.items()):
        n_out = sum(c.outlier for c in crops)
        body.append(f"<h3>{_e(tag)} <span class=\"legend\">{len(crops)} crops, {n_out} outliers</span></h3>"
                    "<div class=\"crops\">")
        by_cluster: dict[Any, list[CropView]] = {}
        for c in crops[:max_crops_per_tag]:
            by_cluster.setdefault(c.cluster, []).append(c)
        for cluster in sorted(by_cluster, key=lambda k: (k is None, k if k is not None else 0)):
            items = []
            for j, c in enumerate(sorted(by_cluster[cluster], key=lambda c: (c.outlier, c.distance or 0.0))):
                img, _ = _decode(c.image)
                # Crops of small objects are scaled up too, so every crop shows at the same size.
                f = crop_side / max(img.size)
                img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))),
                                 Image.Resampling.BICUBIC)
                name = f"crops/{ti:03d}_{cluster if cluster is not None else 'x'}_{j:03d}.png"
                img.save(out / name)
                cls = "crop" + (" outlier" if c.outlier else "") + (" wrong-label" if c.wrong else "")
                label = _e(c.key) + (f" d={c.distance:.2f}" if c.distance is not None else "")
                badge = ' <span class="badge">✗</span>' if c.wrong else ""
                items.append(f'<div class="{cls}"><img src="{name}" alt="{_e("crop " + c.key + " " + tag)}">'
                             f"<br><span>{label}</span>{badge}</div>")
            head = "no cluster" if cluster is None else f"cluster {cluster}"
            body.append(f'<div class="cluster"><div class="legend">{_e(head)}</div>{"".join(items)}</div>')
        body.append("</div>")

    page = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(data.title)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")
    # Written last and moved into place, so a reader never sees a half-written page.
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".index.", suffix=".html")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(page)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out / "index.html")
    return out / "index.html"


def ablation_chart(rows: Sequence[Mapping[str, Any]], width: int = 640, row: int = 26) -> Image.Image:
    """mAP mean per label version as bars with a ±1 std whisker (the ablation's plot)."""
    font, title_font = _font(12), _font(14)
    items = [(str(r["labels"]), float(r.get("mAP_mean", 0.0)), float(r.get("mAP_std", 0.0))) for r in rows]
    label_w = min(width // 3, 16 + max([int(font.getlength(lbl)) for lbl, _, _ in items] + [40]))
    img = Image.new("RGB", (width, 34 + row * max(1, len(items)) + 8), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 8), "Held-out mAP per label version (mean ± std over seeds)", fill=(20, 20, 20), font=title_font)
    bar_w = width - label_w - 110
    for i, (label, mean, std) in enumerate(items):
        y = 34 + i * row
        d.text((label_w - 8 - font.getlength(label), y + 5), label, fill=(30, 30, 30), font=font)
        d.rectangle((label_w, y + 3, label_w + max(1, int(bar_w * mean)), y + row - 5), fill=(70, 140, 90))
        lo, hi = label_w + int(bar_w * max(0.0, mean - std)), label_w + int(bar_w * min(1.0, mean + std))
        mid = y + row // 2 - 1
        d.line((lo, mid, hi, mid), fill=(20, 20, 20), width=2)
        d.line((lo, y + 6, lo, y + row - 8), fill=(20, 20, 20), width=2)
        d.line((hi, y + 6, hi, y + row - 8), fill=(20, 20, 20), width=2)
        d.text((label_w + int(bar_w * min(1.0, mean + std)) + 8, y + 5), f"{mean:.3f} ± {std:.3f}",
               fill=(60, 60, 60), font=font)
    return img


def verdict_section(ablation: Sequence[Mapping[str, Any]]) -> list[str]:
    """The ablation's answer, first on the page: per label version against the first (the caption labels),
    the held-out mAP gain ± the paired std over seeds and the verdict the CLI prints (yes: over two standard
    deviations both of either arm's seeds and of the paired differences; tasks.stages.ablation.summarise)."""
    rows = [r for r in ablation if "mAP_gain" in r]
    if not rows:
        return []
    base = ablation[0]
    out = ['<h2 id="verdict">Did the data engine help?</h2>',
           f'<p class="legend">A model per label version, the same budget and seeds, scored on held-out keys '
           f'against the ground truth; each against the models trained on the {_e(base["labels"])} labels '
           f'(mAP {base.get("mAP_mean", 0):.3f} ± {base.get("mAP_std", 0):.3f}).</p>']
    for r in rows:
        yes = bool(r.get("gain_over_2std"))
        paired = f" ± {r['mAP_gain_std']:.3f} (paired std over {r.get('seeds', '?')} seeds)" if "mAP_gain_std" in r else ""
        out.append(f'<p class="verdict {"yes" if yes else "no"}"><b>{_e(r["labels"])}: {"yes" if yes else "no"}</b>'
                   f' — held-out mAP {r.get("mAP_mean", 0):.3f} ± {r.get("mAP_std", 0):.3f}, gain '
                   f'{r["mAP_gain"]:+.3f}{_e(paired)}; '
                   + ("over two standard deviations." if yes else "not over two standard deviations: not shown "
                      "to help on this data.") + "</p>")
    return out


def data_engine_sections(data: ReportData, out: Path) -> list[str]:
    """Does the engine earn its keep: cleaning's removal precision / recall per reason, and the
    ablation (models trained per label version) as a table and a plot."""

    body: list[str] = []
    if data.cleaning_removal:
        body.append('<h2 id="cleaning-removal">Cleaning: removed tags against the truth</h2>')
        body.append('<p class="legend">Removal precision: share of removed (image, tag) pairs that are wrong; '
                    "recall: share of the wrong localisable pairs that were removed; base rate: the wrong share "
                    "of the localisable pairs cleaning was given (what random removal would score).</p>")
        body.append(_table(data.cleaning_removal, "cleaning-removal", columns=ablation_columns(data.cleaning_removal)))
    if data.ablation:
        body.append('<h2 id="ablation">Ablation: a model per label version</h2>')
        rows = []
        for r in data.ablation:
            row = {"labels": r["labels"], "version": r.get("labels_ref", ""), "seeds": r.get("seeds", "")}
            if any("mAP_gain" in x for x in data.ablation):  # the answer next to what a row is, as the CLI says it
                row[GAIN] = "" if "mAP_gain" not in r else (
                    f"{r['mAP_gain']:+.3f}" + (f" ± {r['mAP_gain_std']:.3f}" if "mAP_gain_std" in r else "")
                    + f" ({'yes' if r.get('gain_over_2std') else 'no'})")
            figures = dict.fromkeys(k[: -len("_mean")] for k in r if k.endswith("_mean"))
            for m in ablation_columns([figures]):  # the overall figures first, not alphabetical
                row[m] = f"{r[m + '_mean']:.3f} ± {r.get(m + '_std', 0.0):.3f}"
            rows.append(row)
        body.append('<p class="legend">Held-out keys, against the ground truth; mean ± std over seeds.</p>')
        body.append(_table(rows, "ablation"))
        if data.ablation_note:
            body.append(f'<p class="legend">{html.escape(data.ablation_note)}</p>')
        ablation_chart(data.ablation).save(out / "figures" / "ablation.png")
        body.append('<img src="figures/ablation.png" alt="held-out mAP per label version">')
    return body


# ---------------------------------------------------------------------------------------------
# Filling a report from the store: a version and its lineage.

LABEL_STAGES = ("parsed", "generated", "clean")


def build_report(store, version, out_dir: str | Path, *, truth_path: str | None = None, notes: Sequence[str] = (),
                 n_samples: int = 8, crop_tags: int | None = None, ablation=None) -> Path:
    """Render the report of `version` and every version in its lineage into `out_dir` (with an
    `ablation` version, its table and plot too)."""
    from collections import Counter



    by_stage = nearest_versions(store, version)
    order = [s for s in OUTPUTS if s in by_stage] + [s for s in by_stage if s not in OUTPUTS]
    stages = []
    for name in order:
        v = by_stage.get(name)
        if v is None:
            continue
        m = v.manifest
        stages.append(StageSummary(name=name, version=v.id, rows_in=m["rows_in"], rows_out=m["rows_out"],
                                   rows_rejected=m["rows_rejected"], seconds=float(m.get("duration_s") or 0.0),
                                   note=_stage_note(m)))
    lv = next((labels_version(store, v) for v in by_stage.values() if labels_version(store, v) is not None), None)
    labels = load_labels(store, lv) if lv is not None else None
    tags_by_stage: dict[str, dict[str, set[str]]] = {}
    histograms: dict[str, dict[str, int]] = {}
    for stage in LABEL_STAGES:
        v = by_stage.get(stage)
        if v is None or labels is None:
            continue
        per_key = {k: {labels.name(i) for i in ids} for k, ids in key_tags(v).items()}
        tags_by_stage[stage] = per_key
        histograms[stage] = dict(Counter(t for tags in per_key.values() for t in tags).most_common())
    truth = None
    images = by_stage.get("images")
    if truth_path and labels is not None:
        truth = normalise_truth(load_ground_truth(truth_path), labels)
        if images is not None:
            truth = rekey_truth(truth, images)
    regions = by_stage.get("regions")
    boxes: dict[str, list[BoxView]] = {}
    if regions is not None:
        for row in regions.read_table(columns=["key", "tag", "box", "score"]).to_pylist():
            boxes.setdefault(row["key"], []).append(BoxView(row["tag"], tuple(row["box"]), row["score"]))
    removed_reasons = _removal_reasons(by_stage.get("clean"), labels)
    tag_changes = _tag_changes(tags_by_stage, removed_reasons)
    samples = []
    if images is not None:
        wanted = pick_changed_samples(tags_by_stage, removed_reasons, n_samples)
        captions = {r["key"]: r["captions"] for r in images.read_table(columns=["key", "captions"]).to_pylist()
                    if r["key"] in wanted}
        for sample in images.iter_samples():
            key = sample["__key__"]
            if key not in wanted:
                continue
            samples.append(SampleView(key=key, image=image_member(sample),
                                      tags_by_stage={s: sorted(t.get(key, ())) for s, t in tags_by_stage.items()},
                                      boxes=boxes.get(key, []), captions=captions.get(key, []),
                                      truth=sorted(truth[key]) if truth and key in truth else None,
                                      removed_reasons=removed_reasons.get(key, {})))
            if len(samples) == len(wanted):
                break
        samples.sort(key=lambda s: wanted.index(s.key))
    crops_by_tag: dict[str, list[CropView]] = {}
    clean = by_stage.get("clean")
    if clean is not None and regions is not None:
        crop_rows = clean.read_table("crops").to_pylist()
        counts = Counter(r["tag_id"] for r in crop_rows if r["cluster"] >= 0)
        chosen = {t for t, _ in counts.most_common(crop_tags)}  # every clustered tag unless limited
        rows = {r["crop_key"]: r for r in crop_rows if r["tag_id"] in chosen}
        for sample in regions.iter_samples():
            r = rows.get(sample["__key__"])
            if r is None:
                continue
            tag = labels.name(r["tag_id"]) if labels is not None else str(r["tag_id"])
            wrong = (tag not in truth[r["key"]]) if truth and r["key"] in truth else None
            crops_by_tag.setdefault(tag, []).append(CropView(key=r["crop_key"], image=image_member(sample), cluster=r["cluster"],
                                                             outlier=r["outlier"], distance=r["distance"], wrong=wrong))
    evaluation, removal = [], []
    ev = by_stage.get("evaluate")
    if ev is not None:
        evaluation = [{k: v for k, v in row.items()} for row in ev.manifest["metrics"].get("ablation", [])]
        removal = list(ev.manifest["metrics"].get("cleaning_removal", []))
    data = ReportData(title=f"RAM data engine: {version.stage}@{version.id}", stages=stages,
                      tag_histograms=histograms, samples=samples, crops_by_tag=crops_by_tag, evaluation=evaluation,
                      notes=list(notes), cleaning_removal=removal, tag_changes=tag_changes,
                      ablation=list(ablation.manifest["metrics"]["summary"]) if ablation is not None else [],
                      ablation_note=ablation.manifest["metrics"].get("note", "") if ablation is not None else "")
    return render_report(data, out_dir)


def _removal_reasons(clean, labels) -> dict[str, dict[str, str]]:
    """key -> {tag name: reason} for every tag the clean version removed (stored beside the kept tags)."""
    if clean is None or labels is None:
        return {}
    out: dict[str, dict[str, str]] = {}
    for batch in clean.iter_batches(columns=["key", "removed_tag_ids", "removed_reasons"]):
        for key, ids, reasons in zip(*(batch.column(i).to_pylist() for i in range(3))):
            if ids:
                out.setdefault(key, {}).update({labels.name(i): r for i, r in zip(ids, reasons or [])})
    return out


def _tag_changes(tags_by_stage: Mapping[str, Mapping[str, set[str]]],
                 removed_reasons: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, int]]:
    """tag -> {"added": keys generation added it to, "<reason>": keys cleaning removed it from}."""
    from collections import Counter, defaultdict

    changes: dict[str, Counter] = defaultdict(Counter)
    parsed, generated = tags_by_stage.get("parsed", {}), tags_by_stage.get("generated", {})
    for key, tags in generated.items():
        for t in tags - parsed.get(key, set()):
            changes[t]["added"] += 1
    for key, removed in removed_reasons.items():
        for t, reason in removed.items():
            changes[t][reason] += 1
    return {t: dict(c) for t, c in changes.items()}


def pick_changed_samples(tags_by_stage: Mapping[str, Mapping[str, set[str]]],
                         removed_reasons: Mapping[str, Mapping[str, str]], n: int) -> list[str]:
    """Up to `n` keys that show what the stages did: taken in turn from keys where generation added a tag
    and keys where cleaning removed one for each reason (so every kind of change appears), the keys with
    the most changes first; unchanged keys only when too few changed."""
    parsed, generated = tags_by_stage.get("parsed", {}), tags_by_stage.get("generated", {})
    kinds: dict[str, list[tuple[int, str]]] = {}
    for key in sorted(set(parsed) | set(generated) | set(removed_reasons)):
        added = len(generated.get(key, set()) - parsed.get(key, set()))
        removed = removed_reasons.get(key, {})
        n_changes = added + len(removed)
        if added:
            kinds.setdefault("added", []).append((-n_changes, key))
        for reason in set(removed.values()):
            kinds.setdefault(reason, []).append((-n_changes, key))
    queues = [sorted(v) for _, v in sorted(kinds.items())]
    picked: list[str] = []
    while len(picked) < n and any(queues):
        for q in queues:
            while q and q[0][1] in picked:
                q.pop(0)
            if q and len(picked) < n:
                picked.append(q.pop(0)[1])
    rest = [k for k in parsed if k not in picked]
    return picked + rest[: n - len(picked)]


def _stage_note(manifest: dict) -> str:
    m = manifest.get("metrics") or {}
    if manifest["stage"] == "clean" and "tags_in" in m:
        return (f"{m.get('outlier', 0)} outlier, {m.get('baseline-disagrees', 0)} baseline-disagrees, "
                f"{m.get('no-box', 0)} no-box removals of {m['tags_in']} tags")
    if manifest["stage"] == "generated" and "added_by_model" in m:
        return f"+{m['added_by_model']} tags by the model, +{m.get('added_by_caption', 0)} from generated captions"
    if manifest["stage"].startswith("models/") and m.get("mAP") is not None:
        return f"held-out mAP {m['mAP']:.3f} (against the noisy labels)"
    if manifest["stage"] == "regions" and "regions" in m:
        return f"{m['regions']} boxes"
    return ""
