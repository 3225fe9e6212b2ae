"""The example models' named shapes, with no torch: the commands' option choices read them before anything heavy loads.

tools/models.py builds the models from these (and re-exports them).
"""

from __future__ import annotations

from typing import Dict

# The token dim's upper bound of the MiniLM export (`demo --max-seq`).
MINILM_MAX_SEQ = 128

# Llama-style decoder shapes. "1b" is Llama-3.2-1B's (dim 2048, FFN 8192, 16 layers, 32 heads / 8 KV heads,
# vocab 128256); "small" is the CI model, which a CPU Vulkan (lavapipe) runs in seconds.
LLAMA_CONFIGS: Dict[str, dict] = {
    "small": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, hidden_dim=1024, vocab_size=4096,
                  max_context_len=128),
    "1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, vocab_size=128256,
               rope_freq_base=500000.0, use_scaled_rope=True, rope_scale_factor=32, norm_eps=1e-5,
               max_context_len=1024),
}
