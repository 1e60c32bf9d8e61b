"""Start guardit's engine compiled, as vLLM does by default (no enforce_eager), with the Harry Potter
pack and chunked prefill, and generate on the Harry Potter test splits:

- ``plain``: no pack named; ``gated``: the pack on every request (``engine_generate``, the answer
  check included); ``mixed``: the pack on every other request of one batch, then ``solo``: the
  first four of those, one request per batch.

Prints RESULT {mode, eager, plain, gated, mixed, solo} (rows as ``engine_generate`` gives them;
mixed and solo: token ids).

Usage: python vllm_compiled.py MODEL_DIR PACK_DIR RUN_DIR ENGINE_KWARGS_JSON MAX_TOKENS
"""

import json
import sys
from pathlib import Path

if __name__ == "__main__":
    model, pack, run_dir = sys.argv[1:4]
    kw, max_tokens = json.loads(sys.argv[4]), int(sys.argv[5])
    examples = Path(__file__).resolve().parents[1] / "examples" / "concepts"
    from calibration import read_prompts
    from calibration.capture import encode_chat
    from guardit.vllm_generation import _submit, engine_generate, make_llm

    recs = [r for s in ("forget_test", "retain_test") for r in read_prompts(examples / "harry_potter" / f"{s}.jsonl")]
    llm = make_llm(model, [pack], run_dir=run_dir, enforce_eager=False, **kw)
    cfg = llm.llm_engine.vllm_config
    ids = encode_chat(llm.get_tokenizer(), [r.prompt for r in recs])
    use = [["harry-potter"] if i % 2 == 0 else [] for i in range(len(ids))]
    mixed, _ = _submit(llm, ids, use, False, None, max_tokens)
    solo = [_submit(llm, [ids[i]], [use[i]], False, None, max_tokens)[0][0] for i in range(4)]
    out = {
        "mode": cfg.compilation_config.mode.name,
        "eager": cfg.model_config.enforce_eager,
        "plain": engine_generate(llm, recs, (), max_tokens),
        "gated": engine_generate(llm, recs, ["harry-potter"], max_tokens),
        "mixed": mixed,
        "solo": solo,
    }
    print("RESULT " + json.dumps(out))
