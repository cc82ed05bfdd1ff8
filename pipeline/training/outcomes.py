"""The outcome table: how candidate masks do after the real fine-tune, on many source tasks, filled by Ray tasks.

Each *task* of the plan is a class subset of one source dataset with its own training and dev images (both
from the dataset's training split, or from its test split for datasets the backbone was pretrained on:
``tasks.unseen_split_for``). One Ray task per task probes
the sample once (:func:`stamp_core.candidates.probe_task`: the features a pruner sees at prune time), then
prunes the backbone with every candidate at every budget, fine-tunes it as ``stamp prune`` does and scores it
on the dev images. It writes one JSON *part* per task under ``<storage_path>/<run_name>/parts/``; a re-run
skips tasks whose part holds every row the config asks for and fine-tunes only the missing rows of the others
(a config with more candidates, budgets or seeds), so the table grows across runs and survives a lost driver. At the end the
driver joins the parts into ``table.jsonl`` beside them and logs counts (and the table) to MLflow.

Read the table back with :func:`load_outcome_table`.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config import ConfigError, resolved_catalog_url, resolved_storage_path, resolved_tracking_uri
from pipeline.config.outcomes import OutcomesConfig
from pipeline.data import Catalog, load_split_arrays, storage_filesystem
from pipeline.registry.backbones import load_backbone
from pipeline.registry.loading import pin_model_uri
from pipeline.training.driver import load_catalog, resolve_sources, s3_endpoint
from stamp_core import TrainConfig, analyze_structure, build_backbone_from_config, prepare_images, prune_and_finetune, task_classes, torch_threads
from stamp_core import __version__ as stamp_version
from stamp_core.candidates import build_candidate, kept_fractions, probe_task
from stamp_core.groups import score_l1

log = logging.getLogger(__name__)

PARTS_DIR = "parts"
TABLE_FILE = "table.jsonl"


@dataclass(frozen=True)
class OutcomeTask:
    """One class subset of one source dataset (``classes``: the dataset's label ids, sorted)."""

    task_id: str
    dataset: str
    classes: tuple[int, ...]
    seed: int


@dataclass
class OutcomesResult:
    location: str  #: where the parts and the table are
    planned: int  #: tasks in the plan
    recorded: int  #: tasks with a part after this run
    new: int  #: tasks recorded or grown (rows added for new candidates, budgets or seeds) by this run
    failed: dict[str, str]  #: task id -> error, for tasks that failed in this run
    rows: int  #: (task, budget, candidate, seed) rows in the table
    seconds: float
    mlflow_run_id: str | None = None


# =============================================================================== the plan


def task_family(dataset: str) -> str:
    """A source dataset's family, the base it was cut from: ``tin-c1-2-gray`` -> ``tin``; ``mnist-c0-1-inv`` -> ``mnist``."""
    return dataset.split("-")[0]


def plan_tasks(cfg: OutcomesConfig, catalog: Catalog, sources: list[str]) -> list[OutcomeTask]:
    """The tasks of the config in a fixed order: each draw takes the source families in turn (one task of
    each, then the next round), so a partial table covers every family evenly however many datasets each
    holds; the same config and catalog always give the same plan."""
    lo, hi = cfg.tasks.ways
    plan: list[OutcomeTask] = []
    for draw in range(cfg.tasks.draws_per_source):
        by_family: dict[str, list[OutcomeTask]] = {}
        for name in sources:
            n = catalog.get(name).num_classes
            if n < 2:
                continue
            rng = np.random.default_rng([cfg.seed, zlib.crc32(name.encode()), draw])
            ways = int(rng.integers(min(lo, n), min(hi, n) + 1))
            classes = tuple(sorted(int(c) for c in rng.choice(n, ways, replace=False)))
            task = OutcomeTask(f"{name}~{draw}", name, classes, int(rng.integers(2**31)))
            by_family.setdefault(task_family(name), []).append(task)
        order = np.random.default_rng([cfg.seed, draw])
        queues = [[tasks[i] for i in order.permutation(len(tasks))]
                  for _, tasks in sorted(by_family.items())]
        queues = [queues[i] for i in order.permutation(len(queues))]
        for turn in range(max((len(q) for q in queues), default=0)):
            plan.extend(q[turn] for q in queues if turn < len(q))
    return plan


# =============================================================================== one task (a Ray task)


def task_split(cfg: OutcomesConfig, dataset: str) -> str:
    """The split a task's images come from: ``test`` for datasets the backbone was pretrained on, else ``train``."""
    return "test" if any(fnmatch.fnmatchcase(dataset, p) for p in cfg.tasks.unseen_split_for) else "train"


def _task_arrays(cfg: OutcomesConfig, task: OutcomeTask, catalog_url: str, endpoint: str | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_dev, y_dev, sample_index)`` of the task, labels 0..K-1, images prepared."""
    x, y = load_split_arrays(catalog_url, task.dataset, task_split(cfg, task.dataset), endpoint_url=endpoint)
    rng = np.random.default_rng(task.seed)
    train, dev = [], []
    for new, c in enumerate(task.classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        if len(idx) < 3:
            raise ValueError(f"{task.dataset}: class {c} has {len(idx)} training images; a task needs at least 3")
        n_dev = min(cfg.tasks.dev_per_class, len(idx) // 3)
        dev.append(idx[:n_dev])
        train.append(idx[n_dev:n_dev + cfg.tasks.train_per_class])
    remap = {c: i for i, c in enumerate(task.classes)}
    size = cfg.data.image_size

    def arrays(parts: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        index = np.concatenate(parts)
        return prepare_images(x[index], size), torch.as_tensor([remap[int(v)] for v in y[index]], dtype=torch.long)

    x_train, y_train = arrays(train)
    x_dev, y_dev = arrays(dev)
    sample = torch.cat([torch.nonzero(y_train == k).flatten()[:cfg.tasks.sample_per_class] for k in range(len(task.classes))])
    return x_train, y_train, x_dev, y_dev, sample


def row_key(row: dict[str, Any]) -> tuple[float, str, int]:
    """A table row's identity within its task: (budget, candidate, fine-tune seed)."""
    return float(row["r"]), str(row["candidate"]), int(row["seed"])


def wanted_keys(cfg: OutcomesConfig) -> set[tuple[float, str, int]]:
    """The rows the config asks of every task."""
    return {(float(r), name, int(seed)) for r in cfg.budgets for name in cfg.candidates for seed in cfg.seeds}


def score_task(cfg: OutcomesConfig, task: OutcomeTask, backbone: dict[str, Any], catalog_url: str,
               endpoint: str | None, existing: dict[str, Any] | None = None) -> dict[str, Any]:
    """The task's record: its features and one row per (budget, candidate, seed).

    ``existing``: the task's record from an earlier run (e.g. with fewer candidates); its rows are kept and only
    the missing ones are fine-tuned, so adding candidates to the config grows every recorded task. Runs with one
    intra-op thread per reserved CPU and restores the caller's thread count.
    """
    with torch_threads(max(1, int(cfg.scaling.cpus_per_worker))):
        return _score_task(cfg, task, backbone, catalog_url, endpoint, existing)


def _score_task(cfg: OutcomesConfig, task: OutcomeTask, backbone: dict[str, Any], catalog_url: str,
                endpoint: str | None, existing: dict[str, Any] | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    net = build_backbone_from_config(backbone["config"])
    net.load_state_dict(backbone["state"])
    structure = analyze_structure(net, (net.in_channels, cfg.data.image_size, cfg.data.image_size))
    x, y, x_dev, y_dev, sample = _task_arrays(cfg, task, catalog_url, endpoint)
    probe = probe_task(net, structure, x[sample], y[sample], score_l1(net, structure))
    rows = list(existing["rows"]) if existing else []
    done = {row_key(row) for row in rows}
    for r in cfg.budgets:
        for name in cfg.candidates:
            if all((float(r), name, int(seed)) in done for seed in cfg.seeds):
                continue
            spec = build_candidate(name, probe, structure, net.config, r, num_classes=task_classes(y))
            for seed in cfg.seeds:
                if (float(r), name, int(seed)) in done:
                    continue
                ft = TrainConfig(epochs=cfg.finetune.epochs, batch_size=cfg.finetune.batch_size, lr=cfg.finetune.lr, seed=seed)
                result = prune_and_finetune(net, spec, x, y, x_dev, y_dev, ft)
                rows.append({"r": r, "candidate": name, "seed": seed, "accuracy": round(float(result.accuracy), 5),
                             "macs_ratio": round(spec.macs_pruned / spec.macs_full, 5),
                             "kept_fractions": [round(f, 4) for f in kept_fractions(spec, structure)]})
    if existing and existing.get("backbone") != backbone["source"]:
        raise ValueError(f"task {task.task_id}: its recorded rows are on {existing.get('backbone')}, this run's "
                         f"backbone is {backbone['source']}: outcomes of two backbones cannot share a table "
                         f"(use another run_name)")
    seconds = time.perf_counter() - t0 + (float(existing.get("seconds", 0.0)) if existing else 0.0)
    return {"task_id": task.task_id, "dataset": task.dataset, "split": task_split(cfg, task.dataset),
            "classes": list(task.classes), "ways": len(task.classes),
            "train_images": len(y), "dev_images": len(y_dev), "features": probe.features, "rows": rows,
            "backbone": backbone["source"], "stamp_version": stamp_version, "seconds": round(seconds, 1)}


def _score_and_write(cfg_json: dict[str, Any], task: dict[str, Any], backbone: dict[str, Any], catalog_url: str,
                     endpoint: str | None, location: str, existing: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ray task body: score one task (the missing rows of its part, if it has one) and write its part; a part is
    replaced only by a record holding all of its rows and more."""
    cfg = OutcomesConfig.model_validate(cfg_json)
    t0 = time.perf_counter()
    record = score_task(cfg, OutcomeTask(**{**task, "classes": tuple(task["classes"])}), backbone, catalog_url, endpoint,
                        existing)
    _write_text(location, f"{PARTS_DIR}/{_part_name(record['task_id'])}", json.dumps(record))
    added = len(record["rows"]) - (len(existing["rows"]) if existing else 0)
    return {"task_id": record["task_id"], "rows": added, "seconds": time.perf_counter() - t0}


# =============================================================================== storage


def _part_name(task_id: str) -> str:
    return task_id.replace("/", "_") + ".json"


def _fs(location: str) -> tuple[Any, str]:
    import pyarrow.fs

    path, fs = storage_filesystem(location)
    return (fs or pyarrow.fs.LocalFileSystem()), path.rstrip("/")


def _write_text(location: str, relative: str, text: str) -> None:
    fs, root = _fs(location)
    target = f"{root}/{relative}"
    fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
    tmp = f"{target}.tmp"  # S3 puts are atomic; the rename keeps a local part whole too
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode())
    fs.move(tmp, target)


def _recorded_parts(location: str) -> dict[str, str]:
    """Part file name -> path of every finished part under ``location``."""
    import pyarrow.fs

    fs, root = _fs(location)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{root}/{PARTS_DIR}", allow_not_found=True))
    except FileNotFoundError:
        return {}
    return {i.base_name: i.path for i in infos if i.type == pyarrow.fs.FileType.File and i.base_name.endswith(".json")}


def iter_outcome_records(location: str) -> Iterator[dict[str, Any]]:
    """Every task record under ``location`` (``<storage_path>/<run_name>``), parts in name order."""
    fs, _ = _fs(location)
    for _, path in sorted(_recorded_parts(location).items()):
        with fs.open_input_stream(path) as f:
            yield json.loads(f.read().decode())


def load_outcome_table(location: str) -> list[dict[str, Any]]:
    """The task records of a table: a run location (its parts) or a ``table.jsonl`` file / URL."""
    if location.endswith(".jsonl"):
        fs, path = _fs(location.rsplit("/", 1)[0])
        with fs.open_input_stream(f"{path}/{location.rsplit('/', 1)[1]}") as f:
            return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
    return list(iter_outcome_records(location))


# =============================================================================== the driver


def prepare_outcomes(cfg: OutcomesConfig) -> tuple[OutcomesConfig, Catalog, list[str], str]:
    """Resolve locations and sources and pin the backbone, before Ray starts anything."""
    catalog_url = resolved_catalog_url(cfg.data)
    catalog = load_catalog(catalog_url, s3_endpoint())
    sources = resolve_sources(cfg.data.sources, catalog)
    cfg.data.catalog_url = catalog_url
    cfg.storage_path = resolved_storage_path(cfg.storage_path)
    if cfg.pretrained.startswith("models:/"):
        cfg.pretrained, _ = pin_model_uri(cfg.pretrained, resolved_tracking_uri(cfg.mlflow))
    too_small = [n for n in sources if catalog.get(n).num_classes < 2]
    if len(too_small) == len(sources):
        raise ConfigError(f"data.sources: no dataset has two classes ({', '.join(too_small)})")
    return cfg, catalog, sources, f"{cfg.storage_path.rstrip('/')}/{cfg.run_name}"


def run_outcomes(cfg: OutcomesConfig) -> OutcomesResult:
    """Fill the table: one Ray task per unrecorded task of the plan, ``scaling.num_workers`` at a time."""
    import ray

    t0 = time.perf_counter()
    cfg, catalog, sources, location = prepare_outcomes(cfg)
    net = load_backbone(cfg.pretrained, tracking_uri=resolved_tracking_uri(cfg.mlflow))
    backbone = ray.put({"config": dict(net.config), "state": net.state_dict(), "source": cfg.pretrained})
    plan = plan_tasks(cfg, catalog, sources)
    wanted = wanted_keys(cfg)
    recorded = {r["task_id"]: r for r in iter_outcome_records(location)}  # read once: partial parts go to their task
    rows_of = {task_id: {row_key(row) for row in r["rows"]} for task_id, r in recorded.items()}
    partial = [t for t in plan if t.task_id in rows_of and not wanted <= rows_of[t.task_id]]
    recorded_before = sum(1 for t in plan if t.task_id in rows_of)
    fresh = [t for t in plan if t.task_id not in rows_of]
    if cfg.max_tasks is not None:
        fresh = fresh[:max(0, cfg.max_tasks - recorded_before)]
    todo = partial + fresh  # recorded tasks first: the table stays rectangular as it grows in candidates
    print(f"[stamp outcomes {cfg.run_name}] {len(plan)} tasks planned, {recorded_before} recorded "
          f"({len(partial)} missing some of this config's rows), {len(fresh)} new to do, {len(wanted)} fine-tunes "
          f"each; parts in {location}/{PARTS_DIR}", flush=True)
    remote = ray.remote(num_cpus=cfg.scaling.cpus_per_worker, max_retries=cfg.max_failures)(_score_and_write)
    cfg_json = cfg.model_dump(mode="json")
    endpoint = s3_endpoint()
    pending: dict[Any, str] = {}
    queue = list(todo)
    failed: dict[str, str] = {}
    new = 0
    while queue or pending:
        while queue and len(pending) < cfg.scaling.num_workers:
            task = queue.pop(0)
            ref = remote.remote(cfg_json, asdict(task), backbone, cfg.data.catalog_url, endpoint, location,
                                recorded.get(task.task_id))
            pending[ref] = task.task_id
        ready, _ = ray.wait(list(pending), num_returns=1)
        task_id = pending.pop(ready[0])
        try:
            info = ray.get(ready[0])
        except Exception as exc:  # noqa: BLE001 - one bad task must not lose the others' results
            failed[task_id] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning("outcome task %s failed: %s", task_id, failed[task_id])
            continue
        new += 1
        print(f"[stamp outcomes {cfg.run_name}] {new}/{len(todo)} {task_id}: "
              f"{info['rows']} rows added in {info['seconds']:.0f} s", flush=True)
    records = list(iter_outcome_records(location))
    _write_text(location, TABLE_FILE, "".join(json.dumps(r) + "\n" for r in records))
    result = OutcomesResult(location=location, planned=len(plan), recorded=len(records), new=new, failed=failed,
                            rows=sum(len(r["rows"]) for r in records), seconds=round(time.perf_counter() - t0, 1))
    result.mlflow_run_id = _log_to_mlflow(cfg, result, records)
    return result


def _log_to_mlflow(cfg: OutcomesConfig, result: OutcomesResult, records: list[dict[str, Any]]) -> str | None:
    """One MLflow run per invocation: the config, the counts and the joined table."""
    if not cfg.mlflow.enabled:
        return None
    import mlflow

    from pipeline.registry import check_tracking_uri

    uri = resolved_tracking_uri(cfg.mlflow)
    check_tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.mlflow.experiment)
    with mlflow.start_run(run_name=cfg.run_name, tags={"stamp.kind": "outcomes", "stamp.location": result.location}) as run:
        mlflow.log_params({k: v[:6000] for k, v in cfg.flat_params().items()})
        mlflow.log_metrics({"tasks_recorded": result.recorded, "tasks_new": result.new, "tasks_failed": len(result.failed),
                            "rows": result.rows, "seconds": result.seconds})
        mlflow.log_text("".join(json.dumps(r) + "\n" for r in records), TABLE_FILE)
        return run.info.run_id
