"""The project's tools, each a command of `python -m executorch_wgpu` (__main__.py): bench
(with bench_model.py for `bench --model` and bench_report.py for its reports), tune,
native-bench, llama-bench and demo, with cli.py for what their command lines share
(argument types, progress bars); the example models (models.py, their named shapes in
configs.py) that the demo, llama-bench and the tests export; and the references
(reference.py: random q4gsw layers, fp64 goldens, rel_err) that bench and the tests judge
kernels by."""
