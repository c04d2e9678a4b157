"""Model and tokenizer loading: the only place that calls from_pretrained, picks dtypes and quantizes.

`--base_model` may be a local folder of an HF model, a hub id, or the built-in model `builtin:smollm2`
(utils/model/builtin.py).
"""
import contextlib
import json
import os
import socket
import sys
from pathlib import Path

from utils.core.errors import UserError
from utils.core.files import check_safetensors
from utils.core.host import cpu_quota, returning_freed_memory
from utils.core.run_folder import BUILTIN, adapter_base, find_adapter, read_run_config
from utils.data.templates import resolve_template
from utils.model.builtin import builtin_path
from utils.model.distributed import shards_weights


def _hub_reachable(timeout=3.0):
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_model_path(name, local_files_only=False, flag="base_model"):
    """Return a local folder or a loadable hub id for --base_model (or the --flag that named it), or raise one clear
    UserError."""
    if name in (BUILTIN, "builtin"):
        return str(builtin_path())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json; "
                            f"--{flag} needs a folder holding an HF model (config.json, weights, tokenizer).")
        check_weights(path, flag)
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"--{flag}={name!r} is not an existing folder nor a hub id like 'org/name'; "
                        f"pass a local model folder or --{flag}={BUILTIN}.")
    from huggingface_hub import snapshot_download

    with contextlib.suppress(Exception):  # already in the local hub cache: use it without the network
        return snapshot_download(name, local_files_only=True,
                                 allow_patterns=["*.json", "*.model", "*.txt", "*.safetensors", "*.jinja"])
    if local_files_only:
        raise UserError(f"{name!r} is not in the local hub cache and --local_files_only is set; "
                        f"pass a local model folder or --{flag}={BUILTIN}.")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise UserError(f"cannot reach the model hub to download {name!r}; "
                        f"pass a local model folder, or --{flag}={BUILTIN} for the built-in model.")
    return name


def check_weights(folder, flag="base_model"):
    """Refuse a model folder whose safetensors files are cut short or are not safetensors, before any work: each
    file's header is read, and safetensors checks that the file holds every byte the header lists."""
    for file in sorted(Path(folder).glob("*.safetensors")):
        check_safetensors(file, f"copy or download --{flag} again (a merged model: merge again)")


def download_model_folder(path):
    """A local folder for a resolved model path: a hub id is downloaded (config, weights, tokenizer) first.

    The merge stage reads weight files itself, shard by shard, so it needs files rather than a model object.
    """
    if Path(path).is_dir():
        return str(path)
    from huggingface_hub import snapshot_download

    return snapshot_download(path, allow_patterns=["*.json", "*.model", "*.txt", "*.safetensors", "*.jinja"])


def device_supports_bf16(device="cpu"):
    """bf16 is fast on CUDA GPUs that support it and on CPUs with AVX512-BF16 or AMX."""
    if device == "cuda":
        import torch

        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def pick_device():
    """"cuda" when a GPU is visible; else "cpu", with torch's threads capped by the CPU quota (cpu_threads)."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    torch.set_num_threads(cpu_threads())
    return "cpu"


def cpu_threads():
    """Threads for CPU work: torch's default (the physical cores this process may run on), capped by the
    CPU quota of its cgroup (`docker run --cpus=N`), which torch does not read: 16 threads sharing a
    2-CPU quota stall each other at every parallel region. OMP_NUM_THREADS, when set (torchrun sets it
    to 1 for several processes per machine), is left to decide.
    """
    import math

    import torch

    threads = torch.get_num_threads()
    quota = None if os.environ.get("OMP_NUM_THREADS") else cpu_quota()
    return threads if quota is None else max(1, min(threads, math.ceil(quota)))


def pick_dtype(precision, device):
    """--precision auto|bf16|fp16|fp32 to a torch dtype for the frozen base weights."""
    import torch

    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if precision == "auto":
        if device_supports_bf16(device):
            return torch.bfloat16
        return torch.float16 if device == "cuda" else torch.float32
    if precision not in table:
        raise UserError(f"--precision={precision!r} is not one of auto, bf16, fp16, fp32.")
    return table[precision]


def ships_code(path):
    """The Python files a local model folder asks transformers to run (its config's auto_map), or []."""
    config = Path(path) / "config.json"
    try:
        auto_map = json.loads(config.read_text(encoding="utf-8")).get("auto_map") if config.is_file() else None
    except (OSError, ValueError):
        return []
    if not isinstance(auto_map, dict):
        return []
    names = {str(v).split("--")[-1].split(".")[0] + ".py"
             for value in auto_map.values() for v in (value if isinstance(value, list) else [value]) if v}
    return sorted(names)


def check_remote_code(path, trust_remote_code, flag="trust_remote_code"):
    """Refuse, in one sentence, a model that ships code when --trust_remote_code is off; say what runs when it is
    on. transformers itself would stop at an interactive prompt or raise after the data was read."""
    code = ships_code(path)
    if code and not trust_remote_code:
        raise UserError(f"{path} ships its own model code ({', '.join(code)}); "
                        f"read it, then pass --{flag}=True to run it.")
    if code:
        print(f"warning: --{flag} runs {', '.join(code)} from {path} with your permissions.",
              file=sys.stderr, flush=True)


def load_tokenizer(path, local_files_only=False, trust_remote_code=False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only,
                                              trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:  # padding positions are masked out, any id does
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_config(path, local_files_only=False, trust_remote_code=False):
    """The model's config alone (no weights): for GGUF export, which reads weight files itself, and quantized loads."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=local_files_only, trust_remote_code=trust_remote_code)


def quantization_config(bits, compute_dtype, sharded=False):
    """BitsAndBytes settings for 4-bit QLoRA (NF4, double quantization) or 8-bit; None for 16/32-bit. `sharded`
    (FSDP or ZeRO-3 will shard the base): the 4-bit weights are stored packed in the compute dtype, as those
    engines shard one dtype per group of weights (bnb_4bit_quant_storage)."""
    if bits not in (4, 8, 16, 32):
        raise UserError(f"--bits={bits!r} must be 4, 8 or 16.")
    if bits >= 16:
        return None
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_quant_storage=compute_dtype if sharded else "uint8")


@contextlib.contextmanager
def _loading_to_quantize(vocab_size):
    """Have transformers read safetensors shards with pread instead of mmap (its own Windows path), but
    leave the vocabulary tables (embeddings, lm_head: never quantized) mapped; and return freed memory
    (each 16-bit copy, once quantized) to the OS: see utils.core.host.

    When a 16-bit checkpoint is quantized while it loads, every page of the mmapped shards stays
    resident until loading ends, several times the size of the NF4 weights; read into ordinary memory,
    each tensor is freed once quantized. Mapped, the vocabulary tables are not copied at all, and training
    reads only the embedding rows of the tokens it sees. The read is left alone where transformers lacks
    the hook. The figures are in bench/RESULTS.md (QLoRA memory).
    """
    import transformers.modeling_utils as modeling_utils

    original = getattr(modeling_utils, "safe_open", None)
    opened = []

    class Shard:
        def __init__(self, filename, framework="pt", device="cpu", backend=None, **kwargs):
            opened.append(filename)
            mappable = device == "cpu" and backend in (None, "mmap")
            self.read = original(filename, framework=framework, device=device,
                                 backend="pread" if mappable else backend, **kwargs)
            self.mapped = original(filename, framework=framework, device=device, **kwargs) if mappable else None

        def get_slice(self, name):
            if self.mapped is not None:
                piece = self.mapped.get_slice(name)
                shape = piece.get_shape()
                if len(shape) == 2 and shape[0] == vocab_size:
                    return piece
            return self.read.get_slice(name)

        def __getattr__(self, name):  # keys(), metadata(), ...
            return getattr(self.read, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            for handle in (self.read, self.mapped):
                if handle is not None:
                    handle.__exit__(*exc)

    if original is not None:
        modeling_utils.safe_open = Shard
    try:
        with returning_freed_memory():
            yield opened
    finally:
        if original is not None:
            modeling_utils.safe_open = original
    if not opened:  # transformers no longer reads shards through modeling_utils.safe_open: say so, do not pretend
        print("note: the memory-saving read of quantized shards did not apply (this transformers version does not open "
              "them through modeling_utils.safe_open); loading peaks higher. tests/test_memory.py pins this.",
              file=sys.stderr)


@contextlib.contextmanager
def _zero3_loading_a_shard_at_a_time(folder):
    """Under ZeRO-3, transformers (5.x) maps every shard of the checkpoint on rank 0, merges them into one state
    dict and fills the partitions from it (modeling_utils, the is_deepspeed_zero3_enabled branch), so rank 0's RSS
    holds the whole checkpoint's file pages until loading ends, the peak of its run (bench/RESULTS.md, scale-out).
    Here the fill, _load_state_dict_into_zero3_model (built for a part of the checkpoint at
    a time), is given one shard at a time: each rank reads a shard (rank 0 its values, mapped; the others only its
    shapes), fills what it holds, and drops it, unmapping it, before the next. The merged state dict transformers
    built stays mapped, untouched, so its pages never enter RSS. It steps aside, to transformers' own fill, for a
    one-file checkpoint, weight conversions other than renames, or a state dict whose keys are not the shards'.
    tests/test_distributed.py pins the transformers code it relies on."""
    import torch
    import transformers.modeling_utils as modeling_utils
    from transformers.core_model_loading import WeightRenaming

    original = getattr(modeling_utils, "_load_state_dict_into_zero3_model", None)
    if original is None:  # nothing to hand shards to: transformers' own load
        yield
        return

    def by_shard(model, state_dict, load_config=None):
        weight_map = ((getattr(load_config, "sharded_metadata", None) or {}).get("weight_map") or {})
        files = list(dict.fromkeys(weight_map.values()))
        renames_only = all(isinstance(entry, WeightRenaming) for entry in getattr(load_config, "weight_mapping", None)
                           or ())  # a key at a time; a WeightConverter may join keys from several shards
        if len(files) < 2 or not renames_only or set(state_dict) != set(weight_map):
            return original(model, state_dict, load_config)
        where = "cpu" if torch.distributed.get_rank() == 0 else "meta"
        errors, missing = [], None
        for name in files:
            shard = modeling_utils.load_state_dict(str(Path(folder) / name), map_location=where,
                                                   weights_only=load_config.weights_only,
                                                   disable_mmap=load_config.disable_mmap)
            shard_errors, shard_missing = original(model, shard, load_config)
            del shard
            errors += shard_errors
            missing = set(shard_missing) if missing is None else missing & set(shard_missing)
        return errors, missing

    modeling_utils._load_state_dict_into_zero3_model = by_shard
    try:
        yield
    finally:
        modeling_utils._load_state_dict_into_zero3_model = original


def load_model(path, dtype, bits=16, device_map=None, local_files_only=False, attn_implementation="sdpa",
               trust_remote_code=False, engine=None, max_memory=None):
    """Load a causal LM from a resolved path in `dtype`, optionally quantized to 4 or 8 bits. A model that ships
    its own code gets no attn_implementation: its attention is its own. `engine` (utils/model/distributed.engine): under
    one that shards the weights (FSDP, ZeRO-3) no device map, as the engine places it; ZeRO-3 loads it sharded
    already, a checkpoint shard at a time."""
    import torch
    from transformers import AutoModelForCausalLM

    sharded = shards_weights(engine)
    qconfig = quantization_config(bits, dtype, sharded)
    loading = contextlib.nullcontext()  # 16-bit shards in the wanted dtype are used as mapped: nothing is copied
    if qconfig is not None:
        if device_map is None and not sharded:
            device_map = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
        config = load_config(path, local_files_only, trust_remote_code)
        loading = _loading_to_quantize(getattr(config.get_text_config(), "vocab_size", None))
    elif engine == "zero3" and Path(path).is_dir():
        loading = _zero3_loading_a_shard_at_a_time(path)
    own_attention = {} if ships_code(path) else {"attn_implementation": attn_implementation}
    with loading:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, quantization_config=qconfig, device_map=device_map,
            local_files_only=local_files_only, trust_remote_code=trust_remote_code, **own_attention,
            max_memory=max_memory,
        )


def device_map_for(num_gpus):
    """(device_map, max_memory) for from_pretrained: (None, None) on CPU, the first GPU alone, or the layers
    spread evenly ("balanced") over the first num_gpus GPUs, which max_memory limits to those (as the older
    project did)."""
    import torch

    if not torch.cuda.is_available():
        return None, None
    count = min(max(int(num_gpus or 1), 1), torch.cuda.device_count())
    if count == 1:
        return {"": 0}, None
    return "balanced", {i: torch.cuda.get_device_properties(i).total_memory for i in range(count)}


def load_for_inference(model_path=None, lora_model=None, base_model=None, template="auto", bits=16,
                       num_gpus=1, precision="auto", local_files_only=False, trust_remote_code=None):
    """Load what the chat, web and evaluation stages talk to, with the template training used.

    model_path: a merged or any HF model folder (or hub id). lora_model: a finetune.py output folder (or a
    checkpoint-N/ inside it): its base comes from run_config.json or adapter_config.json unless base_model
    is given. Neither: the built-in model. trust_remote_code None follows the run config (what training was
    allowed). Returns (model, tokenizer, template, run_config).
    """
    device = pick_device()
    dtype = pick_dtype(precision, device)
    run_config = None
    if lora_model:
        folder = lora_model = find_adapter(lora_model)
        run_config = read_run_config(folder) or {}
        base_model = base_model or adapter_base(folder, run_config)
        path = resolve_model_path(base_model or BUILTIN, local_files_only)
        tokenizer_path = next((f for f in (folder, folder.parent) if (f / "tokenizer_config.json").is_file()), path)
    else:
        path = resolve_model_path(model_path or BUILTIN, local_files_only, "model_path")
        run_config = read_run_config(path) if Path(path).is_dir() else None
        tokenizer_path = path
    if trust_remote_code is None:
        trust_remote_code = bool((run_config or {}).get("trust_remote_code"))
    check_remote_code(path, trust_remote_code)
    tokenizer = load_tokenizer(tokenizer_path, local_files_only, trust_remote_code)
    device_map, max_memory = device_map_for(num_gpus)
    model = load_model(path, dtype, bits, device_map=device_map, local_files_only=local_files_only,
                       trust_remote_code=trust_remote_code, max_memory=max_memory)
    if lora_model:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, lora_model)
    model.eval()
    return model, tokenizer, resolve_template(template, tokenizer, run_config), run_config
