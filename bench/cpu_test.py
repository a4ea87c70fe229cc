"""The CPU comparison (bench/cpu.py) as a case of `pytest bench/ --benchmark-only`, for machines without a GPU.

It runs `train.py --fused` on the CPU and the plain-PyTorch GPT (bench/plain_gpt.py) alternately, as
`python -m bench.cpu` does, sized by FASTCENTER_BENCH_CPU_* (bench.cpu.settings_from_env: the seed config, 2
rounds x 3 steps by default). One line per run is printed as it finishes; the summary (tokens/s and peak RSS of
both sides, the paired speed ratio, how busy the machine was) comes at the end of the session, and the whole
results dict goes into the benchmark JSON (`extra_info`). Nothing is written to bench/results/: that is
`python -m bench.cpu`'s job. Where CUDA is available this case is skipped unless FASTCENTER_BENCH_CPU=1 (the
GPU suite is what runs there).
"""

from bench import cpu
from bench.plugin import SESSION


def _live(request):
    """Print a line to the terminal now, past pytest's output capture (a run takes minutes)."""
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def say(line: str) -> None:
        if reporter is None or capture is None:
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"  {line}")

    return say


def test_cpu_comparison(benchmark, request):
    settings = cpu.settings_from_env()
    say = _live(request)
    say(f"CPU comparison, {cpu.describe_settings({'settings': {**vars(settings), 'threads': settings.n_threads}})}")
    results = benchmark.pedantic(cpu.compare, args=(settings,), kwargs={"say": say}, rounds=1, iterations=1)
    benchmark.extra_info.update({"schema": cpu.SCHEMA, "cpu_comparison": results})
    SESSION["cpu"] = results
    failed = [f"{r['side']} (round {r['round'] + 1}): {r['error']}" for r in results["runs"] if r.get("error")]
    assert not failed, "runs failed: " + "; ".join(failed)
