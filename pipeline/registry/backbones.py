"""Reference backbones: a folder of state_dicts with a manifest, and their MLflow registration.

A pretrained backbone is the start of everything else (meta-training, the benchmark's baselines,
downstream pruning), and pretraining it costs an hour or more of CPU. So the reference backbones live
in the repository (``backbones/``: ``<name>.json`` architecture + ``<name>.pt`` state_dict, a few MB
each) with ``manifest.json`` recording for each its sha256 digests, the exact command that trained
it, the commit, the recipe, the data (name and content hash) and the validation curve. A new machine
registers them from there instead of retraining:

* :func:`add_backbone` copies a pretrain run's last checkpoint into the folder and writes its entry;
* :func:`register_backbones` logs each as run artifacts and a registered model version
  ``stamp-backbone-<name>`` (alias ``champion``), with the lineage as version tags;
* :func:`load_backbone` resolves ``models:/NAME@ALIAS`` (or ``/VERSION``), a ``backbones/`` entry
  name, or a pretrain run / checkpoint / pruner directory, and checks every digest it knows.

Nothing is pickled: the architecture is JSON and the weights load with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import PretrainConfig, load_config, resolved_catalog_url
from pipeline.data import load_backbone_dir, load_pretrained_backbone
from pipeline.data.checkpoints import BACKBONE_CONFIG_FILE, BACKBONE_WEIGHTS_FILE, CHECKPOINT_PREFIX, STATE_FILE
from pipeline.registry.connection import RegistryError, _client, _wrapped, use_tracking_uri
from pipeline.registry.register import ensure_experiment
from pipeline.registry.versions import CHAMPION, set_alias
from stamp_core import Backbone

#: The repository's folder of reference backbones (relative to the repository root).
BACKBONES_DIR = Path(__file__).resolve().parents[2] / "backbones"
MANIFEST_FILE = "manifest.json"
MODEL_PREFIX = "stamp-backbone-"
#: Name of the backbone's files inside its registered model's run (``runs:/<id>/backbone``).
ARTIFACT_PATH = "backbone"
_MANIFEST_VERSION = 1


@dataclass
class BackboneEntry:
    """One reference backbone of the manifest."""

    name: str  #: ``resnet20-tinyimagenet32``: the files are ``<name>.json`` and ``<name>.pt``
    architecture: dict[str, Any]  #: the backbone's config (``stamp_core.build_backbone_from_config``)
    sha256: dict[str, str]  #: file name -> hex digest
    command: str  #: the exact command that trained it, from the repository root of a fresh clone
    commit: str  #: the commit that command ran at
    val_top1: float  #: top-1 on the validation split after the last epoch
    curve: list[float]  #: validation top-1 after every epoch
    epochs: int
    datasets: list[dict[str, str]]  #: ``{"name", "source", "content_sha256"}`` of every pretraining source
    recipe: dict[str, Any]  #: the validated pretrain config the command resolves to
    notes: str = ""
    files: dict[str, str] = field(default_factory=dict)  #: ``config`` / ``weights`` -> file name

    @property
    def model_name(self) -> str:
        return MODEL_PREFIX + self.name


class BackboneManifestError(RegistryError):
    """The backbones folder, its manifest or a file it names is missing or does not match."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: Path = BACKBONES_DIR) -> list[BackboneEntry]:
    """The manifest's entries; an empty list when the folder has no manifest yet."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text())
        return [BackboneEntry(**e) for e in raw["backbones"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise BackboneManifestError(f"{path} is not a backbone manifest: {exc}") from None


def _write_manifest(folder: Path, entries: list[BackboneEntry]) -> None:
    path = Path(folder) / MANIFEST_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    body = {"version": _MANIFEST_VERSION, "backbones": [asdict(e) for e in sorted(entries, key=lambda e: e.name)]}
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    tmp.replace(path)


def get_entry(name: str, folder: Path = BACKBONES_DIR) -> BackboneEntry:
    entries = read_manifest(folder)
    for e in entries:
        if e.name == name:
            return e
    known = ", ".join(e.name for e in entries) or "none"
    raise BackboneManifestError(f"no backbone {name!r} in {Path(folder) / MANIFEST_FILE}; known: {known}")


def verify_entry(entry: BackboneEntry, folder: Path = BACKBONES_DIR) -> None:
    """Raise BackboneManifestError unless every file of ``entry`` exists with its recorded sha256."""
    for fname, digest in entry.sha256.items():
        path = Path(folder) / fname
        if not path.is_file():
            raise BackboneManifestError(f"backbone {entry.name!r}: {path} is missing")
        got = _sha256(path)
        if got != digest:
            raise BackboneManifestError(f"backbone {entry.name!r}: {path} has sha256 {got[:12]}..., "
                                        f"the manifest records {digest[:12]}...: the file changed or is corrupt")


def _last_checkpoint(source: Path) -> Path:
    if (source / BACKBONE_CONFIG_FILE).is_file():
        return source
    found = sorted(p for p in source.glob(f"{CHECKPOINT_PREFIX}*") if (p / BACKBONE_CONFIG_FILE).is_file())
    if not found:
        raise BackboneManifestError(f"{source} is neither a pretrain checkpoint ({BACKBONE_CONFIG_FILE}) "
                                    f"nor a run directory with {CHECKPOINT_PREFIX}* checkpoints")
    return found[-1]


def _git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _recipe_of(command: str) -> PretrainConfig:
    """The pretrain config that ``python jobs/pretrain.py --config PATH k=v ...`` resolves to."""
    import shlex

    words = shlex.split(command)
    if "--config" not in words or words.index("--config") + 1 >= len(words):
        raise BackboneManifestError(f"command {command!r}: expected `python jobs/pretrain.py --config PATH [key=value ...]`")
    k = words.index("--config")
    cfg = load_config(words[k + 1], [w for w in words[k + 2:] if "=" in w and not w.startswith("-")])
    if not isinstance(cfg, PretrainConfig):
        raise BackboneManifestError(f"command {command!r}: {words[k + 1]} is a {cfg.kind} config, not a pretrain config")
    return cfg


def _dataset_lineage(cfg: PretrainConfig) -> list[dict[str, str]]:
    """Name, source spec and content hash (sha256 over its shards' hashes and counts) of each source."""
    from pipeline.data import Catalog

    catalog = Catalog.load(resolved_catalog_url(cfg.data))
    names = catalog.names() if cfg.data.sources == "all" else list(cfg.data.sources)
    out = []
    for n in names:
        entry = catalog.get(n)
        digest = hashlib.sha256(json.dumps(entry.content_dict(), sort_keys=True).encode()).hexdigest()
        out.append({"name": n, "source": entry.source, "content_sha256": digest})
    return out


def add_backbone(source: str | Path, name: str, command: str, folder: Path = BACKBONES_DIR,
                 notes: str = "") -> BackboneEntry:
    """Copy the backbone of a pretrain run (its last checkpoint) into ``folder`` and record it.

    ``command`` is the exact pretrain command that produced ``source``; its config gives the recipe
    and the datasets whose content hashes are recorded. Replaces an entry of the same name.
    """
    ckpt = _last_checkpoint(Path(source))
    recipe = _recipe_of(command)
    state = json.loads((ckpt / STATE_FILE).read_text()) if (ckpt / STATE_FILE).is_file() else {}
    curve = [float(a) for a in state.get("test_accuracy_history", [])]
    if not curve:
        raise BackboneManifestError(f"{ckpt}: its {STATE_FILE} has no test_accuracy_history: run pretraining with eval_samples > 0")
    backbone = load_backbone_dir(ckpt)  # fails here, before anything is copied, if the files do not load
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"config": f"{name}.json", "weights": f"{name}.pt"}
    shutil.copy2(ckpt / BACKBONE_CONFIG_FILE, folder / files["config"])
    shutil.copy2(ckpt / BACKBONE_WEIGHTS_FILE, folder / files["weights"])
    entry = BackboneEntry(
        name=name, architecture=dict(backbone.config), sha256={f: _sha256(folder / f) for f in files.values()},
        command=command, commit=_git_commit(folder), val_top1=curve[-1], curve=curve, epochs=int(state.get("epoch", len(curve))),
        datasets=_dataset_lineage(recipe), recipe=recipe.model_dump(mode="json"), notes=notes, files=files)
    _write_manifest(folder, [e for e in read_manifest(folder) if e.name != name] + [entry])
    return entry


def _load_entry_dir(directory: Path, files: dict[str, str]) -> Backbone:
    with tempfile.TemporaryDirectory(prefix="stamp-backbone-") as tmp:
        staged = Path(tmp)
        shutil.copy2(directory / files["config"], staged / BACKBONE_CONFIG_FILE)
        shutil.copy2(directory / files["weights"], staged / BACKBONE_WEIGHTS_FILE)
        return load_backbone_dir(staged)


def load_reference_backbone(name: str, folder: Path = BACKBONES_DIR) -> Backbone:
    """A backbone of the repository's folder by name, its digests checked."""
    entry = get_entry(name, folder)
    verify_entry(entry, folder)
    return _load_entry_dir(Path(folder), entry.files)


def register_backbones(names: list[str] | None = None, folder: Path = BACKBONES_DIR, alias: str | None = CHAMPION,
                       tracking_uri: str | None = None, experiment: str = "stamp-backbones") -> list[str]:
    """Register every backbone of the folder (or ``names``) as a new version of ``stamp-backbone-<name>``.

    Each version's run holds the two files and the manifest entry (``runs:/<id>/backbone``); its tags
    carry the lineage (``lineage.*``: datasets and content hashes, command, commit, recipe) and the
    validation top-1 (``metric.val_top1``). Returns the pinned ``models:/NAME/VERSION`` URIs.
    """
    import mlflow

    entries = read_manifest(folder)
    if not entries:
        raise BackboneManifestError(f"{Path(folder) / MANIFEST_FILE} lists no backbones: add one with `stamp backbones add`")
    chosen = entries if names is None else [get_entry(n, folder) for n in names]
    client, uri = _client(tracking_uri)
    experiment_id = ensure_experiment(experiment, tracking_uri=uri)
    out = []
    for entry in chosen:
        verify_entry(entry, folder)
        tags = {"stamp.kind": "backbone", "stamp.backbone": str(entry.architecture.get("name")),
                "lineage.datasets": ",".join(d["name"] for d in entry.datasets),
                "lineage.dataset_sha256": ",".join(d["content_sha256"] for d in entry.datasets),
                "lineage.command": entry.command[:4000], "lineage.commit": entry.commit,
                "lineage.recipe_sha256": hashlib.sha256(json.dumps(entry.recipe, sort_keys=True).encode()).hexdigest(),
                "lineage.weights_sha256": entry.sha256[entry.files["weights"]],
                "metric.val_top1": f"{entry.val_top1:.6f}", "metric.epochs": str(entry.epochs)}
        with (use_tracking_uri(uri), tempfile.TemporaryDirectory(prefix="stamp-reg-backbone-") as tmp,
              _wrapped(f"registering backbone {entry.name!r}")):
            staged = Path(tmp) / ARTIFACT_PATH
            staged.mkdir()
            for f in entry.files.values():
                shutil.copy2(Path(folder) / f, staged / f)
            (staged / MANIFEST_FILE).write_text(json.dumps(asdict(entry), indent=2) + "\n")
            with mlflow.start_run(experiment_id=experiment_id, run_name=f"backbone-{entry.name}") as run:
                mlflow.log_params({"backbone": tags["stamp.backbone"], "epochs": entry.epochs,
                                   "datasets": tags["lineage.datasets"][:500]})
                mlflow.log_metric("val_top1", entry.val_top1)
                for epoch, acc in enumerate(entry.curve, start=1):
                    mlflow.log_metric("val_top1_curve", acc, step=epoch)
                mlflow.set_tags(tags)
                mlflow.log_artifacts(str(staged), artifact_path=ARTIFACT_PATH)
            if not client.search_registered_models(filter_string=f"name = '{entry.model_name}'"):
                client.create_registered_model(entry.model_name, description=f"STAMP reference backbone {entry.name}")
            mv = client.create_model_version(entry.model_name, source=f"runs:/{run.info.run_id}/{ARTIFACT_PATH}",
                                             run_id=run.info.run_id, tags=tags, description=entry.notes or None)
        if alias:
            set_alias(entry.model_name, alias, mv.version, tracking_uri=uri)
        out.append(f"models:/{entry.model_name}/{mv.version}")
    return out


def load_registered_backbone(uri: str, tracking_uri: str | None = None) -> Backbone:
    """A backbone registered by :func:`register_backbones` (``models:/NAME@ALIAS`` or ``/VERSION``),
    its files checked against the manifest entry registered with it."""
    import mlflow

    from pipeline.registry.loading import pin_model_uri

    pinned, _ = pin_model_uri(uri, tracking_uri)
    client, turi = _client(tracking_uri)
    with (tempfile.TemporaryDirectory(prefix="stamp-backbone-dl-") as tmp, use_tracking_uri(turi),
          _wrapped(f"downloading backbone {uri}")):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=tmp, tracking_uri=turi,
                                                         registry_uri=turi))
        if not (local / MANIFEST_FILE).is_file():
            raise RegistryError(f"{uri} is not a STAMP backbone: its artifacts have no {MANIFEST_FILE}")
        entry = BackboneEntry(**json.loads((local / MANIFEST_FILE).read_text()))
        verify_entry(entry, local)
        return _load_entry_dir(local, entry.files)


def load_backbone(source: str, tracking_uri: str | None = None) -> Backbone:
    """Any backbone reference: ``models:/...``, a name in ``backbones/manifest.json``, or a pretrain
    run / checkpoint / pruner directory (local or ``s3://``)."""
    if source.startswith("models:/"):
        return load_registered_backbone(source, tracking_uri)
    if "/" not in source and any(e.name == source for e in read_manifest()):
        return load_reference_backbone(source)
    return load_pretrained_backbone(source)
