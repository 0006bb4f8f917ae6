"""Engine importers: routing that vLLM, SGLang and Megatron-Core already emit, written as moeprobe traces.

One module per source (``vllm``, ``sglang``, ``megatron``), a shared writer (``sink``) that writes traces the way
the capture pipeline does (same manifest, segments and status, through ``traces.ShardWriter``), and size-checked
decoding (``decode``). Nothing here imports torch except the SGLang dump reader, lazily, for ``.pt`` files
(``torch.load(weights_only=True)``). Formats and versions: docs/engines.md.
"""

from .errors import ImportInputError

ENGINES = ("vllm", "sglang", "megatron")

__all__ = ["ENGINES", "ImportInputError"]
