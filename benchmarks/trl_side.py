"""The TRL side of ``bench_vs_trl.py``: TRL's ``GRPOTrainer`` on AsyncFlow's built-in task.

Run with a Python that has ``trl`` (``bash scripts/setup_trl.sh`` makes ``.venv-trl``); prints
one JSON line (prefixed ``TRL_RESULT``) with throughput, rewards per step, greedy held-out
accuracy before and after, and peak resident memory. The task, the reward and the held-out
problems come from this repository (``asyncflow.tasks.arithmetic``, ``asyncflow.rewards.math``:
pure Python, imported by path), so both sides score exactly the same way.

Hyperparameters mirror AsyncFlow's GRPO: one optimizer step per generation batch of
``prompts x samples`` completions (``per_device_train_batch_size = prompts * samples``,
``num_generations = samples``), token-mean loss over the batch (TRL ``loss_type="dapo"``),
clip 0.2 / 0.28, no KL (``beta=0``), group std normalisation, constant learning rate, AdamW
defaults, grad-norm clip 1.0, temperature 1.0.

    .venv-trl/bin/python benchmarks/trl_side.py --model builtin:tiny-adder --steps 100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from asyncflow.rewards.math import arithmetic_reward, math_reward  # noqa: E402
from asyncflow.tasks.arithmetic import eval_problems, train_problems  # noqa: E402

TINY = REPO / "asyncflow" / "assets" / "tiny-adder"
REWARDS = {"arithmetic": arithmetic_reward, "math": math_reward}


def _vm_kib(pid: int, key: str) -> int:
    """``VmHWM`` / ``VmRSS`` of a process in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc, no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class PeakMemory:
    """Peak resident memory of a process tree, polled in a thread.

    ``sum_of_peaks_gib``: the sum over every process seen (this one and all its descendants,
    including ones that have exited since) of its own peak RSS (``VmHWM``, last value read):
    an upper bound of what the tree held at once. ``peak_of_sum_gib``: the largest sum of
    current RSS seen at one poll (a lower bound, limited by the poll interval). Shared pages
    (libraries, torch) count once per process in both.
    """

    def __init__(self, interval_s: float = 0.25, include_self: bool = True) -> None:
        self.interval_s = interval_s
        self.include_self = include_self
        self.hwm: dict[int, int] = {}
        self.peak_sum_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def poll(self) -> None:
        me = os.getpid()
        pids = _descendants(me) + ([me] if self.include_self else [])
        now = 0
        for pid in pids:
            hwm = _vm_kib(pid, "VmHWM")
            if hwm:
                self.hwm[pid] = max(self.hwm.get(pid, 0), hwm)
            now += _vm_kib(pid, "VmRSS")
        self.peak_sum_kib = max(self.peak_sum_kib, now)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def result(self) -> dict[str, Any]:
        return {
            "sum_of_peaks_gib": sum(self.hwm.values()) / 2**20,
            "peak_of_sum_gib": self.peak_sum_kib / 2**20,
            "processes": len(self.hwm),
        }


def greedy_accuracy(
    model: Any,
    tokenizer: Any,
    problems: list[Any],
    max_new_tokens: int,
    reward: Any,
    batch_size: int = 64,
) -> float:
    """Greedy held-out accuracy, scored by the same reward function as training."""
    import torch

    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    hits = 0
    with torch.no_grad():
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            enc = tokenizer([p.prompt for p in chunk], return_tensors="pt", padding=True)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(
                gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
            hits += sum(reward(p.prompt, t, p.answer) > 0 for p, t in zip(chunk, texts))
    model.train(was_training)
    return hits / len(problems)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = str(TINY if args.model == "builtin:tiny-adder" else Path(args.model))
    reward_fn = REWARDS[args.reward]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    problems = eval_problems(args.eval_size, seed=0)

    t0 = time.perf_counter()
    acc_start = greedy_accuracy(model, tokenizer, problems, args.max_new_tokens, reward_fn)
    eval_s = time.perf_counter() - t0

    train = train_problems(max(args.steps * args.prompts, 64) * 4, seed=args.seed)
    dataset = Dataset.from_dict(
        {"prompt": [p.prompt for p in train], "answer": [p.answer for p in train]}
    )
    rewards: list[float] = []  # mean reward of each generation batch
    tokens = [0]

    def reward(
        prompts: list[str],
        completions: list[str],
        answer: list[str],
        completion_ids: list[list[int]],
        **_: Any,
    ) -> list[float]:
        scores = [reward_fn(p, c, a) for p, c, a in zip(prompts, completions, answer)]
        rewards.append(sum(scores) / len(scores))
        tokens[0] += sum(len(ids) for ids in completion_ids)
        return scores

    reward.__name__ = f"{args.reward}_reward"
    marks: dict[str, Any] = {"begin": None, "ends": []}

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            marks["begin"] = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            marks["ends"].append(time.perf_counter())

    n = args.prompts * args.samples
    config = GRPOConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        num_generations=args.samples,
        max_completion_length=args.max_new_tokens,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        temperature=1.0,
        top_p=1.0,
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type="dapo",
        scale_rewards="group",
        num_iterations=1,
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=args.bf16,  # bfloat16 autocast over float32 weights
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.train()
    ends = marks["ends"]
    train_s = ends[-1] - marks["begin"]
    step_s = [b - a for a, b in zip([marks["begin"], *ends[:-1]], ends)]
    acc_end = greedy_accuracy(trainer.model, tokenizer, problems, args.max_new_tokens, reward_fn)
    samples = len(ends) * n
    return {
        "side": "trl",
        "steps": len(ends),
        "samples": samples,
        "response_tokens": tokens[0],
        "train_time_s": train_s,
        "samples_per_s": samples / train_s,
        "tokens_per_s": tokens[0] / train_s,
        "step_time_s": step_s,
        "rewards": rewards,
        "eval_accuracy_start": acc_start,
        "eval_accuracy_end": acc_end,
        "eval_n": len(problems),
        "eval_s": eval_s,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="builtin:tiny-adder")
    p.add_argument("--reward", choices=sorted(REWARDS), default="arithmetic")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--eval-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--output-dir", default="runs/bench-trl/trl")
    p.add_argument("--bf16", action="store_true", help="train under bfloat16 autocast")
    args = p.parse_args()
    with PeakMemory() as mem:
        out = run(args)
    out["memory"] = mem.result()
    print("TRL_RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
