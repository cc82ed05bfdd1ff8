"""The pyfunc model (pipeline/registry/pyfunc_model.py) logged to the embedded store: sqlite + local artifacts.

The same registry code as against a server (see test_registry.py); here the whole round trip runs
without any service, which is the no-cluster default of `stamp`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

from pipeline.registry import RegisteredPruner, ensure_experiment, load_pruner, log_pruner, set_alias, use_tracking_uri
from stamp_core import PruneSpec, StampPruner, build_backbone_from_config, count_macs_params

NAME = "stamp-pruner"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("embedded-mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    torch.manual_seed(0)
    pruner = StampPruner.create(
        "small_cnn", num_classes=4, image_size=32, backbone_kwargs={"width": 8},
        embed_dim=32, hidden_dim=32, num_inducing=8,
    )
    reg = log_pruner(pruner, name=NAME, experiment="stamp-tests", tracking_uri=uri, metrics={"meta_val_accuracy": 0.5})
    set_alias(NAME, "champion", reg.version, tracking_uri=uri)
    # log_pruner switched MLflow to the sqlite store only for its own duration.
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before
    import mlflow

    with use_tracking_uri(uri):
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    yield {"root": root, "uri": uri, "pruner": pruner, "reg": reg, "model": model}


def images(n: int = 16, size: int = 28, channels: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def real_macs_ratio(spec: PruneSpec) -> float:
    pruned = spec.apply(build_backbone_from_config(spec.backbone))
    full = build_backbone_from_config(spec.backbone)
    return count_macs_params(pruned, spec.input_shape)[0] / count_macs_params(full, spec.input_shape)[0]


def test_artifacts_live_next_to_the_database(store: dict[str, Any]) -> None:
    reg: RegisteredPruner = store["reg"]
    model_id = reg.model_uri.removeprefix("models:/")
    found = [p for p in (store["root"] / "mlflow-artifacts").rglob("pruner_state_dict.pt") if model_id in p.parts]
    assert len(found) == 1
    model_dir = found[0].parents[2]  # <model>/artifacts/pruner/pruner_state_dict.pt
    assert (model_dir / "MLmodel").is_file() and (model_dir / "pyfunc_model.py").is_file()
    assert not list(model_dir.rglob("*.pkl"))  # models-from-code: nothing pickled
    original = store["pruner"].state_dict()
    for source in (f"models:/{NAME}@champion", model_dir, found[0].parent):
        loaded = load_pruner(source, tracking_uri=store["uri"]).state_dict()
        assert loaded.keys() == original.keys()
        assert all(torch.equal(v, original[k]) for k, v in loaded.items())
    assert reg.version == "1"


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_predict_returns_a_spec_within_budget(store: dict[str, Any], ratio: float) -> None:
    out = store["model"].predict(images(), params={"macs_ratio": ratio})
    assert isinstance(out, list) and len(out) == 1
    spec = PruneSpec.from_json(out[0])
    assert spec.macs_ratio_target == ratio
    assert real_macs_ratio(spec) <= ratio
    assert spec.macs_ratio > ratio - 0.15  # calibrated close to the budget, not just under it
    # Deterministic: same images, same spec.
    assert store["model"].predict(images(), params={"macs_ratio": ratio}) == out


def test_labels_param_and_round_to(store: dict[str, Any]) -> None:
    x = images(24, size=32, channels=3)
    labels = [i % 4 for i in range(24)]
    spec = PruneSpec.from_json(store["model"].predict(x, params={"macs_ratio": 0.5, "labels": labels, "round_to": 4})[0])
    assert all(len(k) % 4 == 0 or len(k) == spec.group_sizes[g] for g, k in spec.kept.items())
    assert real_macs_ratio(spec) <= 0.5
    # In-process generate with the same labels gives the same spec as the registered model.
    from pipeline.registry import generate_spec

    assert generate_spec(store["pruner"], x, np.array(labels), 0.5, 4).kept == spec.kept


def _outcome_pruner() -> StampPruner:
    """An outcome pruner whose (zero) predictor ranks its candidates in the order given."""
    torch.manual_seed(0)
    return StampPruner.create("small_cnn", num_classes=4, image_size=32, backbone_kwargs={"width": 8},
                              generator="outcome", candidates=["separability_in_l1", "l1", "uniform"],
                              embed_dim=8, num_heads=1, num_inducing=1, hidden_dim=8).eval()


def test_a_many_class_upload_reaches_an_outcome_pruner_as_several_images_of_fewer_classes() -> None:
    """400 images of 60 classes would be 6 per class; class separability wants the pruner's 20 (here all 12) of a
    subset of the classes, and the task's class count in its features (the sample fix of stamp prune, served)."""
    from pipeline.registry import generate_spec, propose_specs
    from stamp_core import prepare_images
    from stamp_core.candidates import FEATURE_NAMES

    pruner = _outcome_pruner()
    n_classes, per = 60, 12
    x, y = images(n_classes * per, size=32, channels=3, seed=3), np.repeat(np.arange(n_classes), per)
    spec = generate_spec(pruner, x, y, 0.5)
    idx = pruner.select_support(torch.from_numpy(y), len(y), min_per_class=pruner.min_support_per_class)
    counts = np.bincount(y[idx.numpy()])
    assert len(idx) <= pruner.config.max_support and set(counts[counts > 0]) == {per}
    xs, ys = prepare_images(x[idx.numpy()], 32, channels=3), torch.from_numpy(y[idx.numpy()])
    with torch.no_grad():
        summary = pruner.summarize(xs, ys, num_classes=n_classes)
    assert float(summary.embedding.flatten()[FEATURE_NAMES.index("log_classes")]) == pytest.approx(np.log(n_classes), abs=1e-5)
    assert spec.kept == pruner.generate(xs, ys, macs_ratio=0.5, embedding=summary).kept
    assert spec.metadata["candidate"] == "separability_in_l1"
    few = pruner.select_support(torch.from_numpy(y), len(y)).numpy()  # what serving read before: 6 of every class
    assert set(np.bincount(y[few])) == {6}
    assert pruner.generate(prepare_images(x[few], 32, channels=3), y[few], macs_ratio=0.5).kept != spec.kept
    specs = propose_specs(pruner, x, y, 0.5, 3)
    assert [s.metadata["candidate"] for s in specs] == ["separability_in_l1", "l1", "uniform"]
    assert specs[0].kept == spec.kept


def test_a_served_outcome_pruner_returns_its_proposals_best_first(store: dict[str, Any]) -> None:
    """``proposals`` is in the signature: MLflow passes it on (a param the signature lacks is dropped)."""
    import mlflow

    from pipeline.registry import propose_specs

    pruner = _outcome_pruner()
    log_pruner(pruner, name="stamp-outcome-test", experiment="stamp-tests", tracking_uri=store["uri"])
    with use_tracking_uri(store["uri"]):
        model = mlflow.pyfunc.load_model("models:/stamp-outcome-test/1")
    x, labels = images(24, size=32, channels=3), [i % 4 for i in range(24)]
    out = model.predict(x, params={"macs_ratio": 0.4, "labels": labels, "proposals": 3})
    specs = [PruneSpec.from_json(o) for o in out]
    assert [s.metadata["candidate"] for s in specs] == ["separability_in_l1", "l1", "uniform"]
    assert [s.kept for s in specs] == [s.kept for s in propose_specs(pruner, x, np.array(labels), 0.4, 3)]
    assert all(real_macs_ratio(s) <= 0.4 for s in specs)
    one = model.predict(x, params={"macs_ratio": 0.4, "labels": labels})
    assert len(one) == 1 and PruneSpec.from_json(one[0]).kept == specs[0].kept


@pytest.mark.parametrize(
    "case, data, params, message",
    [
        ("empty batch", np.zeros((0, 32, 32, 3), np.uint8), {}, "the image set is empty"),
        ("ratio 0", images(), {"macs_ratio": 0.0}, "macs_ratio=0.0: expected a number in (0, 1]"),
        ("ratio 1.5", images(), {"macs_ratio": 1.5}, "macs_ratio=1.5: expected a number in (0, 1]"),
        ("ratio nan", images(), {"macs_ratio": float("nan")}, "expected a number in (0, 1]"),
        ("ratio unreachable", images(), {"macs_ratio": 1e-6}, "below the smallest reachable ratio"),
        ("round_to 0", images(), {"round_to": 0}, "round_to=0: expected a positive integer"),
        ("proposals 0", images(), {"proposals": 0}, "proposals=0: expected a positive integer"),
        ("proposals from a set encoder", images(), {"proposals": 2},
         "proposing several masks needs a pruner with generator 'outcome'"),
        ("5 channels", np.zeros((4, 32, 32, 5), np.uint8), {}, "expected (N, H, W, C) with C = 1 (grayscale) or 3"),
        ("2-d batch", np.zeros((4, 32), np.uint8), {}, "images have shape (4, 32): expected (N, H, W, C)"),
        # Nothing is rounded, clipped or rescaled: pixels that do not fit are refused.
        ("float pixels 0..255", images().astype(np.float64) + 0.5, {},
         "float pixels span [0.5, 255.5]: expected floats in [0, 1], or uint8 values 0..255 sent as integers"),
        ("pixel 300", images().astype(np.int64) + 200, {}, "integer pixels span [200, 455]: expected uint8 values in 0..255"),
        ("empty, as JSON sends it", np.zeros(0), {}, "the image set is empty"),
        ("labels length", images(8), {"labels": [0, 1, 2]}, "labels have shape (3,) but there are 8 images"),
        ("negative labels", images(4), {"labels": [0, -1, 0, 1]}, "labels contain negative values"),
    ],
)
def test_bad_inputs_raise_clear_mlflow_errors(store: dict[str, Any], case: str, data: np.ndarray, params: dict[str, Any], message: str) -> None:
    with pytest.raises(MlflowException) as exc:
        store["model"].predict(data, params=params)
    assert message in exc.value.message, case


def test_direct_calls_accept_dicts_dataframes_and_float_images(store: dict[str, Any]) -> None:
    """Without MLflow's signature enforcement, predict takes the other documented input forms."""
    impl = store["model"].unwrap_python_model()
    nchw = np.random.default_rng(0).random((12, 3, 32, 32), dtype=np.float32)
    labels = np.arange(12) % 3
    from_dict = impl.predict(None, {"images": nchw, "labels": labels}, {"macs_ratio": 0.4})
    frame = pd.DataFrame({"images": list(nchw), "labels": labels})
    from_frame = impl.predict(None, frame, {"macs_ratio": 0.4})
    from_param = impl.predict(None, nchw, {"macs_ratio": 0.4, "labels": labels.tolist()})
    assert from_dict == from_frame == from_param
    assert real_macs_ratio(PruneSpec.from_json(from_dict[0])) <= 0.4
    assert json.loads(from_dict[0])["input_shape"] == [3, 32, 32]

    bad = nchw.copy()
    bad[0, 0, 0, 0] = np.nan
    for data, params, message in [
        (bad, {}, "NaN"),
        (nchw * 3, {}, "float pixels span [4.005e-05, 3]: expected floats in [0, 1]"),
        ({"pixels": nchw}, {}, "expected 'images' and optionally 'labels'"),
        (pd.DataFrame({"x": [1]}), {}, "expected an 'images' column"),
        ({"images": nchw, "labels": labels}, {"labels": labels.tolist()}, "labels given both"),
        ("not images", {}, "expected (N, H, W, C)"),
    ]:
        with pytest.raises(MlflowException) as exc:
            impl.predict(None, data, params)
        assert message in exc.value.message


def test_log_into_the_callers_active_run(store: dict[str, Any]) -> None:
    """The training driver logs the pruner inside its own run and keeps that run open."""
    import mlflow

    # An explicit experiment: the sqlite store's Default one keeps artifacts in ./mlruns.
    experiment_id = ensure_experiment("stamp-tests", tracking_uri=store["uri"])
    with use_tracking_uri(store["uri"]), mlflow.start_run(experiment_id=experiment_id) as run:
        reg = log_pruner(store["pruner"], name="unregistered", register=False, params={"aws_secret_access_key": "hush"})
        assert mlflow.active_run() is not None and mlflow.active_run().info.run_id == run.info.run_id
    assert (reg.run_id, reg.version) == (run.info.run_id, None)
    assert reg.uri == reg.model_uri and reg.model_uri.startswith("models:/m-")
    client = mlflow.MlflowClient(store["uri"])
    assert client.get_run(run.info.run_id).data.params["aws_secret_access_key"] == "***"
    loaded = load_pruner(reg.model_uri, tracking_uri=store["uri"])
    assert loaded.config == store["pruner"].config
