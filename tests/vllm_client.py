"""Run by tests/test_vllm_real.py with the python of the vLLM environment (requirements-vllm.txt).

Reads a JSON job from argv[1] and prints one line `RESULT {json}`:

- "validate": {name: adapter folder}: vLLM's own `PEFTHelper.from_local_dir(...).validate_legal(...)`
  under `max_lora_rank`, then the worker-side load that `vllm serve` runs for a request
  (`LLMEngine.add_lora` -> the worker's `LRUCacheWorkerLoRAManager.add_adapter`, which reads
  the tensors with `LoRAModel.from_local_checkpoint` against the model's LoRA modules).
  Each gives "ok" or the error message.
- "rules": {name: folder}: only `PEFTHelper.validate_legal` (folders with just an adapter_config.json
  change), to compare vLLM's verdicts with qdylora's copy of its rules.
- "generate": {name: adapter folder, or null for the base alone}: greedy generation from `prompts` (token ids) with that
  adapter; the tokens and the log-probability of each.

Nothing here imports qdylora: this is vLLM's view of the exported folders.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: errors reach us
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB

import torch  # noqa: E402


def main() -> None:
    job = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.request import LoRARequest

    out = {"validate": {}, "rules": {}, "load": {}, "generate": {}}
    lora_config = LoRAConfig(max_lora_rank=job["max_lora_rank"], max_loras=1)
    for stage in ("validate", "rules"):
        for name, path in job.get(stage, {}).items():
            try:
                PEFTHelper.from_local_dir(path, max_position_embeddings=None).validate_legal(lora_config)
                out[stage][name] = "ok"
            except Exception as exc:  # vLLM raises ValueError; keep whatever it says
                out[stage][name] = f"{type(exc).__name__}: {exc}"

    adapters = {**job["validate"], **{n: p for n, p in job["generate"].items() if p}}
    llm = LLM(
        model=job["base"], enable_lora=True, max_lora_rank=job["max_lora_rank"], max_loras=1,
        max_cpu_loras=len(adapters) + 1, dtype="float32", max_model_len=128, max_num_seqs=4,
        enforce_eager=True, seed=0,
    )
    ids = {name: i for i, name in enumerate(adapters, start=1)}
    for name, path in job["validate"].items():
        try:
            ok = llm.llm_engine.add_lora(LoRARequest(name, ids[name], path))
            out["load"][name] = "ok" if ok else "add_lora returned False"
        except Exception as exc:
            out["load"][name] = f"{type(exc).__name__}: {exc}"

    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], logprobs=0, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
    for name, path in job["generate"].items():
        request = LoRARequest(name, ids[name], path) if path else None
        results = llm.generate(prompts, params, lora_request=request, use_tqdm=False)
        out["generate"][name] = [
            {
                "tokens": list(r.outputs[0].token_ids),
                "logprobs": [step[t].logprob for t, step in zip(r.outputs[0].token_ids, r.outputs[0].logprobs)],
            }
            for r in results
        ]
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
