"""Runs the data-engine loop in a child process and SIGKILLs itself at a chosen point of one stage.

    python tests/crash_proc.py CONFIG_JSON STAGE POINT

POINT: before-part (a stage's first part is about to be written), mid-file (a file is half written),
mid-part (a part's files are in place, its record is not), before-manifest (all parts are whole,
the manifest is not written), slow (runs to the end, pausing after each part record or in-part checkpoint
of STAGE, so that a second run can start while this one is inside the stage). STAGE is a store stage (images, parsed, models/baseline, generated,
regions, embeddings, clean, models/ram, evaluate) or "none" to run to the end.
"""
import json
import os
import signal
import sys

import torch

torch.set_num_threads(1)  # the parent's reference run uses one thread: the same floats, the same bytes


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main(config_json: str, stage: str, point: str) -> None:
    from contextlib import contextmanager

    import storage.fs as sfs
    import storage.store as sstore
    from flows.data_engine import data_engine_flow
    from tasks.engine.config import EngineConfig

    cfg = EngineConfig.model_validate(json.loads(config_json))
    prefix = stage + "/"

    if point == "none":
        pass
    elif point == "slow":
        import time

        original_put = sfs.Placement.put_bytes

        def slow_put(self, rel, data, **kwargs):
            info = original_put(self, rel, data, **kwargs)
            if rel.startswith(prefix) and ("/_parts/" in rel or rel.endswith(".checkpoint.json")):
                time.sleep(float(os.environ.get("RAM_TEST_PAUSE_S", "1.5")))
            return info

        sfs.Placement.put_bytes = slow_put
    elif point == "before-part":
        for name in ("write_part", "write_files"):
            original = getattr(sstore.VersionWriter, name)

            def patched(self, *a, _original=original, **k):
                if self.stage == stage:
                    die()
                return _original(self, *a, **k)

            setattr(sstore.VersionWriter, name, patched)
    elif point in ("mid-part", "before-manifest"):
        original_put = sfs.Placement.put_bytes
        marker = "/_parts/" if point == "mid-part" else "/_manifest.json"

        def put_bytes(self, rel, data, **kwargs):
            if rel.startswith(prefix) and marker in rel:
                die()
            return original_put(self, rel, data, **kwargs)

        sfs.Placement.put_bytes = put_bytes
    elif point == "mid-file":
        original_open = sfs.Placement.atomic_open

        @contextmanager
        def atomic_open(self, rel, **kwargs):
            with original_open(self, rel, **kwargs) as writer:
                if rel.startswith(prefix) and "/_parts/" not in rel and "_manifest" not in rel:
                    writer.write(b"\0" * 100)  # some bytes reach the temporary file, then the process dies
                    writer.flush()
                    die()
                yield writer

        sfs.Placement.atomic_open = atomic_open
    results = data_engine_flow.fn(cfg)
    print(json.dumps({k: r.version.ref for k, r in results.items()}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
