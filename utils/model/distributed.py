"""Training beyond one device: which engine shards the model (DeepSpeed ZeRO through --deepspeed, FSDP2 through
`accelerate launch --config_file configs/accelerate/fsdp2.yaml`), what the fast path does under it, and the
trainable weights gathered whole for saving.

The engines themselves are the Trainer's (its DeepSpeed and accelerate integrations); nothing here shards.
"""
import contextlib
import json
import os
import warnings
from pathlib import Path

from utils.core.errors import UserError
from utils.core.files import ROOT
from utils.core.host import drop_file_pages, file_mappings

DEEPSPEED = "deepspeed==0.19.8"  # the version tested here (requirements-dev.txt)
CONFIGS = ROOT / "configs"


def deepspeed_config(path):
    """--deepspeed: a DeepSpeed JSON config whose ZeRO stage is 0-3, with deepspeed installed; returns the
    path, resolved (a name such as zero3 means configs/deepspeed/zero3.json)."""
    if path is None:
        return None
    if not isinstance(path, str) or not path.strip():
        raise UserError(f"--deepspeed must name a DeepSpeed JSON config, e.g. configs/deepspeed/zero3.json, "
                        f"got {path!r}.")
    file = Path(path).expanduser()
    shipped = CONFIGS / "deepspeed" / f"{path}.json"
    file = shipped if not file.is_file() and shipped.is_file() else file
    if not file.is_file():
        names = ", ".join(p.stem for p in sorted((CONFIGS / "deepspeed").glob("*.json")))
        raise UserError(f"--deepspeed={path} does not exist; pass a DeepSpeed JSON config, or one of ours: {names} "
                        f"(configs/deepspeed/).")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"--deepspeed={path} is not valid JSON ({e}); fix it, or start from "
                        f"configs/deepspeed/zero3.json.") from None
    stage = zero_stage(config)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"--deepspeed={path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}.")
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"--deepspeed needs DeepSpeed, which is not installed: pip install {DEEPSPEED}")
    import torch

    if not torch.cuda.is_available():  # DeepSpeed on CPU processes (gloo), without its warning that it guessed so
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return str(file.resolve())


def zero_stage(config):
    """The ZeRO stage of a DeepSpeed config (its parsed JSON, or the path of a checked one); None if not a dict."""
    if isinstance(config, (str, Path)):
        config = json.loads(Path(config).read_text(encoding="utf-8"))
    return config.get("zero_optimization", {}).get("stage", 0) if isinstance(config, dict) else None


def decoder_layer_parameters(model_config):
    """The parameters of one decoder layer of a transformers config (attention, and the MLP of every expert), or
    None where the config lacks the sizes."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden, heads = getattr(text, "hidden_size", None), getattr(text, "num_attention_heads", None)
    mlp = getattr(text, "moe_intermediate_size", None) or getattr(text, "intermediate_size", None)
    if not (isinstance(hidden, int) and isinstance(heads, int) and isinstance(mlp, int)) or heads <= 0:
        return None
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None) or 1
    return hidden * head_dim * 2 * (heads + kv_heads) + 3 * hidden * mlp * experts


def size_zero3_gathering(model_config):
    """Set a ZeRO-3 config's "auto" stage3_max_live_parameters and stage3_max_reuse_distance (ours are:
    configs/deepspeed/zero3*.json) for this model, in the config the Trainer and zero.Init read, before the model
    loads: at most two decoder layers' weights gathered at a time (the one computing, the next prefetched), and
    none kept for reuse. DeepSpeed's default for both, 1e9, kept every weight of a 1.1B model gathered through a
    step (bench/RESULTS.md, scale-out), and is about one layer of a 70B model. Returns what it
    set ({} when nothing is "auto"), or None when the run is not ZeRO-3."""
    from transformers.integrations.deepspeed import deepspeed_config as hf_config

    zero = (hf_config() or {}).get("zero_optimization", {})
    if zero.get("stage") != 3:
        return None
    layer = decoder_layer_parameters(model_config)
    sizes = {"stage3_max_live_parameters": 2 * layer if layer else 10**9,  # DeepSpeed's default otherwise
             "stage3_max_reuse_distance": 0}
    chosen = {key: value for key, value in sizes.items() if zero.get(key) == "auto"}
    zero.update(chosen)
    return chosen


def launched_fsdp_version():
    """The FSDP version `accelerate launch` set up for this process (its FSDP config), or None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("1", "true"):
        return None
    return int(os.environ.get("FSDP_VERSION", "1"))


def sharding_problem(deepspeed, bits, stage="sft"):
    """What keeps --deepspeed (a checked path, or None) or an accelerate FSDP launch from running with this
    base and --stage, as one sentence; None when nothing does."""
    fsdp = launched_fsdp_version()
    if deepspeed and fsdp:
        return "--deepspeed and an accelerate FSDP config exclude each other; pick one engine"
    if fsdp == 1:
        return ("FSDP1 is not supported: set fsdp_version: 2 in the accelerate config "
                "(start from configs/accelerate/fsdp2.yaml)")
    if bits == 8 and (fsdp or deepspeed):
        return ("--use_8bit cannot be sharded by FSDP or DeepSpeed; use --use_4bit (QLoRA, sharded in the "
                "compute dtype) or a 16-bit base")
    if stage == "dpo" and (fsdp or (deepspeed and zero_stage(deepspeed) == 3)):
        # the reference pass runs before the engine has wrapped the model, when a rank holds only its shards
        return (f"--stage=dpo does not run under {'FSDP2' if fsdp else 'ZeRO-3'} yet (its reference pass reads "
                "whole weights before training); use --deepspeed=zero2, or torchrun without --deepspeed")
    return None


def engine(args):
    """What shards the model in this run, from the Trainer's arguments: "zero3", "zero2" (or zero1/zero0:
    weights whole on every rank), "fsdp2", "fsdp1", or None (one device, or plain data parallelism). Reading
    args.device first has the Trainer start the process group, which ZeRO-3 needs to load the model sharded."""
    args.device  # noqa: B018
    if getattr(args, "deepspeed", None):
        import deepspeed

        # accelerate hands the process group to DeepSpeed on GPUs only; on CPUs (gloo) it is done here
        deepspeed.init_distributed(dist_backend="gloo" if args.use_cpu else None, auto_mpi_discovery=False)
        # DeepSpeed's own calls to torch's renamed collectives: a notice per call, about nothing the user did
        warnings.filterwarnings("ignore", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`",
                                FutureWarning)

        return f"zero{args.hf_deepspeed_config.get_value('zero_optimization.stage', 0)}"
    if launched_fsdp_version() and args.use_cpu and args.world_size > 1:
        # accelerate turns FSDP on for GPU-type process groups only: a group of CPU processes (gloo; tests, CI)
        # is marked as one for its FSDP integration to run, the device staying the CPU (set above). `started`
        # checks that it did run.
        from accelerate.state import DistributedType, PartialState

        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    version = launched_fsdp_version() or (getattr(args, "fsdp_config", None) or {}).get("version")
    return f"fsdp{version or 1}" if version or getattr(args, "fsdp", None) else None


@contextlib.contextmanager
def training_under(trainer, name):
    """Wrap trainer.train() under the engine `engine` named. It refuses to train when the Trainer did not take the
    engine up (an accelerate or transformers version that handles it differently), rather than train without it
    unnoticed. Under FSDP2, rank 0 sends every weight of the model it loaded to the ranks' shards (accelerate's
    fsdp2_load_full_state_dict, inside train()); those weights are the checkpoint's mapped pages, and each stayed
    in rank 0's RSS until the last was sent, rank 0's peak (bench/RESULTS.md, scale-out).
    Here each weight's pages are dropped once it is sent (utils/core/host.drop_file_pages). tests/test_distributed.py
    pins the accelerate code this relies on."""
    took = ("zero" if trainer.is_deepspeed_enabled else "fsdp" if trainer.is_fsdp_enabled else None)
    if (name or "")[:4] != (took or "")[:4]:
        raise RuntimeError(f"the Trainer started {took or 'no engine'} where {name or 'none'} was asked for; "
                           f"check the accelerate and transformers versions against requirements.txt")
    from accelerate.utils import fsdp_utils

    original = getattr(fsdp_utils, "fsdp2_load_full_state_dict", None)
    if name != "fsdp2" or original is None:
        yield
        return

    def sending(accelerator, model, full_sd, *args, **kwargs):
        return original(accelerator, model, PagesDroppedOnceSent(full_sd), *args, **kwargs)

    fsdp_utils.fsdp2_load_full_state_dict = sending
    try:
        yield
    finally:
        fsdp_utils.fsdp2_load_full_state_dict = original


class PagesDroppedOnceSent(dict):
    """A full state dict that drops the mapped pages of the weight it last gave out when the next is asked for:
    accelerate's fsdp2_load_full_state_dict asks for each weight (full_sd[name]) after sending the one before."""

    def __init__(self, state_dict):
        super().__init__(state_dict)
        self.mappings, self.last = file_mappings(), None

    def __getitem__(self, key):
        if self.last is not None:
            drop_file_pages(self.last, self.mappings)
        self.last = value = super().__getitem__(key)
        return value


def shards_weights(name):
    """Whether the engine keeps only a part of each weight on a rank between forward passes."""
    return name in ("zero3", "fsdp1", "fsdp2")


@contextlib.contextmanager
def whole_trainable_weights(model, name):
    """Within it, every rank's trainable parameters (the LoRA weights, modules_to_save copies) hold their whole
    values, so that rank 0 can save the adapter: ZeRO-3 gathers them (DeepSpeed's GatheredParameters, only the
    trainable ones, never the frozen base), FSDP2 swaps in their full tensors. Every rank must enter it."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
        return
    if name == "fsdp2":
        import torch
        from torch.distributed.tensor import DTensor

        saved = []
        for module in model.modules():
            for key, param in list(module._parameters.items()):
                if param is not None and param.requires_grad and isinstance(param, DTensor):
                    saved.append((module, key, param))
                    module._parameters[key] = torch.nn.Parameter(param.full_tensor(), requires_grad=False)
        try:
            yield
        finally:
            for module, key, param in saved:
                module._parameters[key] = param
        return
    yield


def adapter_in_checkpoints(model, name):
    """A TrainerCallback that saves the whole adapter into every checkpoint-N/ under FSDP2, whose checkpoints
    otherwise hold the weights only as shards (pytorch_model_fsdp_0/): a checkpoint then loads in merge_lora.py,
    the chat stages and PeftModel.from_pretrained like any other, and resumes
    (utils/train/run_output.checkpoint_problem).
    Only the trainable weights are gathered, never the base. Other engines: a callback that does nothing (the
    Trainer saves the adapter whole)."""
    from transformers import TrainerCallback

    if name != "fsdp2":
        return TrainerCallback()

    from utils.model.lora import save_adapter  # late: imports torch (flag checks stay torch-free)

    class AdapterInCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            with whole_trainable_weights(model, name):
                if state.is_world_process_zero:
                    save_adapter(model, Path(args.output_dir) / f"checkpoint-{state.global_step}")

    return AdapterInCheckpoints()
