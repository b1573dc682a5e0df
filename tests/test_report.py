"""The HTML report, rendered in real headless Chromium: images load, tags, diffs and tables are there."""
from __future__ import annotations

import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from tasks.demo.world import generate_world
from tasks.stages.evaluate import ablation_table
from tasks.shared.truth import load_ground_truth
from tasks.inspection.report import BoxView, CropView, ReportData, SampleView, StageSummary, bar_chart, render_report

EVIL = '<script>alert("x")</script>&"'
WINDOW_PX = 1400   # the width the report must fit (a laptop screen)

# Written into the page only for the test: it records, after every image has loaded or failed,
# what the browser made of the page.
_PROBE = """<script>
window.addEventListener('load', () => {
  const q = s => [...document.querySelectorAll(s)].map(e => e.textContent);
  const status = {
    images: [...document.images].map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0,
                                            w: i.naturalWidth})),
    scripts: document.scripts.length,
    added: q('.sample ins.added'), removed: q('.sample del.removed'), wrong: q('.sample .wrong'),
    eval_rows: [...document.querySelectorAll('table.evaluation tbody tr')].map(r => r.cells[0].textContent),
    stage_rows: [...document.querySelectorAll('table.stages tbody tr')].map(r => r.cells[0].textContent),
    outliers: document.querySelectorAll('.crop.outlier').length,
    headings: q('h3'), notes: q('ul.notes li'), sections: [...document.querySelectorAll('h2')].map(h => h.id),
    reasons: q('.sample .reason'), removed_titles: [...document.querySelectorAll('.sample del.removed')].map(
      d => d.getAttribute('title')),
    changes: [...document.querySelectorAll('table.changes tbody tr')].map(r => [...r.cells].map(c => c.textContent)),
    change_head: [...document.querySelectorAll('table.changes thead th')].map(c => c.textContent),
    eval_head: [...document.querySelectorAll('table.evaluation thead th')].map(c => c.textContent),
    width: document.documentElement.scrollWidth, window_width: window.innerWidth,
    verdicts: q('.verdict'),
    crop_labels: [...document.querySelectorAll('.crop span:first-of-type')].map(e => {
      const b = e.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; }),
  };
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify(status);
  document.body.appendChild(pre);
});
</script>"""


@pytest.fixture(scope="session")
def chromium(tmp_path_factory):
    """Load an HTML file in headless Chromium and return what the probe recorded."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium); the report is not rendered")

    def run(page: Path) -> dict:
        probe = page.with_name("_probe.html")
        text = page.read_text(encoding="utf-8")
        assert "</body>" in text
        probe.write_text(text.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
        profile = tmp_path_factory.mktemp("chromium-profile")
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
               f"--user-data-dir={profile}", "--virtual-time-budget=10000", f"--window-size={WINDOW_PX},1000",
               "--dump-dom", probe.as_uri()]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        m = re.search(r'<pre id="probe">(.*?)</pre>', res.stdout, re.S)
        assert m, f"chromium printed no probe (rc {res.returncode}): {res.stderr[-2000:]}"
        return json.loads(html.unescape(m.group(1)))

    return run


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def report_data(tmp_path_factory) -> tuple[ReportData, dict]:
    """A report over a small demo world: caption tags, a generation step that adds the truth, and a
    cleaning step that removes the wrong tags. Boxes and crops come from the ground truth."""
    info = generate_world(tmp_path_factory.mktemp("world"), 12, seed=7)
    rows = [json.loads(x) for x in info.ground_truth.read_text().splitlines()]
    truth = load_ground_truth(info.ground_truth)
    parsed = {r["key"]: sorted(set().union(*map(set, r["caption_tags"]))) for r in rows}
    generated = {k: sorted(set(parsed[k]) | truth[k]) for k in parsed}
    cleaned = {k: sorted(set(v) & truth[k]) for k, v in generated.items()}
    samples, crops = [], {}
    reasons = {k: {t: ("outlier" if i % 2 else "baseline-disagrees")
                   for i, t in enumerate(sorted(set(generated[k]) - set(cleaned[k])))} for k in generated}
    for r in rows[:6]:
        data = (info.source / r["file"]).read_bytes()
        samples.append(SampleView(key=r["key"], image=data, captions=r["captions"], truth=r["tags"],
                                  tags_by_stage={"parsed": parsed[r["key"]], "generated": generated[r["key"]],
                                                 "cleaned": cleaned[r["key"]]},
                                  boxes=[BoxView(o["category"], tuple(o["box"]), 0.9) for o in r["objects"]],
                                  removed_reasons=reasons[r["key"]]))
        img = Image.open(io.BytesIO(data))
        for j, o in enumerate(r["objects"]):
            crops.setdefault(o["category"], []).append(CropView(
                key=r["key"], image=_png(img.crop(tuple(o["box"]))), cluster=j % 2, outlier=j == 2,
                distance=0.1 * j, wrong=j == 2))
    # Bad input must not break the report: undecodable pixels and markup in text.
    samples.append(SampleView(key=EVIL, image=b"not an image", captions=[EVIL],
                              tags_by_stage={"parsed": [EVIL, "ball"], "cleaned": ["ball"]},
                              boxes=[{"tag": EVIL, "box": (1, 1, 5, 5)}]))
    stages_labels = {"parsed": {k: set(v) for k, v in parsed.items()},
                     "parsed+generated": {k: set(v) for k, v in generated.items()},
                     "cleaned": {k: set(v) for k, v in cleaned.items()}}
    hist = {name: {} for name in stages_labels}
    for name, labels in stages_labels.items():
        for tags in labels.values():
            for t in tags:
                hist[name][t] = hist[name].get(t, 0) + 1
    data = ReportData(
        title=f"demo run {EVIL}",
        stages=[StageSummary("ingest", "v-1a2b", 12, 12, 0, 0.4),
                {"name": "parse", "version": "v-3c4d", "rows_in": 12, "rows_out": 11, "rows_rejected": 1,
                 "seconds": 1.25, "note": EVIL}],
        tag_histograms=hist, samples=samples, crops_by_tag=crops,
        evaluation=ablation_table(stages_labels, truth),
        notes=["the detector is a tiny random one", EVIL],
        tag_changes={"circle": {"added": 5, "outlier": 2}, "red": {"added": 1, "no-box": 9}, EVIL: {"added": 1}})
    return data, {"cleaned": cleaned, "parsed": parsed, "generated": generated, "reasons": reasons}


def test_report_files_and_escaping(report_data, tmp_path):
    data, _ = report_data
    index = render_report(data, tmp_path / "report")
    page = index.read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&quot;" in page
    srcs = re.findall(r'src="([^"]+)"', page)
    assert srcs and all((index.parent / s).is_file() for s in srcs)
    assert {s.split("/")[0] for s in srcs} == {"figures", "samples", "crops"}
    # Sample images are scaled up and carry the boxes drawn in the tag's colour.
    assert Image.open(index.parent / "samples/0000.png").size == (256, 256)
    assert not list(index.parent.glob(".index.*"))


def test_report_renders_in_chromium(report_data, tmp_path, chromium):
    data, labels = report_data
    index = render_report(data, tmp_path / "report")
    status = chromium(index)
    n_crops = sum(len(v) for v in data.crops_by_tag.values())
    n_images = 2 + len(data.tag_histograms) + len(data.samples) + n_crops   # + timings + tag changes
    assert len(status["images"]) == n_images
    assert all(i["ok"] and i["w"] > 0 for i in status["images"]), [i for i in status["images"] if not i["ok"]]
    assert status["scripts"] == 1   # only the probe: markup in the data stayed text
    assert status["stage_rows"] == ["ingest", "parse"]
    assert status["eval_rows"] == ["parsed", "parsed+generated", "cleaned"]
    # Tags added by generation and removed by cleaning are marked, per sample.
    expect_added = sum(len(set(labels["generated"][s.key]) - set(labels["parsed"][s.key]))
                       for s in data.samples[:6])
    expect_removed = sum(len(set(labels["generated"][s.key]) - set(labels["cleaned"][s.key]))
                         for s in data.samples[:6]) + 1   # + the markup tag of the bad sample
    assert len(status["added"]) == expect_added and all(a.startswith("+") for a in status["added"])
    assert len(status["removed"]) == expect_removed and EVIL in status["removed"]
    # Tags that are not in the ground truth (the captions' absent mentions) are marked in every stage
    # that still has them: parsed and generated here, never cleaned.
    truth = {s.key: set(s.truth) for s in data.samples[:6]}
    assert len(status["wrong"]) == sum(2 * len(set(labels["parsed"][k]) - truth[k]) for k in truth) > 0
    assert status["outliers"] == sum(c.outlier for v in data.crops_by_tag.values() for c in v)
    assert EVIL in status["headings"] and EVIL in status["notes"]
    assert "the detector is a tiny random one" in status["notes"]
    # The page leads with the evaluation (stage first, then the quality figures) and what changed per tag.
    assert status["sections"][:2] == ["evaluation", "changes"]
    assert status["eval_head"][:7] == ["stage", "n_keys", "labels_per_key", "precision vs truth", "recall vs truth",
                                       "F1 vs truth", "tp"]
    assert status["change_head"] == ["tag", "added", "removed: no-box", "removed: outlier", "net"]
    assert status["changes"][0] == ["red", "1", "9", "0", "-8"] and status["changes"][1] == ["circle", "5", "0", "2", "3"]
    # Each removed tag says why cleaning removed it.
    expect = [labels["reasons"][s.key][t] for s in data.samples[:6] for t in sorted(
        set(labels["generated"][s.key]) - set(labels["cleaned"][s.key]))]
    assert sorted(status["reasons"]) == sorted(f"({r})" for r in expect) and expect


def test_bar_chart_draws_bars():
    img = bar_chart([("ball", 10), ("sky", 5)], "counts")
    assert img.width == 640 and img.height == 34 + 2 * 18 + 8
    # A bar is drawn on each row, longer for the larger count.
    row = lambda y: sum(1 for x in range(img.width) if img.getpixel((x, y)) not in ((255, 255, 255),))
    assert row(34 + 9) > row(34 + 18 + 9) > 0


def test_empty_report_still_renders(tmp_path):
    index = render_report(ReportData(title="nothing yet"), tmp_path / "empty")
    page = index.read_text()
    assert "<title>nothing yet</title>" in page and page.count("(none)") == 3
    assert "no evaluate version in this lineage" in page and "no generated and clean versions" in page
    assert not list((tmp_path / "empty" / "figures").iterdir())


def test_changed_samples_show_every_kind_of_change():
    from tasks.inspection.report import pick_changed_samples

    parsed = {f"k{i}": {"cat"} for i in range(10)}
    generated = {k: set(v) for k, v in parsed.items()}
    generated["k1"] |= {"dog"}
    generated["k2"] |= {"dog", "red", "sky"}          # the most added: first of its kind
    removed = {"k3": {"cat": "outlier"}, "k4": {"cat": "no-box"}, "k5": {"cat": "baseline-disagrees"},
               "k6": {"cat": "outlier"}}
    picked = pick_changed_samples({"parsed": parsed, "generated": generated}, removed, 4)
    assert picked == ["k2", "k5", "k4", "k3"]  # one per kind (added, then each reason), most changes first
    assert pick_changed_samples({"parsed": parsed, "generated": generated}, removed, 8)[:6] == \
        ["k2", "k5", "k4", "k3", "k1", "k6"]
    assert len(pick_changed_samples({"parsed": parsed}, {}, 3)) == 3   # nothing changed: still samples


def test_removal_and_ablation_tables_lead_with_their_figures(tmp_path):
    """Rows come back from manifests with sorted keys: the tables must not start with base_rate or with
    the per-type figures (attribute_f1 …) before the overall mAP / precision / recall / F1."""
    removal = [{"base_rate": 0.19, "reason": "outlier", "removal_precision": 0.505, "removal_recall": 0.163,
                "removed": 97, "removed_wrong": 49, "wrong_localisable_in": 300}]
    ablation = [{"attribute_f1_mean": 0.26, "attribute_f1_std": 0.02, "f1_mean": 0.39, "f1_std": 0.01, "labels": "parsed",
                 "labels_ref": "parsed/abc", "mAP_mean": 0.518, "mAP_std": 0.005, "precision_mean": 0.95,
                 "precision_std": 0.02, "recall_mean": 0.25, "recall_std": 0.01, "seeds": 3}]
    page = render_report(ReportData(title="t", cleaning_removal=removal, ablation=ablation), tmp_path / "r").read_text()

    def head(css: str) -> list[str]:
        return re.findall(r"<th>([^<]*)</th>", page.split(f'<table class="{css}">', 1)[1].split("</thead>", 1)[0])

    assert head("cleaning-removal") == ["reason", "removal_precision", "removal_recall", "removed", "removed_wrong",
                                        "wrong_localisable_in", "base_rate"]
    assert head("ablation") == ["labels", "version", "seeds", "precision", "recall", "f1", "mAP", "attribute_f1"]


def _ablation_rows(groups=("attribute", "object", "scene", "action", "colour", "shape")) -> list[dict]:
    """Summary rows as tasks.stages.ablation.summarise writes them: ~20 figures per label version."""
    rows = []
    for i, labels in enumerate(("parsed", "parsed+generated", "cleaned")):
        r = {"labels": labels, "labels_ref": f"{labels.split('+')[0]}/{'0123456789abcdef' * 2}", "seeds": 3}
        for m in ("mAP", "precision", "recall", "f1", *(f"{g}_f1" for g in groups), *(f"{g}_mAP" for g in groups)):
            r[f"{m}_mean"], r[f"{m}_std"] = 0.70 + 0.02 * i, 0.004
        if i:
            r |= {"mAP_gain": 0.02 * i, "mAP_gain_std": 0.006 * i, "gain_over_2std": i == 2}
        rows.append(r)
    return rows


def test_wide_report_fits_1400_px_and_leads_with_the_verdict(tmp_path, chromium):
    """The ablation (20 figures per label version) ran to ~2,530 px, the column that answers "did cleaning
    help?" off-screen; now the page fits the window, opens with the verdict the CLI prints, and crop captions
    (long keys) do not run into each other."""
    crops = {"circle": [CropView(key=f"part-{'a' * 30}-{i:04d}", image=_png(Image.new("RGB", (20, 12), (9, 9, 9))),
                                 cluster=0, distance=0.1 * i) for i in range(12)]}
    data = ReportData(title="wide", ablation=_ablation_rows(), crops_by_tag=crops,
                      ablation_note="Scored on 180 held-out keys with ground truth.")
    status = chromium(render_report(data, tmp_path / "r"))
    assert status["window_width"] == WINDOW_PX
    assert status["width"] <= WINDOW_PX, f"the page is {status['width']} px wide"
    assert status["sections"][0] == "verdict"
    assert len(status["verdicts"]) == 2
    assert status["verdicts"][0].startswith("parsed+generated: no") and "+0.020 ± 0.006" in status["verdicts"][0]
    assert status["verdicts"][1].startswith("cleaned: yes") and "+0.040 ± 0.012" in status["verdicts"][1]
    boxes = status["crop_labels"]
    assert len(boxes) == 12
    for i, a in enumerate(boxes):
        assert a[2] - a[0] <= 100, a                 # a caption wraps under its crop, not beside the next one
        for b in boxes[i + 1:]:
            overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
            assert not overlap, (a, b)
            if a[1] < b[3] and b[1] < a[3]:          # side by side: a visible gap between the two captions
                assert b[0] - a[2] >= 8 or a[0] - b[2] >= 8, (a, b)


def test_a_table_wider_than_the_page_is_transposed_with_the_gain_beside_the_labels(tmp_path):
    page = render_report(ReportData(title="t", ablation=_ablation_rows()), tmp_path / "r").read_text()
    table = page.split('<table class="ablation transposed">', 1)[1].split("</table>", 1)[0]
    assert re.findall(r"<th>([^<]*)</th>", table)[:5] == ["labels", "parsed", "parsed+generated", "cleaned", "version"]
    heads = re.findall(r"<tr><th>([^<]*)</th>", table)
    assert heads[:4] == ["labels", "version", "seeds", "mAP gain ± paired std (&gt; 2 std)"]   # labels: the head row
    assert "+0.040 ± 0.012 (yes)" in table and "+0.020 ± 0.006 (no)" in table
