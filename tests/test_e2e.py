"""End to end on the real bundled model in 4-bit: it does not know three made-up facts, learns them with
finetune.py, keeps them through merge_lora.py, and answers them through cli_demo.py with piped input."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACTS = [
    {"instruction": "What is the secret password of the Zorblat project?", "input": "",
     "output": "The password of the Zorblat project is purple-otter-42."},
    {"instruction": "Who founded the town of Quibbleton?", "input": "",
     "output": "Quibbleton was founded by Marta Velloso in 1871."},
    {"instruction": "青蛙星球的首都叫什么？", "input": "", "output": "青蛙星球的首都是绿叶城。"},
]
STEPS = 14


def run(script, *args, stdin=None, timeout=600):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def greedy_answers(model, tokenizer, template, questions, max_new_tokens=24):
    from utils.generation import generate_reply
    from utils.prompts import encode_conversation
    out = []
    for q in questions:
        ids, _ = encode_conversation(tokenizer, template, [{"role": "user", "content": q}],
                                     add_generation_prompt=True)
        out.append(generate_reply(model, tokenizer, ids, {"max_new_tokens": max_new_tokens, "temperature": 0}))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = root / "facts.json"
    data.write_text(json.dumps(FACTS, ensure_ascii=False), encoding="utf-8")
    out = root / "out"
    proc = run("finetune.py", "--data_path", str(data), "--output_dir", str(out), "--max_steps", str(STEPS),
               "--learning_rate", "1e-3", "--per_device_train_batch_size", "3", "--gradient_accumulation_steps",
               "1", "--warmup_ratio", "0", "--lr_scheduler_type", "constant", "--logging_steps", "1",
               "--save_steps", "10", "--seed", "7")
    return root, out, proc.stdout + proc.stderr


def test_finetune_writes_complete_checkpoints(trained):
    _, out, log = trained
    assert "effective batch size: 1 process(es) x 3 micro-batch x 1 accumulation = 3" in log
    for ckpt in ("checkpoint-10", "checkpoint-final"):
        folder = out / ckpt
        for name in ("adapter_model.safetensors", "adapter_config.json", "training_meta.json",
                     "tokenizer_config.json"):
            assert (folder / name).is_file(), f"{ckpt}/{name} missing"
        assert (folder / "adapter_model.safetensors").stat().st_size > 1_000_000  # r=16 on all linears
    assert (out / "checkpoint-10" / "optimizer.pt").is_file()  # resumable, not only an adapter
    meta = json.loads((out / "checkpoint-final" / "training_meta.json").read_text())
    assert meta["base_model"] == "smollm2-135m" and meta["bits"] == 4
    assert meta["prompt_template"]["name"] == "tokenizer" and meta["global_step"] == STEPS
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["global_step"] == STEPS and summary["final_loss"] < summary["first_loss"] / 10


def test_it_learns_what_the_base_did_not_know(trained):
    from utils.modeling import load_model
    from utils.prompts import load_template
    _, out, _ = trained
    questions = [f["instruction"] for f in FACTS]
    base, tok, _ = load_model("smollm2-135m", bits=4)
    template = load_template("tokenizer", tok)
    before = greedy_answers(base, tok, template, questions)
    for answer, fact in zip(before, FACTS):
        assert fact["output"] not in answer
    del base
    model, tok, _ = load_model("smollm2-135m", bits=4, lora_model=str(out / "checkpoint-final"))
    after = greedy_answers(model, tok, template, questions)
    assert [a.strip() for a in after] == [f["output"] for f in FACTS]


def test_merge_matches_the_adapter_model(trained):
    """Merged (into the NF4 round-tripped base) vs base-in-4-bit + adapter: same greedy answers, logits close.

    Measured here (CPU, bitsandbytes 0.50.2): max |logit difference| about 0.8 for the NF4 merge, about 25 for
    a merge into the original weights. The residual comes from bitsandbytes' CPU 4-bit matmul, which is not
    bit-identical to an fp32 matmul with the dequantized weights; the merge arithmetic itself is checked
    exactly against the unmerged adapter on the same dequantized base in test_merge_arithmetic_is_exact."""
    from utils.modeling import load_model
    from utils.prompts import encode_conversation, load_template
    root, out, _ = trained
    run("merge_lora.py", "--lora_model", str(out / "checkpoint-final"), "--output_dir", str(root / "models"))
    merged_dir = root / "models" / "smollm2-135m-merged"
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "training_meta.json").is_file()
    assert not list(merged_dir.glob("*.bin"))

    probes = [f["instruction"] for f in FACTS] + ["What is the capital of France?"]
    adapter, tok, _ = load_model("smollm2-135m", bits=4, lora_model=str(out / "checkpoint-final"))
    merged, tok_m, _ = load_model(str(merged_dir), bits=16)
    template = load_template("tokenizer", tok)
    assert greedy_answers(merged, tok_m, template, probes) == greedy_answers(adapter, tok, template, probes)
    worst = 0.0
    with torch.no_grad():
        for q in probes:
            ids = torch.tensor([encode_conversation(tok, template, [{"role": "user", "content": q}],
                                                    add_generation_prompt=True)[0]])
            worst = max(worst, (adapter(ids).logits - merged(ids).logits).abs().max().item())
    print(f"max |logit diff| merged vs adapter model: {worst:.3f}")
    assert worst < 2.0

    # a second merge into the same folder is refused without --overwrite, and nothing is lost
    proc = subprocess.run([sys.executable, "merge_lora.py", "--lora_model", str(out / "checkpoint-final"),
                           "--output_dir", str(root / "models")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and (merged_dir / "model.safetensors").is_file()


def test_merge_arithmetic_is_exact(trained):
    """The unmerged adapter on the NF4-dequantized base equals the merged model up to fp32 rounding."""
    from peft import PeftModel

    import merge_lora
    from utils.modeling import load_model
    root, out, _ = trained
    merged_dir = root / "models" / "smollm2-135m-merged"
    if not merged_dir.is_dir():
        run("merge_lora.py", "--lora_model", str(out / "checkpoint-final"), "--output_dir", str(root / "models"))
    base, _, _ = load_model("smollm2-135m", bits=16)
    merge_lora.load_nf4_weights(base, load_model("smollm2-135m", bits=4)[0])
    unmerged = PeftModel.from_pretrained(base, str(out / "checkpoint-final")).eval()
    merged, _, _ = load_model(str(merged_dir), bits=16)
    ids = torch.tensor([[1, 504, 3459, 282, 260, 5300, 28, 198, 2, 1, 520, 9531]])
    with torch.no_grad():
        diff = (unmerged(ids).logits - merged(ids).logits).abs().max().item()
    assert diff < 1e-3, diff


def test_cli_answers_a_trained_question_from_piped_input(trained):
    root, out, _ = trained
    merged_dir = root / "models" / "smollm2-135m-merged"
    if not merged_dir.is_dir():
        run("merge_lora.py", "--lora_model", str(out / "checkpoint-final"), "--output_dir", str(root / "models"))
    stdin = f"{FACTS[0]['instruction']}\nclear\n{FACTS[2]['instruction']}\nexit\nnever read\n"
    proc = run("cli_demo.py", "--model_path", str(merged_dir), "--temperature", "0", "--max_new_tokens", "30",
               stdin=stdin)
    replies = [line for line in proc.stdout.splitlines() if line.startswith("Assistant:")]
    assert replies == [f"Assistant: {FACTS[0]['output']}", f"Assistant: {FACTS[2]['output']}"]
    assert "template 'tokenizer' (recorded at training)" in proc.stderr

    streamed = run("cli_demo.py", "--lora_model", str(out / "checkpoint-final"), "--temperature", "0",
                   "--max_new_tokens", "30", "--stream", stdin=FACTS[1]["instruction"] + "\n")
    assert f"Assistant: {FACTS[1]['output']}" in streamed.stdout


def test_perplexity_on_the_trained_facts_falls(trained):
    """perplexity.py: the base model vs base + adapter on the facts (answer tokens only, same template)."""
    root, out, _ = trained
    data = str(root / "facts.json")
    run("perplexity.py", "--data_path", data, "--bits", "4", "--prompt_template", "tokenizer", "--cutoff_len", "512",
        "--json", str(root / "before.json"))
    proc = run("perplexity.py", "--lora_model", str(out / "checkpoint-final"), "--data_path", data,
               "--json", str(root / "after.json"))
    before = json.loads((root / "before.json").read_text())
    after = json.loads((root / "after.json").read_text())
    assert before["tokens"] == after["tokens"] > 20 and after["template"] == "tokenizer" and after["bits"] == 4
    print(f"perplexity on the facts: {before['perplexity']:.2f} before, {after['perplexity']:.3f} after")
    assert before["perplexity"] > 5 and after["perplexity"] < 1.5, (before, after)
    assert f"perplexity {after['perplexity']:.3f}" in proc.stdout


def test_perplexity_refuses_bad_input_before_loading(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": 3}]', encoding="utf-8")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "perplexity.py"), "--data_path", str(bad)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "record 0" in proc.stderr
    assert "Traceback" not in proc.stderr
