"""Flags: every boolean spelling the original README used, aliases, the legacy 8-bit flags, validate_args, --help."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli_demo
import finetune
from utils.args import UserError, check_generation_args, resolve_bits, str2bool

ROOT = Path(__file__).resolve().parents[1]

SPELLINGS = [([], None), (["{f}"], True), (["--no-{n}"], False), (["{f}=True"], True), (["{f}=False"], False),
             (["{f}", "false"], False), (["{f}", "true"], True), (["{f}=0"], False), (["{f}=yes"], True)]

BOOL_FLAGS = [  # (parse_args, flag, dest, default)
    (finetune.parse_args, "--train_on_inputs", "train_on_inputs", False),
    (finetune.parse_args, "--use_8bit", "use_8bit", False),
    (finetune.parse_args, "--gradient_checkpointing", "gradient_checkpointing", True),
    (finetune.parse_args, "--overwrite_output_dir", "overwrite_output_dir", False),
    (finetune.parse_args, "--local_files_only", "local_files_only", True),
    (cli_demo.parse_args, "--stream", "stream", False),
    (cli_demo.parse_args, "--use_8bit", "use_8bit", False),
    (cli_demo.parse_args, "--load_8bit", "use_8bit", False),
]


@pytest.mark.parametrize("spelling,expected", SPELLINGS, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
@pytest.mark.parametrize("parse,flag,dest,default", BOOL_FLAGS, ids=lambda x: x if isinstance(x, str) and
                         x.startswith("--") else None)
def test_boolean_spellings(parse, flag, dest, default, spelling, expected):
    argv = [s.format(f=flag, n=flag[2:]) for s in spelling]
    assert getattr(parse(argv), dest) is (default if expected is None else expected)


def test_load_8bit_false_as_in_the_original_readme():
    args = cli_demo.parse_args(["--load_8bit=False"])
    assert args.use_8bit is False and resolve_bits(args, default=16) == 16
    assert resolve_bits(cli_demo.parse_args(["--load_8bit"]), default=16) == 8


@pytest.mark.parametrize("value", ["maybe", "2", ""])
def test_bad_boolean_value_is_an_argparse_error(value, capsys):
    with pytest.raises(SystemExit) as e:
        finetune.parse_args([f"--train_on_inputs={value}"])
    assert e.value.code == 2
    assert "--train_on_inputs" in capsys.readouterr().err


def test_str2bool_never_uses_python_truthiness():
    assert str2bool("False") is False and str2bool("OFF") is False and str2bool(" no ") is False
    with pytest.raises(argparse.ArgumentTypeError):
        str2bool("Flase")


def test_output_path_is_an_alias_of_output_dir():
    assert finetune.parse_args(["--output_path", "runs/a"]).output_dir == "runs/a"
    assert finetune.parse_args(["--output_dir", "runs/b"]).output_dir == "runs/b"
    assert finetune.parse_args(["--micro_batch_size", "2"]).per_device_train_batch_size == 2


# ---------------------------------------------------------------------------------------------------------
# validate_args (finetune)
# ---------------------------------------------------------------------------------------------------------

def ft_args(tmp_path, *argv):
    return finetune.parse_args(["--output_dir", str(tmp_path / "out"), *argv])


def test_defaults_validate_and_resolve_to_4_bits(tmp_path):
    args = ft_args(tmp_path)
    finetune.validate_args(args)
    assert args.bits == 4
    assert not (tmp_path / "out").exists()  # validating writes nothing


@pytest.mark.parametrize("argv,bits", [(["--use_8bit"], 8), (["--use_8bit", "--bits", "8"], 8),
                                       (["--use_8bit=False", "--bits", "16"], 16), (["--bits", "16"], 16)])
def test_use_8bit_maps_to_bits(tmp_path, argv, bits):
    args = ft_args(tmp_path, *argv)
    finetune.validate_args(args)
    assert args.bits == bits


def test_use_8bit_contradicts_bits_4(tmp_path):
    with pytest.raises(UserError, match="--use_8bit/--load_8bit contradicts --bits 4"):
        finetune.validate_args(ft_args(tmp_path, "--use_8bit", "--bits", "4"))
    with pytest.raises(UserError, match="contradicts --bits 16"):
        resolve_bits(cli_demo.parse_args(["--load_8bit", "--bits", "16"]), default=16)


def test_bits_choices_enforced(capsys):
    with pytest.raises(SystemExit):
        finetune.parse_args(["--bits", "3"])
    assert "--bits" in capsys.readouterr().err


def test_validate_args_lists_every_bad_flag_in_one_message(tmp_path):
    missing = tmp_path / "missing.json"
    args = ft_args(tmp_path, "--cutoff_len", "0", "--lora_r", "-1", "--gradient_accumulation_steps", "0",
                   "--lora_dropout", "1", "--learning_rate", "0", "--num_train_epochs", "0",
                   "--val_set_size", "2.5", "--data_path", str(missing),
                   "--resume_from_checkpoint", str(tmp_path / "nockpt"), "--profile_steps", "5-2")
    with pytest.raises(UserError) as e:
        finetune.validate_args(args)
    message = str(e.value)
    for part in ("--cutoff_len must be >= 1, got 0", "--lora_r must be >= 1, got -1",
                 "--gradient_accumulation_steps must be >= 1, got 0", "--lora_dropout must be in [0, 1), got 1.0",
                 "--learning_rate must be > 0, got 0.0", "--num_train_epochs > 0 or --max_steps > 0",
                 "--val_set_size must be a count or a fraction in (0, 1), got 2.5",
                 f"--data_path: file not found: {missing}", "--resume_from_checkpoint: no such folder",
                 "--profile_steps: expected A-B with 1 <= A <= B (optimizer steps), got '5-2'"):
        assert part in message, (part, message)
    assert "\n" not in message


def test_data_path_takes_several_files_spaces_or_commas(tmp_path):
    a, b, c = (tmp_path / n for n in ("a.json", "b.jsonl", "c,d.json"))  # a name may hold a comma
    for path in (a, b, c):
        path.write_text("[]")
    args = ft_args(tmp_path, "--data_path", f"{a},{b}", str(c))
    finetune.validate_args(args)
    assert args.data_path == [str(a), str(b), str(c)]
    assert (args.data_format, args.overlong) == ("auto", "truncate")
    args = ft_args(tmp_path, "--data_path", f"{a}, {tmp_path / 'x.json'}", str(tmp_path / "y.parquet"))
    with pytest.raises(UserError) as e:
        finetune.validate_args(args)
    assert str(e.value) == (f"--data_path: file not found: {tmp_path / 'x.json'}; "
                            f"--data_path: file not found: {tmp_path / 'y.parquet'}")


@pytest.mark.parametrize("flag,good,bad", [("--data_format", ["alpaca", "sharegpt", "messages", "auto"], "openai"),
                                           ("--overlong", ["truncate", "drop"], "cut")])
def test_data_choice_flags(flag, good, bad, capsys):
    for value in good:
        assert getattr(finetune.parse_args([flag, value]), flag[2:]) == value
    with pytest.raises(SystemExit) as e:
        finetune.parse_args([flag, bad])
    assert e.value.code == 2 and f"invalid choice: '{bad}'" in capsys.readouterr().err


def test_max_steps_replaces_epochs(tmp_path):
    finetune.validate_args(ft_args(tmp_path, "--num_train_epochs", "0", "--max_steps", "5"))


def _fake_checkpoint(folder, complete=True):
    import torch
    from safetensors.torch import save_file
    folder.mkdir(parents=True)
    save_file({"lora_A": torch.ones(2, 2)}, str(folder / "adapter_model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt"):
        (folder / name).write_bytes(b"x")
    (folder / "trainer_state.json").write_text("{}")
    if complete:  # the mark MetaCallback writes last
        (folder / "training_meta.json").write_text("{}")


def test_output_dir_with_checkpoints_is_refused(tmp_path):
    _fake_checkpoint(tmp_path / "out" / "checkpoint-5")
    with pytest.raises(UserError) as e:
        finetune.validate_args(ft_args(tmp_path))
    message = str(e.value)
    assert str(tmp_path / "out") in message
    assert "--resume_from_checkpoint latest" in message and "--overwrite_output_dir" in message
    args = ft_args(tmp_path, "--resume_from_checkpoint", "latest")
    finetune.validate_args(args)
    assert args.resume_from_checkpoint == str(tmp_path / "out" / "checkpoint-5")
    finetune.validate_args(ft_args(tmp_path, "--overwrite_output_dir"))
    finetune.validate_args(ft_args(tmp_path, "--resume_from_checkpoint", str(tmp_path / "out" / "checkpoint-5")))


def test_resume_latest_skips_incomplete_checkpoints(tmp_path):
    _fake_checkpoint(tmp_path / "out" / "checkpoint-5")
    _fake_checkpoint(tmp_path / "out" / "checkpoint-10", complete=False)  # killed while being written
    (tmp_path / "out" / "checkpoint-15").mkdir()  # killed right after mkdir
    args = ft_args(tmp_path, "--resume_from_checkpoint", "latest")
    finetune.validate_args(args)
    assert args.resume_from_checkpoint == str(tmp_path / "out" / "checkpoint-5")


def test_resume_refuses_checkpoint_without_optimizer_state(tmp_path):
    _fake_checkpoint(tmp_path / "out" / "checkpoint-5")
    (tmp_path / "out" / "checkpoint-5" / "optimizer.pt").unlink()
    with pytest.raises(UserError, match="optimizer.pt"):
        finetune.validate_args(ft_args(tmp_path, "--resume_from_checkpoint", str(tmp_path / "out" / "checkpoint-5")))
    with pytest.raises(UserError, match="no complete checkpoint"):
        finetune.validate_args(ft_args(tmp_path, "--resume_from_checkpoint", "latest"))


def test_output_dir_without_checkpoints_is_fine(tmp_path):
    (tmp_path / "out" / "runs").mkdir(parents=True)
    (tmp_path / "out" / "notes.txt").write_text("x")
    finetune.validate_args(ft_args(tmp_path))


def test_resume_latest_without_checkpoints_is_refused_early(tmp_path):
    with pytest.raises(UserError, match="checkpoint"):
        finetune.validate_args(ft_args(tmp_path, "--resume_from_checkpoint", "latest"))


def test_generation_args_list_every_bad_flag():
    args = cli_demo.parse_args(["--max_new_tokens", "0", "--temperature", "-1", "--top_p", "0", "--top_k", "-2",
                                "--repetition_penalty", "0", "--num_gpus", "-1"])
    with pytest.raises(UserError) as e:
        check_generation_args(args)
    for flag in ("--max_new_tokens", "--temperature", "--top_p", "--top_k", "--repetition_penalty", "--num_gpus"):
        assert flag in str(e.value)
    check_generation_args(cli_demo.parse_args(["--temperature", "0"]))


def test_prompt_template_alias_in_chat_scripts():
    assert cli_demo.parse_args(["--prompt_template", "chat"]).input_pattern == "chat"
    assert cli_demo.parse_args(["--base_model", "x/y"]).model_path == "x/y"


# ---------------------------------------------------------------------------------------------------------
# --help of every script
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["finetune.py", "merge_lora.py", "cli_demo.py", "gradio_ui.py", "perplexity.py"])
def test_help_exits_zero(script):
    proc = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, check=False, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ") and proc.stderr == ""


def _run_then_list_heavy_modules(*lines):
    """Run `lines` as a fresh Python program in the repo; (its printed lines, which of torch / transformers /
    peft it had imported by the end)."""
    program = "\n".join(["import sys", *lines,
                          "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"])
    proc = subprocess.run([sys.executable, "-c", program], cwd=ROOT, check=False, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip().splitlines()
    return out[:-1], out[-1]


@pytest.mark.parametrize("script", ["finetune", "merge_lora", "cli_demo", "gradio_ui", "perplexity"])
def test_help_does_not_wait_for_torch(script):
    """--help comes before the heavy imports: importing a script and running its parser on --help loads neither
    torch, transformers nor peft (finetune.py --help took 15 s on a 2-core machine when it did)."""
    _, heavy = _run_then_list_heavy_modules(f"import {script}", "try:", f"    {script}.parse_args(['--help'])",
                                            "except SystemExit:", "    pass")
    assert heavy == "[]"


def test_flag_and_checkpoint_errors_come_before_torch(tmp_path):
    """finetune.py's flag checks, --resume_from_checkpoint and --output_dir included, run without torch."""
    out, heavy = _run_then_list_heavy_modules(
        "import finetune", "from utils.args import UserError",
        f"args = finetune.parse_args(['--output_dir', {str(tmp_path / 'none')!r}, '--resume_from_checkpoint', "
        "'latest'])",
        "try:", "    finetune.validate_args(args)", "except UserError as e:", "    print(e)")
    assert heavy == "[]" and "holds no complete checkpoint-N" in out[0]


def test_rotation_keeps_newest_complete_checkpoints_and_never_the_last_complete_one(tmp_path):
    from utils.checkpoints import rotate_checkpoints
    out = tmp_path / "out"
    for step in (2, 4, 6, 8):
        _fake_checkpoint(out / f"checkpoint-{step}")
    _fake_checkpoint(out / "checkpoint-3", complete=False)  # torn by an earlier crash
    deleted = rotate_checkpoints(str(out), keep=2, log=lambda *a: None)
    assert sorted(os.listdir(out)) == ["checkpoint-6", "checkpoint-8"]
    assert {os.path.basename(d) for d in deleted} == {"checkpoint-2", "checkpoint-3", "checkpoint-4"}

    # the newest checkpoint is not marked complete yet (the moment the Trainer's own rotation would have
    # deleted the older ones): with keep=1 the last complete one must survive
    _fake_checkpoint(out / "checkpoint-10", complete=False)
    rotate_checkpoints(str(out), keep=1, log=lambda *a: None)
    assert sorted(os.listdir(out)) == ["checkpoint-10", "checkpoint-8"]


def test_rotation_orders_by_step_not_file_time_and_protects_the_best(tmp_path):
    from utils.checkpoints import rotate_checkpoints
    out = tmp_path / "out"
    for step in (10, 9, 100, 20):  # created out of order: checkpoint-9 is newer on disk than checkpoint-100
        _fake_checkpoint(out / f"checkpoint-{step}")
    rotate_checkpoints(str(out), keep=1, protect=str(out / "checkpoint-9"), log=lambda *a: None)
    assert sorted(os.listdir(out)) == ["checkpoint-100", "checkpoint-9"]
    assert rotate_checkpoints(str(out), keep=0) == []  # 0 keeps everything


def _fake_adapter(folder, base):
    from safetensors.torch import save_file
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    save_file({"x": __import__("torch").ones(1)}, str(folder / "adapter_model.safetensors"))
    (folder / "training_meta.json").write_text(json.dumps({"base_model": str(base), "bits": 4}))
    return folder


def test_merge_refuses_the_base_models_own_folder_and_a_non_empty_target(tmp_path):
    import merge_lora
    base = tmp_path / "base-model"
    base.mkdir()
    (base / "config.json").write_text("{}")
    adapter = _fake_adapter(tmp_path / "adapter", base)
    args = merge_lora.parse_args(["--lora_model", str(adapter), "--output_dir", str(tmp_path),
                                  "--model_name", "base-model"])
    with pytest.raises(UserError, match="base model's own folder"):
        merge_lora.main(args)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "model.safetensors").write_text("precious")
    args = merge_lora.parse_args(["--lora_model", str(adapter), "--output_dir", str(tmp_path),
                                  "--model_name", "taken"])
    with pytest.raises(UserError, match="--overwrite"):
        merge_lora.main(args)
    assert (tmp_path / "taken" / "model.safetensors").read_text() == "precious"
    assert sorted(os.listdir(base)) == ["config.json"]


def test_plain_python_on_several_gpus_keeps_the_printed_batch():
    """The HF Trainer multiplies the micro-batch by the visible GPU count even when it does not replicate a
    4-bit model; finetune.py keeps one GPU per process, so the effective batch it prints is the one trained."""
    from transformers import TrainingArguments

    from utils.training import one_gpu_per_process
    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=4, use_cpu=True, report_to="none")
    args._n_gpu = 2  # what the Trainer sees on a 2-GPU machine without a launcher
    assert args.train_batch_size == 8
    one_gpu_per_process(args)
    assert args.n_gpu == 1 and args.train_batch_size == 4


@pytest.mark.parametrize("env, sharded, chosen", [({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, None, 1),
                                                   ({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "fsdp", 1),
                                                   ({"WORLD_SIZE": "1", "LOCAL_RANK": "0"}, None, None),
                                                   ({}, None, None)])
def test_each_launched_process_selects_its_own_gpu_first(monkeypatch, env, sharded, chosen):
    """Under torchrun / accelerate launch each process makes its own GPU the current one before loading: kernels
    launched eagerly (the Triton NF4 kernel) run on the current GPU, and on rank 1 they failed with cuda:1
    tensors while GPU 0 was current. Under FSDP / ZeRO-3 accelerate's PartialState does it. No GPU here: the
    calls are recorded."""
    import accelerate

    from utils import modeling
    for name in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(modeling.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(modeling.torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(modeling, "sharding_here", lambda: sharded)
    monkeypatch.setattr(accelerate, "PartialState", lambda: calls.append(("PartialState",)))
    assert modeling.select_process_gpu() == chosen
    expected = [] if chosen is None else [("PartialState",)] if sharded else [("set_device", chosen)]
    assert calls == expected


@pytest.mark.parametrize("engine, processes, device_map", [("fsdp", "2", {"": "cpu"}), ("fsdp", "1", None),
                                                          ("deepspeed", "2", None)])
def test_fsdp_training_loads_into_cpu_memory(monkeypatch, engine, processes, device_map):
    """Under FSDP the model is loaded (and quantized) in CPU memory, and FSDP moves it to the GPUs one unit at
    a time: loaded on the GPU, every process held the whole 4-bit model first. One process shards nothing and
    loads onto its GPU as before; ZeRO-3 places the model itself."""
    from utils import modeling
    monkeypatch.setattr(modeling, "sharding_here", lambda: engine)
    monkeypatch.setenv("WORLD_SIZE", processes)
    chosen, cap, where = modeling.placement(training=True)
    assert chosen == device_map and cap is None and where.startswith(engine.upper())


def test_fsdp_loading_leaves_no_cpu_device_map_for_accelerate(monkeypatch, tiny_llama_dir):
    """accelerate refuses to train a 4-bit model whose hf_device_map names another device than the process's
    GPU; under FSDP the CPU map only says where loading happened, so load_model drops it (transformers 5.24
    sets none for a single-device map; an older one that does is stood in for here)."""
    import transformers

    from utils import modeling
    monkeypatch.setattr(modeling, "sharding_here", lambda: "fsdp")
    monkeypatch.setenv("WORLD_SIZE", "2")
    original = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        model.hf_device_map = dict(kwargs["device_map"])
        return model
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(from_pretrained))
    model, _, info = modeling.load_model(tiny_llama_dir, bits=4, training=True)
    assert info["where"].startswith("FSDP") and not hasattr(model, "hf_device_map")
    assert model.get_input_embeddings().weight.dtype == modeling.compute_dtype()


def test_loading_on_the_cpu_uses_this_process_share_of_the_cores(monkeypatch):
    """torchrun sets OMP_NUM_THREADS=1; quantizing a model on the CPU with one thread per process would take
    minutes, so loading raises torch's thread count to the process's share of the cores, then puts it back."""
    from utils.modeling import cpu_threads_for_loading
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        with cpu_threads_for_loading(True) as threads:
            assert threads == torch.get_num_threads() == 4
        assert torch.get_num_threads() == 1
        with cpu_threads_for_loading(False) as threads:
            assert threads == 1
    finally:
        torch.set_num_threads(before)


def test_peak_report_finds_what_is_alive_at_the_memory_peak():
    """utils/profiling.py: peak_report on a made-up allocator trace (the form torch.cuda.memory._snapshot()
    gives): the peak, and the blocks alive at that moment grouped by where they were allocated."""
    from utils.profiling import peak_report

    def frame(file, line, name):
        return {"filename": file, "line": line, "name": name}
    unit = [frame("/x/torch/distributed/fsdp/_flat_param.py", 10, "unshard"), frame("/x/trainer.py", 5, "step")]
    act = [frame("/x/torch/nn/modules/module.py", 1, "_call_impl"), frame("/x/modeling_llama.py", 7, "forward")]
    mib = 2**20
    trace = [{"action": "alloc", "addr": 1, "size": 100 * mib, "frames": unit},
             {"action": "alloc", "addr": 2, "size": 30 * mib, "frames": act},
             {"action": "alloc", "addr": 3, "size": 30 * mib, "frames": act},  # the peak: 160 MiB
             {"action": "free_requested", "addr": 1, "size": 100 * mib},
             {"action": "alloc", "addr": 4, "size": 120 * mib, "frames": unit}]  # 180 MiB: the new peak
    report = peak_report(trace, base=2**30, top=5)
    assert report["before_gib"] == 1.0 and report["peak_gib"] == pytest.approx(1 + 180 / 1024)
    assert report["alive_at_peak"] == [(120.0, 1, "_flat_param.py:10 unshard <- trainer.py:5 step"),
                                       (60.0, 2, "modeling_llama.py:7 forward")]


@pytest.mark.parametrize("text, window", [("3", (3, 3)), ("2-4", (2, 4)), ("0-1", None), ("a-b", None),
                                          ("1-2-3", None), ("", None)])
def test_profile_steps_parsing(text, window):
    from utils.profiling import parse_steps
    if window is None:
        with pytest.raises(ValueError, match="expected A-B"):
            parse_steps(text)
    else:
        assert parse_steps(text) == window
