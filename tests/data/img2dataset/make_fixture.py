"""Make the img2dataset fixture: the real img2dataset (1.47) downloads generated images from a loopback
HTTP server, in each of its output formats. Run once, outputs committed beside this script.

img2dataset 1.47 pins webdataset<0.3, which the engine's webdataset>=1.0 excludes, so it cannot be a test
dependency; it runs in an environment of its own:

    python3 -m venv /tmp/i2d && /tmp/i2d/bin/pip install img2dataset==1.47.0
    /tmp/i2d/bin/python tests/data/img2dataset/make_fixture.py

Runs (each in <run>/<format>/ as img2dataset writes it: shards, per-shard .parquet and _stats.json):
  resized/   resize_mode=border, image_size=64, re-encoded to jpg: a 1x1 image arrives as 64x64;
             formats webdataset, parquet and files
  original/  resize_mode=no, disable_all_reencoding: the source bytes as served (jpg, png and webp in one shard,
             all named .jpg by img2dataset); format webdataset
Samples: see SAMPLES; `license` is saved as an additional column; one URL is a 404 and one serves HTML.
"""
from __future__ import annotations

import functools
import http.server
import io
import json
import shutil
import threading
from pathlib import Path

from PIL import Image

HERE = Path(__file__).parent


def image(size, fmt, color, exif=False) -> bytes:
    img = Image.new("RGB", size, color)
    for x in range(0, size[0], 7):   # some structure, so encoders do real work
        for y in range(0, size[1], 5):
            img.putpixel((x, y), (255 - color[0], 255 - color[1], 255 - color[2]))
    buf = io.BytesIO()
    kwargs = {}
    if exif:
        ex = Image.Exif()
        ex[0x010F] = "RAM-Fixture-Camera"   # Make
        ex[0x0110] = "Model 1"              # Model
        kwargs["exif"] = ex.tobytes()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


# name -> (body, content type, caption, license); name None: not served (404)
SAMPLES = {
    "cat.jpg": (image((96, 64), "JPEG", (200, 30, 30)), "image/jpeg", "a red cat on a sofa", "cc-by"),
    "dog.png": (image((80, 80), "PNG", (30, 200, 30)), "image/png", "a green dog in a park", "cc0"),
    "bird.webp": (image((70, 90), "WEBP", (30, 30, 200)), "image/webp", "a blue bird on a branch", "cc-by-sa"),
    "dot.png": (image((1, 1), "PNG", (9, 9, 9)), "image/png", "a single dark pixel", "cc0"),
    "camera.jpg": (image((120, 90), "JPEG", (120, 120, 20), exif=True), "image/jpeg", "a yellow car by a tree", "cc-by"),
    "big.jpg": (image((300, 200), "JPEG", (10, 150, 150)), "image/jpeg", "a teal boat on a lake", "cc-by"),
    "page.jpg": (b"<html><body>not an image</body></html>", "text/html", "an html page", "unknown"),
    "gone.jpg": (None, None, "a missing picture", "unknown"),
}


def serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def main() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from img2dataset import download

    work = HERE / "_work"
    shutil.rmtree(work, ignore_errors=True)
    (work / "www").mkdir(parents=True)
    for name, (body, _, _, _) in SAMPLES.items():
        if body is not None:
            (work / "www" / name).write_bytes(body)
    server, base = serve(work / "www")
    try:
        urls = pa.table({"url": [f"{base}/{n}" for n in SAMPLES], "caption": [s[2] for s in SAMPLES.values()],
                         "license": [s[3] for s in SAMPLES.values()]})
        pq.write_table(urls, work / "urls.parquet")
        runs = {"resized": (dict(resize_mode="border", image_size=64), ("webdataset", "parquet", "files")),
                "original": (dict(resize_mode="no", disable_all_reencoding=True), ("webdataset",))}
        for run, (options, formats) in runs.items():
            for fmt in formats:
                out = HERE / run / fmt
                shutil.rmtree(out, ignore_errors=True)
                download(url_list=str(work / "urls.parquet"), input_format="parquet", url_col="url",
                         caption_col="caption", save_additional_columns=["license"], output_format=fmt,
                         output_folder=str(out), processes_count=1, thread_count=4, timeout=5, retries=0,
                         number_sample_per_shard=100, enable_wandb=False, compute_hash="sha256",
                         extract_exif=True, distributor="multiprocessing", **options)
    finally:
        server.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    # The fixture records what was served, so tests can check sizes and metadata against it.
    (HERE / "served.json").write_text(json.dumps(
        {name: {"caption": s[2], "license": s[3], "served": s[0] is not None,
                "size": list(Image.open(io.BytesIO(s[0])).size) if s[1] and s[1].startswith("image/") else None}
         for name, s in SAMPLES.items()}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
