"""fastcenter's benchmarks (face 3 of the spec): `pytest bench/ --benchmark-only` on a GPU, a CPU comparison
where there is none, the compile check, and one script for the first contact with a GPU.

What each module holds:

    environment.py   the CUDA / pytest-benchmark checks that skip the GPU suite, the run's environment (device,
                     versions, commit) and the two measured ceilings (copy bandwidth, bf16 matmul rate)
    timing.py        CUDA-event timing (warm-up excluded, L2 flushed, median of many reps) and peak memory
    cases.py         every benchmarked op: shapes, inputs, variants, and the byte / FLOP model of each
    plugin.py        pytest hooks: session data into the pytest-benchmark JSON, skips and failures recorded
    test_ops.py      per-op cases (forward, forward+backward), fastcenter vs eager vs torch.compile vs peers
    test_train_step.py  tokens/s and peak memory of a full training step of the seed model (the training core's
                     step, as train.py runs it)
    test_hf.py       a Llama-shaped Hugging Face model's layer, loss and stack, patched against unpatched
    cpu.py           the CPU comparison (`python -m bench.cpu`): train.py --fused on the CPU against plain_gpt.py,
                     interleaved, with raw JSON and noise figures
    plain_gpt.py     the plain-PyTorch baseline GPT of the same architecture (full logits + F.cross_entropy)
    cpu_test.py      that comparison as a `pytest bench/ --benchmark-only` case where there is no GPU
    compile.py       `python -m bench.compile`: every kernel specialization the ops launch, compiled for sm_80..sm_90
                     through a compile-only driver (no GPU needed), with registers, spills, stack, shared memory
    first_contact.py `python -m bench.first_contact`: the one command to run on a GPU machine (tests compiled in
                     bf16, op benchmarks, train.py fused vs eager vs compile), within 10 minutes
    report.py        `python -m bench.report RUN.json` -> bench/results/<device>-<date>.json + BENCHMARKS.md

Everything but the GPU timing works without a GPU (with a host clock, or in the dry run); the tests in
tests/test_bench_harness.py, test_compile_check.py and test_first_contact.py hold it on the CPU.
"""
