"""The data plane: datasets from their sources to S3 shards to episodes, and training checkpoints on storage.

Data flows through the modules in this order::

    sources   (digits, npz, image folders, torchvision, procedural) -> ArrayDataset
    ingest    ArrayDataset -> WebDataset shards + a catalog entry     (s3: S3 or a local directory)
    catalog   datasets, splits, shards, sha256: one entry object per dataset + an index (catalog.json);
              catalog_store writes entries safely while other ingests run
    suites    declarative source suites: many derived datasets (class subsets, transforms) from a few bases
    streams   shards -> Sample streams, split over ranks and DataLoader workers
    episodes  Sample streams -> meta-training Episodes (+ a background Prefetcher)

``checkpoints`` holds the layout of training run checkpoints on the same storage (written by
:mod:`pipeline.training`, read back by :mod:`pipeline.registry` and the benchmark). The S3
operations stay behind the ``s3`` module (``s3.get_bytes``, ``s3.list_urls``, ...).
"""

from pipeline.data import s3
from pipeline.data.catalog import (
    CATALOG_FILENAME,
    SCHEMA_VERSION,
    Catalog,
    CatalogEntry,
    ShardInfo,
    SplitInfo,
    catalog_url_for,
    entries_prefix,
    entry_url,
    validate_name,
    validate_shard_url,
)
from pipeline.data.catalog_store import compact, delete_entry, load_entry, put_entry
from pipeline.data.checkpoints import (
    BACKBONE_CONFIG_FILE,
    BACKBONE_WEIGHTS_FILE,
    CHECKPOINT_PREFIX,
    OPTIMIZER_FILE,
    PRUNER_CONFIG_FILE,
    STATE_FILE,
    checkpoint_to_local,
    download_prefix,
    latest_run_checkpoint,
    load_backbone_dir,
    load_pretrained_backbone,
    read_checkpoint_state,
    save_backbone,
    storage_filesystem,
    write_json_atomic,
    write_meta_checkpoint,
)
from pipeline.data.episodes import (
    WEIGHTINGS,
    DatasetShare,
    EpisodeCounts,
    EpisodeSampler,
    Prefetcher,
    assign_datasets,
    dataset_weights,
)
from pipeline.data.ingest import (
    DEFAULT_SHARD_SIZE,
    SHARD_NAME_RE,
    ShardHook,
    encode_png,
    ingest_dataset,
    ingest_source,
    remove_dataset,
    shard_name,
    write_shard,
)
from pipeline.data.s3 import ObjectNotFoundError, StorageError, absolute_location
from pipeline.data.sources import (
    GLYPH_CLASSES,
    IMAGE_EXTENSIONS,
    PROCEDURAL_DATASETS,
    SHAPE_NAMES,
    TEXTURE_NAMES,
    ArrayDataset,
    ProceduralBuilder,
    build_procedural,
    import_torchvision_datasets,
    load_digits_dataset,
    load_image_folder,
    load_npz,
    load_source,
    load_torchvision,
    select_classes,
)
from pipeline.data.suite_ingest import SuiteIngestError, SuiteReport, ingest_suite
from pipeline.data.suites import (
    HELD_OUT_TARGETS,
    DatasetSpec,
    HeldOutTargetError,
    Suite,
    SuiteError,
    build_dataset,
    check_held_out,
    load_suite,
)
from pipeline.data.transforms import TRANSFORMS, TRANSFORMS_VERSION, TransformParamError, apply_transform
from pipeline.data.streams import (
    STAT_KEYS,
    DataQualityError,
    ConnectionGauge,
    Sample,
    SampleStream,
    ShardAssignment,
    assign_shards,
    dataloader_worker,
    iter_samples,
    load_split_arrays,
    new_stats,
)

__all__ = [
    "s3", "ObjectNotFoundError", "absolute_location", "StorageError",
    "CATALOG_FILENAME", "SCHEMA_VERSION", "Catalog", "CatalogEntry", "ShardInfo", "SplitInfo", "catalog_url_for", "validate_name",
    "validate_shard_url", "entries_prefix", "entry_url", "compact", "delete_entry", "load_entry", "put_entry",
    "BACKBONE_CONFIG_FILE", "BACKBONE_WEIGHTS_FILE", "CHECKPOINT_PREFIX", "OPTIMIZER_FILE", "PRUNER_CONFIG_FILE",
    "STATE_FILE", "checkpoint_to_local", "download_prefix", "latest_run_checkpoint", "load_backbone_dir",
    "load_pretrained_backbone", "read_checkpoint_state", "save_backbone", "storage_filesystem", "write_json_atomic",
    "write_meta_checkpoint",
    "EpisodeSampler", "Prefetcher", "WEIGHTINGS", "dataset_weights", "DatasetShare", "EpisodeCounts",
    "assign_datasets",
    "DEFAULT_SHARD_SIZE", "SHARD_NAME_RE", "ShardHook", "encode_png", "ingest_dataset", "ingest_source", "remove_dataset", "shard_name", "write_shard",
    "GLYPH_CLASSES", "IMAGE_EXTENSIONS", "PROCEDURAL_DATASETS", "SHAPE_NAMES", "TEXTURE_NAMES", "ArrayDataset",
    "ProceduralBuilder", "build_procedural", "import_torchvision_datasets", "load_digits_dataset",
    "load_image_folder", "load_npz", "load_source", "load_torchvision", "select_classes",
    "SuiteIngestError", "SuiteReport", "ingest_suite", "HELD_OUT_TARGETS", "DatasetSpec", "HeldOutTargetError", "Suite",
    "SuiteError", "build_dataset", "check_held_out", "load_suite", "TRANSFORMS", "TRANSFORMS_VERSION",
    "TransformParamError", "apply_transform",
    "STAT_KEYS", "DataQualityError", "Sample", "SampleStream", "ShardAssignment", "assign_shards",
    "dataloader_worker", "iter_samples", "load_split_arrays", "new_stats",
]
