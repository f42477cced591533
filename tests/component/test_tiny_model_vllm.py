"""The shipped tiny model loads and generates in vLLM (CPU or GPU build), with the settings
documented in ``asyncflow.tasks.tiny_model``, and agrees with transformers' greedy accuracy.

vLLM runs in a subprocess (its engine spawns processes of its own and holds global state), from
a script with the ``if __name__ == "__main__":`` guard it needs.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]

SCRIPT = """
import json, sys, time

def main():
    from vllm import LLM, SamplingParams
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from asyncflow.rewards.math import verify
    from asyncflow.tasks.arithmetic import eval_problems
    from asyncflow.tasks.tiny_model import ensure_tiny_model

    t0 = time.perf_counter()
    llm = LLM(model=str(ensure_tiny_model()), dtype="float32", max_model_len=128,
              gpu_memory_utilization=0.25, enforce_eager=True, seed=0)
    startup = time.perf_counter() - t0
    problems = eval_problems(256, seed=0)
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    llm.generate([p.prompt for p in problems[:8]], greedy, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate([p.prompt for p in problems], greedy, use_tqdm=False)
    seconds = time.perf_counter() - t0
    texts = [o.outputs[0].text for o in outs]
    print("RESULT " + json.dumps({
        "startup_s": startup,
        "acc": sum(verify(t, p.answer, strict=True) for t, p in zip(texts, problems)) / 256,
        "tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outs) / seconds,
        "finish": [o.outputs[0].finish_reason for o in outs],
        "prompt_ids": outs[0].prompt_token_ids,
        "head_sizes": CPUAttentionBackend.get_supported_head_sizes(),
    }))

if __name__ == "__main__":
    main()
"""


def test_tiny_model_generates_in_vllm(tmp_path: Path) -> None:
    from asyncflow.tasks.arithmetic import eval_problems
    from asyncflow.tasks.tiny_model import build_tokenizer, greedy_accuracy

    script = tmp_path / "vllm_tiny.py"
    script.write_text(SCRIPT)
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    print({k: v for k, v in result.items() if k not in ("finish", "prompt_ids")})
    assert 32 in result["head_sizes"]
    assert result["prompt_ids"] == build_tokenizer().encode(eval_problems(1)[0].prompt)
    assert result["finish"].count("stop") > 200  # it emits <eos>, which vLLM honours
    reference = greedy_accuracy(root / "asyncflow" / "assets" / "tiny-adder", eval_problems(256))
    assert abs(result["acc"] - reference) <= 0.05  # same greedy policy, up to float ties
