"""fastcenter's benchmarks: `pytest bench/ --benchmark-only` on a GPU, and the commands around it.

    cases.py             every benchmarked op: shapes, inputs, variants, and the byte / FLOP model of each
    measure.py           the timer (CUDA events as pytest-benchmark's clock), L2 flush, peak memory, the ceilings
    conftest.py          what the session skips where, its fixtures, what it writes (JSON section, partial file)
    test_ops.py          every op, forward and forward+backward, against eager, torch.compile and peers
    test_train_step.py   tokens/s and peak memory of a full training step of the default model
    test_compare_plain.py  the CPU comparison as a case, where there is no GPU
    compare_plain.py     `python -m bench.compare_plain`: train.py --fused on a CPU against plain_gpt.py; and how
                         a command runs a child (deadline, log, CPU time, peak RSS) on synthetic token files
    plain_gpt.py         the plain-PyTorch baseline GPT of the same architecture (full logits + F.cross_entropy)
    compile.py           `python -m bench.compile`: every kernel specialisation compiled for sm_80..sm_90, no GPU
    first_contact.py     `python -m bench.first_contact`: the one command for a GPU lease
    report.py            `python -m bench.report`: results files and BENCHMARKS.md, from JSON only
    targets.json         the performance targets the report holds results against

Everything but the GPU timing runs without a GPU (FASTCENTER_BENCH_DRY_RUN=1 runs the GPU cases on the CPU at tiny
shapes); tests/test_bench_harness.py, test_compile_check.py and test_first_contact.py hold it on the CPU.
"""
