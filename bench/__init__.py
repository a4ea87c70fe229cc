"""fastcenter's GPU benchmark suite (face 3 of the spec): `pytest bench/ --benchmark-only`.

What each module holds:

    environment.py   the CUDA / pytest-benchmark checks that skip the suite, the run's environment (device,
                     versions, commit) and the two measured ceilings (copy bandwidth, bf16 matmul rate)
    timing.py        CUDA-event timing (warm-up excluded, L2 flushed, median of many reps) and peak memory
    cases.py         every benchmarked op: shapes, inputs, variants, and the byte / FLOP model of each
    plugin.py        pytest hooks: session data into the pytest-benchmark JSON, skips and failures recorded
    test_ops.py      per-op cases (forward, forward+backward), fastcenter vs eager vs torch.compile vs peers
    test_train_step.py  tokens/s and peak memory of a full training step of the seed model
    report.py        `python -m bench.report RUN.json` -> bench/results/<device>-<date>.json + BENCHMARKS.md

Only `report.py`, `cases.py` (models and ids), `timing.py` (with a host clock) and `plugin.py` work without a GPU;
the tests in tests/test_bench_harness.py hold them on the CPU.
"""
