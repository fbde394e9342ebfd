"""Ship one rank of a QDyLoRA adapter: as a standard PEFT/vLLM adapter, or merged into the base.

- `export_adapter(adapter_dir, out_dir, rank)`: lora_A[:b], lora_B[:, :b], r = b, same
  lora_alpha; loads with plain `PeftModel.from_pretrained` and in vLLM. `vllm=True` first
  checks vLLM's rules and the shapes against the base (vLLM does not); `pad_to` zero-pads.
  `export_adapters` writes several ranks at once.
- `export_merged(adapter_dir, out_dir, rank)`: a standalone transformers model folder,
  merged one base shard at a time.
"""

from .adapter import EXPORT_INFO, export_adapter, export_adapters, export_report, read_export_info, rank_folder
from .merged import export_merged
from .source import SourceAdapter
from .vllm import VLLM_RANKS, serve_command, vllm_rank

__all__ = [
    "EXPORT_INFO",
    "SourceAdapter",
    "VLLM_RANKS",
    "export_adapter",
    "export_adapters",
    "export_merged",
    "export_report",
    "rank_folder",
    "read_export_info",
    "serve_command",
    "vllm_rank",
]
