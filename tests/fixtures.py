"""Data the tests generate: images and sources."""
from __future__ import annotations

import io
import json
from pathlib import Path


def image_bytes(size=(48, 40), color=(200, 30, 30), fmt="JPEG", mode="RGB", **save) -> bytes:
    from PIL import Image

    img = Image.new(mode, size, color)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def write_folder_source(root: Path, items: dict[str, tuple[bytes | None, object]]) -> Path:
    """items: file name -> (image bytes or None for absent, captions (str|list|None|bytes))."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, (data, captions) in items.items():
        if data is not None:
            (root / name).write_bytes(data)
        if captions is None:
            continue
        if isinstance(captions, bytes):  # raw line content for invalid-encoding tests
            lines.append(b'{"file": "' + name.encode() + b'", "caption": "' + captions + b'"}')
        else:
            key = "captions" if isinstance(captions, list) else "caption"
            lines.append(json.dumps({"file": name, key: captions}).encode())
    (root / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root
