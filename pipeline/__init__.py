"""STAMP's platform around :mod:`stamp_core`: data on S3, training on Ray, models in MLflow, the `stamp` CLI.

Subpackages, in the order data flows (imports only point down this list)::

    settings, config, plots   where S3 / MLflow / Ray are; typed job configs; figures
    data                      sources -> S3 shards + catalog -> sample streams -> episodes; checkpoints
    stack                     the embedded stack: SeaweedFS, MLflow server, Ray head
    registry                  MLflow models-from-code pyfunc: log, register, alias, promote, load
    training                  Ray Train pretraining and meta-training, Ray Tune
    apps                      the `stamp` CLI, downstream pruning, benchmark, demo

``tests/test_architecture.py`` checks the order.
"""
