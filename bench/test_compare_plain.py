"""The CPU comparison (bench/compare_plain.py) as a case of `pytest bench/ --benchmark-only`, for machines
without a GPU: `train.py --fused` on the CPU against the plain-PyTorch GPT, sized by FASTCENTER_BENCH_CPU_* (the
default config, 2 rounds x 3 steps, by default). One line per run as it finishes; the summary at the end of the
session; the whole results dict in the benchmark JSON. It writes nothing to bench/results/: that is
`python -m bench.compare_plain`'s job.
"""

from bench import compare_plain


def test_cpu_comparison(benchmark, request):
    settings = compare_plain.settings_from_env()
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def say(line: str) -> None:  # now, past pytest's output capture: a run takes minutes
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"  {line}")

    results = benchmark.pedantic(compare_plain.compare, args=(settings,), kwargs={"say": say}, rounds=1, iterations=1)
    benchmark.extra_info.update({"schema": compare_plain.SCHEMA, "cpu_comparison": results})
    request.config.pluginmanager.get_plugin("fastcenter_bench").cpu = results
    failed = [f"{r['side']} (round {r['round'] + 1}): {r['error']}" for r in results["runs"] if r.get("error")]
    assert not failed, "runs failed: " + "; ".join(failed)
