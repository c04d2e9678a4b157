"""Host memory: quantized loads keep the vocabulary tables mapped, and glibc is told what to do with freed memory."""
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not Path("/proc/self/maps").exists(),
                                reason="mallopt and /proc/self/maps are glibc's and Linux's")


def mapped_file(tensor):
    """The file whose mapping holds this tensor's memory, or None for anonymous memory."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) > 5 and fields[5].startswith("/") else None
    return None


@glibc_only
def test_quantized_load_keeps_vocabulary_tables_mapped_and_changes_no_logit(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from utils.model import load_model, quantization_config

    ours = load_model(tiny_model_dir, torch.float32, 4)
    assert sum(type(m).__name__ == "Linear4bit" for m in ours.modules()) == 14
    for table in (ours.get_input_embeddings().weight, ours.get_output_embeddings().weight):
        assert (mapped_file(table) or "").endswith(".safetensors")
    assert mapped_file(ours.model.layers[0].mlp.up_proj.weight) is None  # quantized weights live in memory

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, device_map={"": "cpu"},
                                                 quantization_config=quantization_config(4, torch.float32))
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, plain(ids).logits)


def test_quantized_read_goes_through_transformers_safe_open(tiny_model_dir, capsys):
    """The memory-saving read replaces transformers' modeling_utils.safe_open while a quantized model loads. It
    must see every shard opened (the library behaviour it relies on), and say so when it no longer does."""
    import transformers.modeling_utils as modeling_utils

    from utils.model import _loading_to_quantize, load_model

    with _loading_to_quantize(None) as opened:
        load_model(tiny_model_dir, torch.float32, 4)
    assert ([Path(p).name for p in opened][:1] == ["model.safetensors"]
            and "did not apply" not in capsys.readouterr().err)
    with _loading_to_quantize(None):  # a load that opens no shard through it, as after a change in transformers
        pass
    assert "the memory-saving read of quantized shards did not apply" in capsys.readouterr().err
    import safetensors

    assert modeling_utils.safe_open is safetensors.safe_open  # and the original is back


@glibc_only
def test_freed_memory_is_kept_under_glibc():
    from utils.memory import reuse_freed_memory

    assert reuse_freed_memory() is True


FRAGMENTING = """
import contextlib, sys, torch
sys.path.insert(0, {root!r})
from utils.memory import proc_bytes, returning_freed_memory

torch.ones(8 << 20)  # freed at once: glibc now serves anything up to 32 MB from its heap
kept, before = [], proc_bytes("/proc/self/status", "VmRSS")
with returning_freed_memory() if {returning} else contextlib.nullcontext():
    for layer in range(6):
        for mb in (8, 1, 1, 8, 22, 22, 22):  # a 16-bit weight, then what is kept of it: as a 1B model is quantized
            temporary = torch.ones(mb << 18)
            kept.append(torch.ones(mb << 16))
            del temporary
    print((proc_bytes("/proc/self/status", "VmRSS") - before) >> 20, sum(k.numel() * 4 for k in kept) >> 20)
"""


@glibc_only
def test_returning_freed_memory_stops_the_heap_holding_temporaries():
    def growth(returning):
        script = FRAGMENTING.format(root=str(ROOT), returning=returning)
        return map(int, subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                       check=True).stdout.split())

    held, kept = growth(False)
    if held < kept + 16:
        pytest.skip(f"this glibc held no freed temporaries by itself ({held} MB for {kept} MB kept); "
                    "nothing to compare against")
    returned, kept = growth(True)
    assert returned < kept + 16, (f"{returned - kept} MB of freed temporaries stayed resident "
                                  f"({held - kept} MB without returning_freed_memory)")
