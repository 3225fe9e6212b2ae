"""The project's tools, run as `python -m executorch_wgpu <command>` (__main__.py):
bench, tune, bench_report, native_bench, llama_bench, demo; the example models
(models.py) that the demo, llama-bench and the tests export; and the references
(reference.py: random q4gsw layers, fp64 goldens, rel_err) that bench and the tests
judge kernels by."""
