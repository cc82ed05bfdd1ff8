"""End to end: the quick demo against real SeaweedFS, a real MLflow server and an in-process Ray."""

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests._listeners import is_loopback, watch_listeners

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]

#: A line of Ray's or MLflow's own logging: worker output Ray forwards ("(RayTrainWorker pid=12)"),
#: C++ log lines ("core_worker.cc:2465"), Python log records ("INFO worker.py:", "INFO mlflow.").
LIBRARY_LINE = re.compile(
    r"\((?:\w+ )?pid=\d+|\.cc:\d+|\b(?:INFO|WARNING|ERROR|DEBUG)\b.*(?:\w\.py:\d+|mlflow\.\w)|raylet|PreemptionWatcher"
)


@pytest.mark.timeout(1200)  # the subprocess's own limit; the suite's 600 s is too short on a loaded 2-core box
def test_quick_demo_end_to_end(seaweedfs, s3_bucket, mlflow_server, tmp_path) -> None:
    """`stamp demo --quick` as a user runs it: a separate process with its own local Ray (so no
    actor or placement group can outlive it into other tests), against the real S3 and MLflow.

    It also checks that a run without a cluster address listens on loopback only: the local Ray of
    :func:`pipeline.stack.init_ray` and the train workers' process group
    (:class:`pipeline.training.rendezvous.LoopbackTorchConfig`), sampled while the demo runs."""
    from stamp_core import PruneSpec, build_backbone, count_macs_params

    model_name = f"demo-e2e-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(STAMP_BUCKET=s3_bucket, STAMP_HOME=str(tmp_path / "home"))
    # One stream, in the order a user reads it on the terminal (progress on 2, results on 1), into a file: a
    # pipe nobody reads while the demo runs would fill and stall it. Meanwhile every listening socket of the
    # demo's process tree (its local Ray: GCS, raylet, agents, train workers with the TCPStore and gloo) is
    # sampled: a run without a cluster address must listen on loopback only.
    stream = tmp_path / "demo-output.txt"
    with stream.open("w") as sink:
        demo = subprocess.Popen(
            [sys.executable, "-m", "pipeline.apps.cli", "demo", "--quick", "--out", str(tmp_path / "out"),
             "--model-name", model_name],
            env=env, stdout=sink, stderr=subprocess.STDOUT, text=True,
        )
        seen = watch_listeners(demo, timeout=1200)
    shown = stream.read_text()
    assert demo.returncode == 0, shown[-6000:]
    names = {name for name, _, _ in seen}
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::") for n in names), names
    exposed = sorted(s for s in seen if not is_loopback(s[1]))
    assert not exposed, f"listening beyond loopback: {exposed}"
    result = json.loads((tmp_path / "out" / "demo_result.json").read_text())
    assert "top-1" in shown and "stage times" in shown  # the table was printed
    report, full, stages = result["report"], result["full"], result["stages"]
    assert set(stages) >= {"ingest", "pretrain", "meta_train", "tune", "register", "prune", "total"}
    assert 0.27 <= report["macs_ratio"] <= 0.30
    assert 0.0 <= report["accuracy"] <= 1.0 and 0.0 <= full["accuracy"] <= 1.0
    # The full network's reference is `stamp prune --compare-full`'s, not a second implementation.
    assert (full["accuracy"], full["finetune_seconds"]) == (report["full_accuracy"], report["full_finetune_seconds"])
    assert report["params_pruned"] < report["params_full"]
    out = tmp_path / "out"
    for name in ("spec.json", "pruned_state_dict.pt", "model.onnx", "model.torchscript.pt", "report.md"):
        assert (out / "pruned" / name).is_file(), name
    assert "STAMP pruned" in (out / "demo_report.md").read_text()

    # One screen per stage: a progress line each (its final state: the output is not a terminal)
    # with the count and key figure; the prune stage's child process adds its own step lines. The
    # results (tables) follow the last stage.
    progress = shown[:shown.index("STAMP demo: unseen dataset")].splitlines()
    for pattern in (r"ok 3\. pretrain .* 1/1 epochs in .* · loss \d\.\d+ · train acc .* img/s",
                    r"ok 4\. meta-train .* 10/10 steps in .* · loss .* episodes/s · val acc \d+\.\d%",
                    r"ok 5\. tune .* 12/12 trial-steps in .* · 2/2 trials done · best val acc \d+\.\d%"):
        assert any(re.fullmatch(pattern, line) for line in progress), "\n".join([pattern, *progress])
    starts = [i for i, line in enumerate(progress) if re.match(r"(ok |failed )?\d\. ", line)]
    assert len(starts) == 7, "\n".join(progress)
    per_stage = [b - a for a, b in zip(starts, [*starts[1:], len(progress)])]
    assert max(per_stage) <= 24, "\n".join([str(per_stage), *progress])

    # Quiet by default: no line of Ray's (or MLflow's) own logging reaches the terminal; they are
    # in the log file whose path the demo printed, not lost.
    internals = [line for line in shown.splitlines() if LIBRARY_LINE.search(line)]
    assert not internals, internals[:10]
    log = out / "logs" / "demo.log"
    assert str(log) in shown
    assert LIBRARY_LINE.search(log.read_text())

    # The spec is real: rebuilt from JSON on a fresh backbone, its MACs are what the report says.
    spec = PruneSpec.load(out / "pruned" / "spec.json")
    pruned = spec.apply(build_backbone(spec.backbone["name"], report["num_classes"],
                                       **{k: v for k, v in spec.backbone.items() if k not in ("name", "num_classes")}))
    assert count_macs_params(pruned, spec.input_shape)[0] == report["macs_pruned"]

    # The champion loads through plain MLflow in a fresh process and returns a spec for new data.
    code = (
        "import json, numpy as np, mlflow\n"
        f"m = mlflow.pyfunc.load_model('models:/{model_name}@champion')\n"
        "x = np.random.default_rng(0).integers(0, 255, (20, 32, 32, 1), dtype=np.uint8)\n"
        "print(json.dumps({'ratio': json.loads(m.predict(x, params={'macs_ratio': 0.5})[0])['macs_pruned']}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["ratio"] > 0
