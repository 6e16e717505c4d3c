"""Parallelism across processes beyond data parallelism (``zoo.train.distributed``): sequence parallelism."""
