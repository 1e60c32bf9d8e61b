"""Start vLLM as a user would, without enforce_eager (vLLM's default compiled mode), with a guardit
pack configured, and ask one forget question with the pack. Prints RESULT {eager, output}.

Usage: python vllm_default_mode.py MODEL_DIR PACK_DIR QUESTION
"""

import json
import os
import sys

if __name__ == "__main__":
    model, pack, question = sys.argv[1], sys.argv[2], sys.argv[3]
    os.environ["GUARDIT_PACKS"] = pack
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", max_model_len=512, seed=0)  # no enforce_eager
    cfg = llm.llm_engine.vllm_config
    params = SamplingParams(temperature=0.0, max_tokens=24, extra_args={"guardit_packs": "harry-potter"})
    out = llm.chat([{"role": "user", "content": question}], params, use_tqdm=False)
    print(
        "RESULT "
        + json.dumps(
            {
                "eager": cfg.model_config.enforce_eager,
                "mode": cfg.compilation_config.mode.name,
                "output": out[0].outputs[0].text,
            }
        )
    )
