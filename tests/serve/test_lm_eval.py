"""lm-evaluation-harness, unmodified from PyPI, scores a local multiple-choice task through the live server, and every
loglikelihood it reports equals transformers' ``MixtralForCausalLM`` on the same weights and the same tokens.

lm-eval runs as its own command (``python -m lm_eval run``) with ``local-completions`` and
``tokenizer_backend=remote``: it reads ``/tokenizer_info``, tokenizes through ``/tokenize``, and sends
``/v1/completions`` requests of batched token-id prompts with ``echo``, ``logprobs: 1`` and ``max_tokens: 1``
(``batch_size=3``: several prompts per request). The task is a YAML + JSONL written here; nothing is downloaded
(``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE``). The reference re-tokenizes each (context, continuation) pair of
lm-eval's sample log the way lm-eval does (whole = tok(context + continuation), context = tok(context), the
continuation the rest), and sums transformers' fp32 log-softmax over the continuation tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

QUESTIONS = [
    ("What is the capital of France?", ["Paris", "Rome", "Berlin", "Madrid"], 0),
    ("Which number is even?", ["three", "seven", "four", "nine"], 2),
    ("What colour is the sky on a clear day?", ["green", "blue", "red", "yellow"], 1),
    ("Which animal barks?", ["cat", "fish", "bird", "dog"], 3),
    ("What do bees make?", ["honey", "milk", "silk", "wool"], 0),
    ("How many legs does a spider have?", ["six", "four", "eight", "ten"], 2),
]
TASK = "mixtral_local_mc"
# fp32 on both sides: per-token logprobs agree to ~1e-5; a continuation is a few tokens.
ATOL = 2e-3


def _write_task(folder: Path) -> None:
    data = folder / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )


def _run_lm_eval(url: str, task_dir: Path, out_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(out_dir / "datasets-cache"), "OPENAI_API_KEY": "unused"}
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
           "--model_args", f"model=tiny-mixtral,base_url={url}/v1/completions,tokenizer_backend=remote,"
                           "max_length=256,num_concurrent=1,max_retries=1",
           "--tasks", TASK, "--include_path", str(task_dir), "--batch_size", "3",
           "--log_samples", "--output_path", str(out_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = sorted(out_dir.rglob("results_*.json"))
    samples = sorted(out_dir.rglob(f"samples_{TASK}_*.jsonl"))
    assert results and samples, f"lm-eval wrote {sorted(p.name for p in out_dir.rglob('*'))}"
    return json.loads(results[-1].read_text()), [json.loads(line) for line in samples[-1].read_text().splitlines()]


def _reference_loglikelihood(model: Any, tokenizer: Any, context: str, continuation: str) -> tuple[float, bool]:
    whole = tokenizer.encode(context + continuation, bos=False)
    ctx = tokenizer.encode(context, bos=False)
    cont = whole[len(ctx):]
    ids = torch.tensor([ctx + cont])  # [1, T]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)  # [T, V]
    rows = logprobs[len(ctx) - 1:-1]  # row p predicts token p + 1: the continuation's tokens
    targets = torch.tensor(cont)
    total = rows.gather(1, targets[:, None]).sum().item()
    greedy = bool((rows.argmax(dim=-1) == targets).all())
    return total, greedy


def test_lm_eval_loglikelihoods_match_transformers(live_server: Any, tiny_hf_checkpoint: Path,
                                                   tmp_path: Path) -> None:
    import transformers

    from mixtral.tokenizer import Tokenizer

    task_dir, out_dir = tmp_path / "task", tmp_path / "out"
    task_dir.mkdir()
    _write_task(task_dir)
    results, samples = _run_lm_eval(live_server.url, task_dir, out_dir)
    live_server.wait_idle()

    ref = transformers.MixtralForCausalLM.from_pretrained(tiny_hf_checkpoint, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(tiny_hf_checkpoint / "tokenizer.model.v3")
    assert len(samples) == len(QUESTIONS)
    correct = 0
    for sample in samples:
        doc = sample["doc"]
        # arguments: {"gen_args_i": {"arg_0": context, "arg_1": continuation}}; resps: per choice, per repeat,
        # [loglikelihood, is_greedy] written as strings.
        arguments = [sample["arguments"][f"gen_args_{i}"] for i in range(len(sample["arguments"]))]
        assert len(arguments) == len(doc["choices"]) == len(sample["resps"])
        scores = []
        for args, resp in zip(arguments, sample["resps"], strict=True):
            context, continuation = args["arg_0"], args["arg_1"]
            assert continuation == " " + doc["choices"][len(scores)]
            got_ll, got_greedy = float(resp[0][0]), str(resp[0][1]) == "True"
            want_ll, want_greedy = _reference_loglikelihood(ref, tok, context, continuation)
            assert abs(got_ll - want_ll) <= ATOL, (context, continuation, got_ll, want_ll)
            assert got_greedy == want_greedy, (context, continuation)
            scores.append(want_ll)
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    # The accuracy lm-eval reports is the one transformers' scores give.
    assert results["results"][TASK]["acc,none"] == pytest.approx(correct / len(QUESTIONS))
