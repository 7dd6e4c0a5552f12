"""Out of memory inside one reply on a real GPU (skipped without one): the allocator's own error, raised in the
middle of a reply, reaches the caller as ReplyOutOfMemory, the memory the reply held is given back (allocated
returns to its level before the reply, the CUDA cache is emptied), and the next reply runs.

    python -m pytest tests/test_gpu_serving.py -s      # on a GPU machine
"""

import pytest
import torch
from test_gpu import small_llama  # noqa: F401  (the fixture: a small random LLaMA and its tokenizer)

import cli_demo

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_out_of_memory_in_a_reply_gives_its_memory_back(small_llama):  # noqa: F811
    from utils.chat import load_chat_model
    from utils.generation import ReplyOutOfMemory
    folder, _ = small_llama
    args = cli_demo.parse_args(["--model_path", str(folder), "--num_gpus", "1", "--input_pattern", "alpaca",
                                "--temperature", "0", "--max_new_tokens", "32"])
    chat = load_chat_model(args)
    query = "hello " * 300
    assert "".join(chat.stream([], query, args))  # warm-up: the allocator's cache now holds a reply's blocks
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()

    forward_passes = []

    def ask_for_too_much(*_):  # in the third forward pass, with the prompt's KV cache held
        forward_passes.append(1)
        if len(forward_passes) == 3:
            torch.empty(2**50, dtype=torch.uint8, device=chat.model.device)  # 1 PiB: the allocator refuses

    hook = chat.model.register_forward_hook(ask_for_too_much)
    try:
        with pytest.raises(ReplyOutOfMemory, match="out of memory while generating this reply"):
            "".join(chat.stream([], query, args))
    finally:
        hook.remove()
    torch.cuda.synchronize()
    print(f"\nallocated {allocated / 2**20:.1f} -> {torch.cuda.memory_allocated() / 2**20:.1f} MiB, "
          f"reserved {reserved / 2**20:.1f} -> {torch.cuda.memory_reserved() / 2**20:.1f} MiB")
    assert len(forward_passes) == 3
    assert torch.cuda.memory_allocated() == allocated
    assert torch.cuda.memory_reserved() < reserved
    assert "".join(chat.stream([], query, args))
