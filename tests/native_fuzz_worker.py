"""Worker of tests/test_native_fuzz.py: runs .pte cases through ExecuTorch's runtime with the native delegate.

    python tests/native_fuzz_worker.py CASES.npz X.npy

A crash here kills this process, not pytest. Before each case it writes
"=== case <i>" to stderr (ExecuTorch's and the delegate's log lines follow it);
for each case one JSON line on stdout: {"i", "outcome": "ran" | "refused-load" |
"refused-run", "error", "outputs"}.
"""

import json
import os
import sys

import numpy as np


def main(cases_path: str, x_path: str) -> int:
    import torch
    import executorch_wgpu.native as native

    native.load()
    from executorch.runtime import Runtime

    runtime = Runtime.get()
    x = torch.from_numpy(np.load(x_path))
    cases = np.load(cases_path)
    for i in range(len(cases.files)):
        data = cases[f"c{i}"].tobytes()
        os.write(2, f"=== case {i}\n".encode())
        result = {"i": i, "outcome": "ran", "error": "", "outputs": []}
        try:
            method = runtime.load_program(data).load_method("forward")
        except Exception as e:
            result.update(outcome="refused-load", error=f"{type(e).__name__}: {e}")
        else:
            try:
                outputs = method.execute([x.clone()])
                result["outputs"] = [o.tolist() if isinstance(o, torch.Tensor) else repr(o) for o in outputs]
            except Exception as e:
                result.update(outcome="refused-run", error=f"{type(e).__name__}: {e}")
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
