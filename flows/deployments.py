"""Deployments: the scheduled data-engine loop, and retraining triggered by new images.

* `ram-data-engine` runs `flows.data_engine:data_engine_flow` on `orchestration.schedule_cron`.
* `ram-retrain` runs `flows.retrain:retrain_flow` when the event `ram.images.committed` arrives for this
  store (resource id `ram.store.<digest of the store URL>`).
* `emit_images_committed` sends that event after ingest commits a version with new samples. The
  retrain flow applies `orchestration.retrain_min_new_samples` of the config it is served with (one
  setting, where the deployment runs). "New samples" has one definition, `samples_since_last_training`
  (the samples the latest model was not trained on): the event's payload and the retrain's decision
  both count with it.

`serve(cfg)` registers both deployments and runs their flow runs in this process (`prefect.serve`);
call it under `if __name__ == "__main__":` (or through `ram-engine serve`), since Prefect starts each
flow run in a fresh subprocess that imports the caller's module again.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any

from prefect import Flow

from storage import Store, Version, digest
from tasks.engine.config import ConfigError, EngineConfig

from .runners import with_task_runner

log = logging.getLogger("ram_engine")

EVENT_IMAGES_COMMITTED = "ram.images.committed"
LOOP_FLOW = "flows.data_engine:data_engine_flow"
RETRAIN_FLOW = "flows.retrain:retrain_flow"
LOOP_DEPLOYMENT = "ram-data-engine"
RETRAIN_DEPLOYMENT = "ram-retrain"

# Retrain-flow parameters filled from the event; only those the flow declares are passed.
EVENT_PARAMETERS = {
    "images_version": "{{ event.payload.version }}",
    "new_samples": "{{ event.payload.new_samples }}",
}


# --------------------------------------------------------------------------- the event
def store_identity(store: Store) -> str:
    """The store's URL as every process sees it (absolute for local folders)."""
    return store.full_url("").rstrip("/")


def store_resource_id(store: Store) -> str:
    """The Prefect resource id of a store: `ram.store.<16 hex of sha256 of its URL>`."""
    return f"ram.store.{digest(store_identity(store), 16)}"


def samples_since_last_training(store: Store, images: Version, model_stage: str) -> tuple[int, str | None]:
    """(samples of `images` that the latest `model_stage` version was not trained on, that version's images
    ref or None when there is no model yet). Counted by sample, so it accumulates across images versions: a
    sample was trained on when its key was, or when the same source key with the same image bytes was (an
    img2dataset folder that moved gets new folder-tagged keys, not new samples)."""
    models = store.versions(model_stage)
    if not models:
        return images.manifest["rows_out"], None
    trained = next((p for p in models[-1].parents if p.startswith("images/")), None)
    old = store.find("images", trained.rpartition("/")[2]) if trained else None
    if old is None:
        return images.manifest["rows_out"], None
    if old.id == images.id:
        return 0, old.ref
    def rows(v: Version) -> list[dict]:   # versions from before the source_key column have keys only
        columns = [c for c in ("key", "source_key", "sha256") if c in v.schema.names]
        return [{"source_key": None, "sha256": None} | r for r in v.read_table(columns=columns).to_pylist()]

    trained_rows = rows(old)
    seen = {r["key"] for r in trained_rows}
    seen_content = {(r["source_key"], r["sha256"]) for r in trained_rows if r["source_key"] is not None}
    return sum(r["key"] not in seen and (r["source_key"] is None or (r["source_key"], r["sha256"]) not in seen_content)
               for r in rows(images)), old.ref


def emit_images_committed(store: Store, version: Version, new_samples: int, threshold: int,
                          *, trained_on: str | None = None, event: str = EVENT_IMAGES_COMMITTED):
    """Emit `event` for a committed `images` version when `new_samples` (counted by
    `samples_since_last_training`, since the images version `trained_on`) reaches `threshold`; returns
    the Prefect Event, or None when below the threshold (or when Prefect has nowhere to send it)."""
    if new_samples < threshold:
        log.info("images@%s: %d new samples < %d: no %s event", version.id, new_samples, threshold, event)
        return None
    from prefect.events import emit_event

    from .runtime import prefect_api_available  # looked up at call time: tests replace it on flows.runtime

    if not prefect_api_available():
        log.info("images@%s: no Prefect API configured: no %s event", version.id, event)
        return None
    m = version.manifest
    sent = emit_event(
        event=event,
        resource={"prefect.resource.id": store_resource_id(store),
                  "prefect.resource.name": store_identity(store)},
        related=[{"prefect.resource.id": f"ram.version.{version.stage}.{version.id}",
                  "prefect.resource.role": "dataset-version",
                  "prefect.resource.name": f"{version.stage}@{version.id}"}],
        payload={"store": store_identity(store), "stage": version.stage, "version": version.id,
                 "new_samples": int(new_samples), "new_since": trained_on, "threshold": int(threshold),
                 "rows_out": m["rows_out"],
                 "rows_rejected": m["rows_rejected"], "parents": m["parents"]},
    )
    log.info("images@%s: %d new samples %s: emitted %s", version.id, new_samples,
             f"since {trained_on}" if trained_on else "(no model trained yet)", event)
    return sent


# --------------------------------------------------------------------------- deployments
def load_flow(target: str | Flow) -> Flow:
    """A flow object from `module:attribute` (or a flow, returned as is)."""
    if isinstance(target, Flow):
        return target
    module_name, _, attr = target.partition(":")
    if not attr:
        raise ValueError(f"flow target {target!r} must look like 'package.module:flow_name'")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load flow {target!r}: {exc}") from None
    if not isinstance(obj, Flow):
        raise ValueError(f"{target!r} is a {type(obj).__name__}, not a Prefect flow")
    return obj


def _check_cron(cron: str) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError:
        raise ConfigError(f"orchestration.schedule_cron: {cron!r} is not a valid cron expression "
                          "(five fields, e.g. '0 3 * * *')") from None


def retrain_trigger(cfg: EngineConfig, flow: Flow, *, event: str = EVENT_IMAGES_COMMITTED):
    """The trigger that starts the retrain deployment on `event` for this config's store."""
    from prefect.events import DeploymentEventTrigger

    store = Store(cfg.store.url, **cfg.store.storage_options)
    accepted = set(flow.parameters.properties)
    return DeploymentEventTrigger(
        name=f"retrain on {event}",
        expect={event},
        match={"prefect.resource.id": store_resource_id(store)},
        parameters={"cfg": cfg.model_dump(mode="json")}
        | {k: v for k, v in EVENT_PARAMETERS.items() if k in accepted},
    )


def build_deployments(cfg: EngineConfig, *, loop_flow: str | Flow = LOOP_FLOW, retrain_flow: str | Flow = RETRAIN_FLOW,
                      event: str = EVENT_IMAGES_COMMITTED, loop_name: str = LOOP_DEPLOYMENT,
                      retrain_name: str = RETRAIN_DEPLOYMENT) -> list:
    """The scheduled loop and the event-triggered retrain, each with the configured task runner and the
    whole config as its `cfg` parameter (served deployments run the in-memory flow objects)."""
    oc = cfg.orchestration
    _check_cron(oc.schedule_cron)
    params = {"cfg": cfg.model_dump(mode="json")}
    from prefect.schedules import Cron

    loop = with_task_runner(load_flow(loop_flow), cfg)
    retrain = with_task_runner(load_flow(retrain_flow), cfg)
    return [
        loop.to_deployment(name=loop_name, schedule=Cron(oc.schedule_cron, timezone=oc.timezone), parameters=params,
                           concurrency_limit=1, tags=["ram", "scheduled"],
                           description=f"The data-engine loop over {cfg.store.url}, on '{oc.schedule_cron}'."),
        retrain.to_deployment(name=retrain_name, parameters=params, triggers=[retrain_trigger(cfg, retrain, event=event)],
                              concurrency_limit=1, tags=["ram", "retrain"],
                              description=f"Retrain when {event} arrives for {cfg.store.url} and at least "
                                          f"{oc.retrain_min_new_samples} samples are new since the last training."),
    ]


def serve(cfg: EngineConfig, *, loop_flow: str | Flow = LOOP_FLOW, retrain_flow: str | Flow = RETRAIN_FLOW,
          event: str = EVENT_IMAGES_COMMITTED, **serve_kwargs: Any) -> None:
    """Register both deployments and serve them until interrupted (`serve_kwargs` go to `prefect.serve`,
    e.g. `limit`, `print_starting_message`)."""
    from prefect import serve as prefect_serve

    prefect_serve(*build_deployments(cfg, loop_flow=loop_flow, retrain_flow=retrain_flow, event=event),
                  **serve_kwargs)


def serve_command(cfg: EngineConfig) -> None:
    """`ram-engine serve`: serve the deployments against PREFECT_API_URL (a Prefect server must be
    running: without one, the deployments would live in a temporary server that dies with us)."""
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise ConfigError("ram-engine serve needs a Prefect server: set PREFECT_API_URL "
                          "(e.g. http://127.0.0.1:4200/api after `prefect server start`)")
    log.info("serving %s (cron %s) and %s (on %s) for store %s", LOOP_DEPLOYMENT, cfg.orchestration.schedule_cron,
             RETRAIN_DEPLOYMENT, EVENT_IMAGES_COMMITTED, cfg.store.url)
    serve(cfg)
