"""The project's tools, run as `python -m executorch_wgpu <command>` (__main__.py):
bench, tune, bench_report, native_bench, llama_bench, demo, and the example models
(models.py) that the demo, llama-bench and the tests export."""
