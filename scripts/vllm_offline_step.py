"""vLLM-CPU's decode step on a checkpoint, offline (`LLM.generate`), for comparison with
`expertmesh bench engine`: per batch, (129-token run - 1-token run) / 128, 64-token random
prompts, greedy, fp32, eager; the second of two tries. Needs vLLM (the harness's venv):

    TMPDIR=/tmp/vtmp VLLM_CPU_KVCACHE_SPACE=1 ~/peer-vllm-cpu/venv/bin/python \
        scripts/vllm_offline_step.py ~/peer-vllm-cpu/ckpt_medium_zb 1 8 32
"""

import random
import sys
import time


def main():
    from vllm import LLM, SamplingParams

    model, batches = sys.argv[1], [int(b) for b in sys.argv[2:]] or [1, 8, 32]
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=2048, seed=0)
    rng = random.Random(0)
    for b in batches:
        prompts = [{"prompt_token_ids": [rng.randint(5, 400) for _ in range(64)]} for _ in range(b)]
        took = {}
        for n in (1, 129, 1, 129):
            params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
            t = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            took[n] = time.perf_counter() - t
        print(f"batch {b}: decode step {(took[129] - took[1]) / 128 * 1e3:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
