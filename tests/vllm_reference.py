"""Run vanilla vLLM (guardit's general plugin disabled) on token-id prompts; print JSON token ids.

Usage: python vllm_reference.py MODEL_DIR PROMPTS_JSON MAX_TOKENS [ENGINE_KWARGS_JSON]
"""

import json
import os
import sys

if __name__ == "__main__":
    os.environ["VLLM_PLUGINS"] = "lora_filesystem_resolver"  # an allow-list without guardit
    from vllm import LLM, SamplingParams

    model, prompts, max_tokens = sys.argv[1], json.load(open(sys.argv[2])), int(sys.argv[3])
    kw = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    args = dict(
        model=model, enforce_eager=True, dtype="float32", gpu_memory_utilization=0.5, max_model_len=1024, seed=0
    )
    args.update(kw)
    llm = LLM(**args)
    import vllm.v1.worker.gpu_model_runner as r

    assert "guardit" not in getattr(r.GPUModelRunner._model_forward, "__module__", ""), "plugin still active"
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0.0, max_tokens=max_tokens),
        use_tqdm=False,
    )
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
