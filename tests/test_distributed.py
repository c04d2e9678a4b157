"""Beyond one device, on this CPU: DDP (torchrun), DeepSpeed ZeRO-2 and ZeRO-3, FSDP2 (accelerate launch), each
with 2 processes over gloo, against one process with the same global batch; a ZeRO-3 resume; 2 "nodes".

Each distributed run is a real launch of finetune.py, as a user types it. The gradients are compared through the
weights after plain SGD steps (lr 1, no clipping, no schedule): Adam's update would hide a constant factor, such as
gradients summed over ranks instead of averaged.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
needs_deepspeed = pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed (requirements-dev.txt)")
ENGINES = ("ddp", "zero2", "zero3", "fsdp2")
SGD = ["--optim=sgd", "--learning_rate=1", "--max_steps=2"]
ADAMW = ["--optim=adamw_torch", "--learning_rate=0.01", "--max_steps=3"]
# fp32 sums in another order (per rank, then reduced): the weights agree to this. After AdamW, an element whose
# gradient is near 0 turns a 1e-7 difference into a larger step (Adam divides by its size): 1% of the lr
RTOL, ATOL, ADAMW_ATOL = 1e-4, 1e-6, 1e-4


def free_port():
    with socket.socket() as sock:  # several suites may run at once on one machine
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(engine, model, data, out, *flags, batch=2):
    """finetune.py under `engine` ("single": one process), as a user launches it; returns the finished process."""
    common = [f"--base_model={model}", f"--data_path={data}", f"--output_dir={out}", "--precision=fp32",
              f"--per_device_train_batch_size={batch}", "--save_steps=1", "--logging_steps=1", "--report=False",
              "--lr_scheduler_type=constant", "--warmup_ratio=0", "--max_grad_norm=0", "--seed=0", *flags]
    script = str(ROOT / "finetune.py")
    if engine == "single":
        cmd = [sys.executable, script]
    elif engine == "fsdp2":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"), "--num_processes=2",
               f"--main_process_port={free_port()}", script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               script] + ([f"--deepspeed={engine}"] if engine.startswith("zero") else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd + common, capture_output=True, text=True, timeout=600, cwd=out.parent, env=env)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def adapter(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def losses(folder):
    state = json.loads((folder / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def assert_same_weights(got, want, atol=ATOL):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].abs().sum() > 0 or want[name].abs().sum() == 0, f"{name} is empty"
        torch.testing.assert_close(got[name], want[name], rtol=RTOL, atol=atol, msg=name)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist-data") / "data.json"
    records = [{"instruction": f"count to {i % 7 + 1}", "input": "" if i % 3 else f"in {'中文' if i % 2 else 'words'}",
                "output": " ".join(str(n) for n in range(1, i % 7 + 2))} for i in range(32)]
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sharded_tiny(tiny_model_dir, tmp_path_factory):
    """tiny_model_dir's weights, moved off the seed's initial values (a weight the load skipped would otherwise come
    back as the same random init), in 10 MB shards (3 files): ZeRO-3 fills its partitions a shard at a time
    (utils.model.loading._zero3_loading_a_shard_at_a_time), so a shard it skipped or misread changes the gradients."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-sharded")
    model, noise = AutoModelForCausalLM.from_pretrained(tiny_model_dir), torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=noise))
    model.save_pretrained(path, max_shard_size="10MB")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) > 1
    return path


@pytest.fixture(scope="module")
def single(sharded_tiny, data, tmp_path_factory):
    """The references: one process with the global batch (4), plain SGD and AdamW, from sharded_tiny."""
    base = tmp_path_factory.mktemp("single")
    launch("single", sharded_tiny, data, base / "sgd", *SGD, batch=4)
    launch("single", sharded_tiny, data, base / "adamw", *ADAMW, batch=4)
    return base


@needs_deepspeed
@pytest.mark.parametrize("engine", ENGINES)
def test_gradients_and_adamw_equal_one_process(engine, single, sharded_tiny, data, tmp_path):
    """2 processes x 2 examples = 1 process x 4: after each plain SGD step (so, the gradients) and after 3 AdamW
    steps (the weights and every logged loss), the LoRA weights equal the single process's; the engine ran. All
    start from sharded_tiny."""
    sgd = tmp_path / "sgd"
    proc = launch(engine, sharded_tiny, data, sgd, *SGD)
    assert f"engine: {engine}" in proc.stdout or engine == "ddp", proc.stdout[-2000:]
    for step in (1, 2):  # step 1: lora_B's gradient (lora_B starts at 0); step 2: lora_A's too
        assert_same_weights(adapter(sgd / f"checkpoint-{step}"), adapter(single / "sgd" / f"checkpoint-{step}"))
    marker = {"zero2": "global_step1", "zero3": "global_step1", "fsdp2": "pytorch_model_fsdp_0"}.get(engine)
    assert marker is None or (sgd / "checkpoint-1" / marker).exists(), sorted(os.listdir(sgd / "checkpoint-1"))
    adamw = tmp_path / "adamw"
    launch(engine, sharded_tiny, data, adamw, *ADAMW)
    torch.testing.assert_close(losses(adamw / "checkpoint-3"), losses(single / "adamw" / "checkpoint-3"),
                               rtol=RTOL, atol=ATOL)
    assert_same_weights(adapter(adamw), adapter(single / "adamw"), ADAMW_ATOL)  # whole, not Size([0])
    config = json.loads((adamw / "run_config.json").read_text())
    assert config["training"]["engine"] == (None if engine == "ddp" else engine)
    if engine in ("zero3", "fsdp2"):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sharded_tiny), adamw)
        assert sum(p.abs().sum() for n, p in model.named_parameters() if "lora_B" in n) > 0


@needs_deepspeed
def test_zero3_resume_gives_the_next_loss(single, tiny_model_dir, data, tmp_path):
    """A ZeRO-3 run resumed from its step-2 checkpoint (sharded optimizer state) logs the uninterrupted run's step 3."""
    whole = tmp_path / "whole"
    launch("zero3", tiny_model_dir, data, whole, *ADAMW)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    launch("zero3", tiny_model_dir, data, resumed, *ADAMW, "--resume_from_checkpoint=True")
    torch.testing.assert_close(losses(resumed / "checkpoint-3")[-1], losses(whole / "checkpoint-3")[-1],
                               rtol=RTOL, atol=ATOL)
    assert_same_weights(adapter(resumed), adapter(whole), ADAMW_ATOL)


def test_two_nodes_on_one_machine(tiny_model_dir, data, tmp_path):
    """torchrun --nnodes=2 on 127.0.0.1, one process per "node": both train; only global rank 0 writes."""
    out, port = tmp_path / "nodes", free_port()
    common = [f"--base_model={tiny_model_dir}", f"--data_path={data}", f"--output_dir={out}", "--precision=fp32",
              "--per_device_train_batch_size=2", "--max_steps=2", "--save_steps=2", "--report=False"]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}",
                               str(ROOT / "finetune.py"), *common],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
             for rank in (0, 1)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-3000:] for r in results]
    assert "wrote the adapter" in results[0][0] and "wrote the adapter" not in results[1][0]
    assert "processes: 2" in results[0][0]
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2


# --- without launching ------------------------------------------------------------------------------------------------

def test_deepspeed_not_installed_is_one_sentence(monkeypatch):
    import importlib.util

    from utils.core.errors import UserError
    from utils.model.distributed import DEEPSPEED, deepspeed_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(UserError, match=rf"^--deepspeed needs DeepSpeed, which is not installed: pip install "
                                        rf"{DEEPSPEED}$"):
        deepspeed_config("zero3")
    assert DEEPSPEED.split("==")[1] in (ROOT / "requirements-dev.txt").read_text()


def test_shipped_configs_name_a_zero_stage_and_leave_sizes_to_the_trainer():
    for name, stage in (("zero2", 2), ("zero3", 3), ("zero3_offload", 3)):
        config = json.loads((ROOT / "configs" / "deepspeed" / f"{name}.json").read_text())
        assert config["zero_optimization"]["stage"] == stage
        assert config["train_micro_batch_size_per_gpu"] == config["gradient_accumulation_steps"] == "auto"
    import yaml

    fsdp = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp2.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2


def test_fsdp1_two_engines_and_sharded_dpo_are_refused(monkeypatch):
    from utils.model.distributed import sharding_problem

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    assert sharding_problem(None, 16).startswith("FSDP1 is not supported: set fsdp_version: 2")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert sharding_problem(None, 16) is None
    assert sharding_problem("zero3.json", 16).startswith("--deepspeed and an accelerate FSDP config exclude")
    assert sharding_problem(None, 8).startswith("--use_8bit cannot be sharded")
    assert sharding_problem(None, 16, "dpo").startswith("--stage=dpo does not run under FSDP2 yet")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    configs = ROOT / "configs" / "deepspeed"
    assert sharding_problem(str(configs / "zero3.json"), 16, "dpo").startswith("--stage=dpo does not run under ZeRO-3")
    assert sharding_problem(str(configs / "zero2.json"), 16, "dpo") is None
    assert sharding_problem(str(configs / "zero3.json"), 16, "sft") is None


def test_sharded_qlora_stores_4bit_weights_in_the_compute_dtype():
    from utils.model.loading import quantization_config

    assert quantization_config(4, torch.bfloat16, sharded=True).bnb_4bit_quant_storage == torch.bfloat16
    assert quantization_config(4, torch.bfloat16).bnb_4bit_quant_storage == torch.uint8


def test_num_gpus_spreads_over_the_first_n_gpus(monkeypatch):
    """--num_gpus: from_pretrained gets a device map and max_memory for those GPUs (the older code passed
    {"max_memory": ...} as the device map itself, which from_pretrained rejects)."""
    from types import SimpleNamespace

    from utils.model.loading import device_map_for

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=(i + 1) << 30))
    assert device_map_for(1) == ({"": 0}, None)
    assert device_map_for(2) == ("balanced", {0: 1 << 30, 1: 2 << 30})
    assert device_map_for(8) == ("balanced", {i: (i + 1) << 30 for i in range(4)})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_map_for(2) == (None, None)


@pytest.fixture
def one_process_group(tmp_path):
    """torch.distributed with a gloo group of this one process, torn down after the test if it still stands."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("fails", [False, True])
def test_a_finished_run_leaves_its_process_group(fails, one_process_group, monkeypatch):
    """run_cli tears the process group down after main succeeded (gloo's threads left to the interpreter's exit
    aborted a rank, pytorch #190489), and leaves it alone after a UserError: the other ranks may wait in a
    collective, and a barrier there would hang."""
    from utils.core.cli import run_cli
    from utils.core.errors import UserError

    def main():
        if fails:
            raise UserError("no.")

    monkeypatch.setattr(sys, "argv", ["finetune.py"])
    if fails:
        with pytest.raises(SystemExit):
            run_cli(main)
    else:
        run_cli(main)
    assert one_process_group.is_initialized() is fails


def test_zero3_shard_at_a_time_relies_on_transformers_filling_parts():
    """What utils.model.loading._zero3_loading_a_shard_at_a_time replaces: transformers' ZeRO-3 branch merges every
    shard into one state dict and hands it to the module-level _load_state_dict_into_zero3_model(model, state_dict,
    load_config), which fills only the parameters the dict holds (built for sharded checkpoints) and returns
    (errors, missing keys). If this changes, the replacement must be rewritten or removed."""
    import inspect

    import transformers.modeling_utils as modeling_utils
    from transformers.integrations import deepspeed as hf_deepspeed

    source = inspect.getsource(modeling_utils)
    assert "merged_state_dict.update(" in source
    assert "_load_state_dict_into_zero3_model(model, state_dict, load_config)" in source
    assert modeling_utils._load_state_dict_into_zero3_model is hf_deepspeed._load_state_dict_into_zero3_model
    fill = inspect.getsource(hf_deepspeed._load_state_dict_into_zero3_model)
    assert list(inspect.signature(hf_deepspeed._load_state_dict_into_zero3_model).parameters) == [
        "model_to_load", "state_dict", "load_config"]
    assert "if k in state_dict:" in fill and "missing_keys.discard(k)" in fill and "return error_msgs" in fill
    assert list(inspect.signature(modeling_utils.load_state_dict).parameters)[:4] == [
        "checkpoint_file", "map_location", "weights_only", "disable_mmap"]


def test_fsdp2_load_asks_for_each_weight_once_after_sending_the_one_before(one_process_group, monkeypatch):
    """What utils.model.distributed.training_under relies on to drop each sent weight's mapped pages on rank 0:
    accelerate's fsdp2_load_full_state_dict asks the full state dict for each weight once (full_sd[name]), in the
    model's order, and has broadcast it before it asks for the next. If this changes, PagesDroppedOnceSent must
    be rewritten or removed."""
    import copy
    from types import SimpleNamespace

    from accelerate.utils import fsdp_utils
    from torch.distributed.fsdp import fully_shard

    dist, sent, asked = one_process_group, [], []
    broadcast = dist.broadcast
    monkeypatch.setattr(dist, "broadcast", lambda tensor, *a, **k: sent.append(1) or broadcast(tensor, *a, **k))

    class Recording(dict):
        def __getitem__(self, key):
            asked.append((key, len(sent)))
            return super().__getitem__(key)

    whole = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model = copy.deepcopy(whole).to("meta")
    fully_shard(model)
    fsdp_utils.fsdp2_load_full_state_dict(SimpleNamespace(is_main_process=True, device=torch.device("cpu")),
                                          model, Recording(whole.state_dict()))
    assert asked == [(name, i) for i, name in enumerate(whole.state_dict())]
    assert all(torch.equal(value.full_tensor(), whole.state_dict()[name])
               for name, value in model.state_dict().items())


def test_zero3_gathers_at_most_two_layers_where_the_config_says_auto():
    """Our zero3 configs leave stage3_max_live_parameters and stage3_max_reuse_distance "auto": set before the
    model loads, to two decoder layers' parameters and 0, in the config the Trainer and zero.Init read. A user's
    numbers stay; other stages are left alone."""
    from transformers import LlamaConfig
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from utils.model.distributed import decoder_layer_parameters, size_zero3_gathering

    shape = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4)
    layer = 2048 * 2048 * 2 + 2048 * 256 * 2 + 3 * 2048 * 5632  # q, o; k, v; gate, up, down: TinyLlama's layer
    assert decoder_layer_parameters(shape) == layer
    try:
        shipped = HfDeepSpeedConfig(json.loads((ROOT / "configs" / "deepspeed" / "zero3.json").read_text()))
        assert size_zero3_gathering(shape) == {"stage3_max_live_parameters": 2 * layer, "stage3_max_reuse_distance": 0}
        assert shipped.config["zero_optimization"]["stage3_max_live_parameters"] == 2 * layer
        own = HfDeepSpeedConfig({"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 5e8,
                                                       "stage3_max_reuse_distance": "auto"}})
        assert size_zero3_gathering(shape) == {"stage3_max_reuse_distance": 0}
        assert own.config["zero_optimization"]["stage3_max_live_parameters"] == 5e8
        stage2 = HfDeepSpeedConfig({"zero_optimization": {"stage": 2}})
        assert size_zero3_gathering(shape) is None and stage2.config == {"zero_optimization": {"stage": 2}}
    finally:
        unset_hf_deepspeed_config()
