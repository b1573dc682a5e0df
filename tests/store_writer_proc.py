"""A writer run in a child process by the store tests (killed with SIGKILL, or raced)."""
import json
import sys
import time

import pyarrow as pa

from storage import Store, schemas
from tasks.engine.runner import PartTask, run_stage


def table_for(i: int) -> pa.Table:
    keys = [f"k{i:03d}_{j:04d}" for j in range(2000)]
    return pa.Table.from_pydict({"tag_ids": [[j % 7, i] for j in range(2000)], "key": keys,
                                 "removed_tag_ids": [[] for _ in keys], "removed_reasons": [[] for _ in keys]}
                                ).select(schemas.CLEAN.names).cast(schemas.CLEAN)


def main(url: str, options: str, n_parts: int, sleep_s: float) -> None:
    store = Store(url, **json.loads(options))
    writer = store.begin("clean", code_version="t1", config={"n": n_parts}, parents=["generated/abc"])
    tasks = [PartTask(f"part-{i:03d}", f"src-{i}", i) for i in range(n_parts)]

    def process(w, task):
        samples = ({"__key__": f"s{task.payload}_{j}", "png": bytes([j % 251]) * 5000} for j in range(50))
        record = w.write_part(task.name, table=table_for(task.payload), samples=samples, rows_in=2000,
                              source_digest=task.source_digest)
        print(f"wrote {task.name}", flush=True)
        time.sleep(sleep_s)
        return record

    result = run_stage(writer, tasks, process)
    print(json.dumps({"version": result.version.id, "status": result.status}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
