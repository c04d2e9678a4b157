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
    from utils.core.host import file_mappings

    address = tensor.data_ptr()
    return next((path for start, end, path in file_mappings() if start <= address < end), None)


@glibc_only
def test_quantized_load_keeps_vocabulary_tables_mapped_and_changes_no_logit(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from utils.model.loading import load_model, quantization_config

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

    from utils.model.loading import _loading_to_quantize, load_model

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
    from utils.core.host import reuse_freed_memory

    assert reuse_freed_memory() is True


FRAGMENTING = """
import contextlib, sys, torch
sys.path.insert(0, {root!r})
from utils.core.host import proc_bytes, returning_freed_memory

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


def test_sharded_training_on_cpu_returns_freed_memory_from_before_loading(tiny_model_dir, monkeypatch):
    """ZeRO-3 and FSDP2 gather each weight and free it at every use. A heap told to keep freed memory (the
    one-device choice, reuse_freed_memory) held 4-8 GB a rank of them on the 1.1B bench model, whose ranks need
    about 2.3 GB (bench/RESULTS.md): sharded runs return freed memory, from before the load on."""
    import utils.train.setup
    from utils.train.setup import lora_for_training

    calls, load = [], utils.train.setup.load_model
    monkeypatch.setattr(utils.train.setup, "reuse_freed_memory", lambda: calls.append("keep"))
    monkeypatch.setattr(utils.train.setup, "return_freed_memory", lambda: calls.append("return"))
    monkeypatch.setattr(utils.train.setup, "load_model", lambda *a, **k: calls.append("load") or load(*a, **k))
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["auto"], "modules_to_save": []}
    for sharding, expected in ((None, ["load", "keep"]), ("zero2", ["load", "keep"]), ("fsdp2", ["return", "load"]),
                               ("zero3", ["return", "load"])):
        calls.clear()
        lora_for_training(tiny_model_dir, torch.float32, 16, "cpu", dict(lora), False, 64, 32, sharding=sharding)
        assert calls == expected, sharding


@glibc_only
def test_dropped_file_pages_leave_rss_and_keep_their_values(tmp_path):
    """drop_file_pages (FSDP2's rank 0 drops each weight's mapped pages once sent) takes a mapped weight's pages
    out of RSS and every value stays; a weight with a page written to, or in anonymous memory, is left alone."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from utils.core.host import drop_file_pages, file_mappings, proc_bytes

    config = LlamaConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    up, down = model.model.layers[0].mlp.up_proj.weight.detach(), model.model.layers[0].mlp.down_proj.weight.detach()
    assert (mapped_file(up) or "").endswith(".safetensors")  # transformers maps a checkpoint in its dtype
    values, before = up.clone(), proc_bytes("/proc/self/status", "RssFile")
    assert drop_file_pages(up, file_mappings()) >= up.numel() * 4
    assert before - proc_bytes("/proc/self/status", "RssFile") >= 3 << 20  # of its 4 MB
    assert torch.equal(up, values)

    down[0, 0] += 1  # a written page is a private copy now: dropping it would lose the write
    written = down[0, 0].item()
    assert drop_file_pages(down, file_mappings()) == 0 and down[0, 0].item() == written
    assert drop_file_pages(up.clone(), file_mappings()) == 0
