"""Merge a LoRA adapter into its base model one shard at a time, atomically, and check the result.

One base shard is open at a time; its tensors are read one by one (through safetensors' safe_open in pread
mode, or through torch.load with mmap for pickled .bin shards when allowed), and each output shard is written
tensor by tensor behind a header computed up front. Memory holds one tensor plus the adapter, never a
shard, never the model. Targeted weights are merged in fp32 as W + scale * B @ A and cast once.
"""
import datetime
import errno
import json
import math
import os
import re
import shutil
import struct
import warnings
from pathlib import Path

import torch

from utils.core.errors import UserError
from utils.core.files import read_json
from utils.core.host import available_memory, peak_rss
from utils.core.run_folder import adapter_base, find_adapter, read_run_config, write_run_config
from utils.model.loading import (
    check_remote_code,
    download_model_folder,
    load_model,
    load_tokenizer,
    resolve_model_path,
    ships_code,
)

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
_ST_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
_ST_DTYPES = {v: k for k, v in _ST_NAMES.items()}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "added_tokens.json")
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
PROBES = ["Hello! Who are you?", "Translate to French: the weather is nice today.", "def fibonacci(n):",
          "写一首关于春天的短诗。", "Q: What is 17 * 3? A:"]
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
                  r"lora_magnitude_vector|base_layer)(?:\.default)?(?:\.weight)?$")
_LAYER = re.compile(r"\.layers\.\d+\.")


def parse_dtype(name):
    """--dtype auto (None: keep each tensor's own dtype) or one of DTYPES."""
    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise UserError(f"--precision={name!r} is not one of auto, bf16, fp16, fp32.")
    return DTYPES[name]


def _pattern_value(patterns, module, default):
    """peft's rank_pattern/alpha_pattern rule: the first key that matches the end of the module's name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_adapter(folder, allow_pickle):
    """Read adapter_config.json and the weights into {module: {A, B, scale, magnitude, embedding}} and replacements."""
    config = read_json(folder / "adapter_config.json", "restore it, or train again")
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{folder}/adapter_config.json is a {config['peft_type']} adapter; "
                        "merge_lora.py merges LoRA adapters only.")
    for key in ("layer_replication", "trainable_token_indices", "target_parameters", "alora_invocation_tokens"):
        if config.get(key):
            raise UserError(f"{folder}/adapter_config.json sets {key}, which has no plain merged form; "
                            "merge it with peft's merge_and_unload instead.")
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors.torch import load_file

        state = load_file(str(weights))
    elif (folder / "adapter_model.bin").is_file():
        weights = folder / "adapter_model.bin"
        if not allow_pickle:
            raise UserError(f"{weights} is a pickle file, which can run code when loaded; "
                            "pass --allow_pickle if you trust it, or convert it to safetensors.")
        print(f"warning: loading the pickled adapter {weights} because --allow_pickle was given.")
        state = torch.load(weights, map_location="cpu", weights_only=True)
    else:
        raise UserError(f"{folder} holds no adapter_model.safetensors or adapter_model.bin; "
                        "pass the folder finetune.py wrote.")
    if not any(".lora_" in k for k in state):
        raise UserError(f"{weights} holds no lora_ weights (an empty adapter); pass a trained adapter folder.")
    modules, replace = {}, {}
    for key, value in state.items():
        match = _KEY.match(key)
        if match is None:
            if ".original_module." in key:  # PEFT's copy of the untrained module, which the merged model does not use
                continue
            name = re.sub(r"\.modules_to_save(\.default)?\.", ".", key.removeprefix("base_model.model."))
            if not name.endswith(".weight"):
                raise UserError(f"{weights} holds {key}, which merge_lora.py cannot merge (only LoRA weights and "
                                f"modules_to_save weights); retrain with bias='none'.")
            replace[name] = value
            continue
        module, part = match["module"], match["part"]
        if part == "base_layer":
            replace[f"{module}.weight"] = value  # PEFT saves a resized embedding's base; PeftModel loads it back
            continue
        slot = modules.setdefault(module, {"embedding": False, "magnitude": None})
        if part == "lora_magnitude_vector":
            slot["magnitude"] = value
        else:
            slot["embedding"] |= "embedding" in part
            slot[part[-1]] = value
    for module, slot in modules.items():
        if "A" not in slot or "B" not in slot:
            raise UserError(f"{weights} has lora_A without lora_B (or the reverse) for {module}; "
                            "the file is incomplete, save the adapter again.")
        if slot["magnitude"] is not None and (slot["embedding"] or config.get("fan_in_fan_out")):
            raise UserError(f"{weights} has a DoRA magnitude on {module}, which is not a plain linear layer; "
                            "merge_lora.py cannot merge it exactly.")
        r = slot["A"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        slot["scale"] = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return config, modules, replace


def base_shards(base_path, allow_pickle):
    """[(shard file, [tensor names])] in the base's own order, refusing quantized and pickled bases."""
    base = Path(base_path)
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise UserError(f"{base} is a {method} quantized model; merging needs the unquantized base, so pass "
                        f"--base_model=<the original fp16/bf16 model> "
                        f"(add --qlora_base to merge onto its NF4-dequantized weights).")
    for index_name, single, pickled in (("model.safetensors.index.json", "model.safetensors", False),
                                        ("pytorch_model.bin.index.json", "pytorch_model.bin", True)):
        if (base / index_name).is_file():
            weight_map = json.loads((base / index_name).read_text())["weight_map"]
            files = list(dict.fromkeys(weight_map.values()))
        elif (base / single).is_file():
            files = [single]
        else:
            continue
        if pickled and not allow_pickle:
            raise UserError(f"{base} holds its weights in pickled .bin files, which can run code when loaded; "
                            "pass --allow_pickle if you trust them.")
        return [(base / f, _tensor_names(base / f, pickled)) for f in files]
    raise UserError(f"{base} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin; "
                    "pass a folder with an HF model's weights.")


def _tensor_names(path, pickled):
    with _Shard(path) as shard:
        return list(shard.meta)


class _Shard:
    """Reads one base shard tensor by tensor: safetensors through safe_open in pread mode, pickled .bin through
    torch.load(mmap=True).

    safe_open's default maps the file, and every byte a merge touches then stays resident until the file closes,
    so a shard's worth of memory builds up; in pread mode each tensor is read into its own buffer and only the
    tensor in hand is held (bench/RESULTS.md, merge: the same speed and memory as a reader of our own).
    """

    def __init__(self, path):
        self.path = Path(path)

    def __enter__(self):
        self._file = None
        if self.path.suffix == ".bin":
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            self.meta = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
            self.get = state.__getitem__
            return self
        from safetensors import SafetensorError, safe_open

        try:
            self._file = safe_open(str(self.path), framework="pt", device="cpu", backend="pread")
            slices = {k: self._file.get_slice(k) for k in self._file.keys()}
            self.meta = {k: (_ST_DTYPES[v.get_dtype()], tuple(v.get_shape())) for k, v in slices.items()}
        except (SafetensorError, KeyError) as e:
            raise UserError(f"{self.path} is damaged or cut short ({e}); download the base model again.") from None
        self.get = self._file.get_tensor
        return self

    def __exit__(self, *exc):
        if self._file is not None:
            self._file.__exit__(*exc)
        self._file = self.get = self.meta = None


def write_safetensors(path, entries, produce):
    """Write a safetensors file tensor by tensor: the header comes from (name, dtype, shape) entries, then each
    produce(name) is written and dropped, so the file never sits in memory."""
    header, offset = {}, 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, dtype, shape in entries:
            tensor = produce(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"{name}: produced {tensor.dtype} {tuple(tensor.shape)}, "
                                   f"planned {dtype} {tuple(shape)}")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return offset


def nf4_roundtrip(weight, dtype):
    """The weight as a 4-bit QLoRA base saw it: NF4 with double quantization (blocks of 64), dequantized to fp32."""
    import bitsandbytes.functional as bnbf

    q, state = bnbf.quantize_4bit(weight.to(dtype), blocksize=64, compress_statistics=True, quant_type="nf4")
    return bnbf.dequantize_4bit(q, state).float()


def plan_merge(shards, modules, replace, base_config, out_dtype):
    """Check the adapter against the base's tensor names and shapes, without reading any weights.

    Returns the output shards [(base file, [(out name, source name, dtype, shape)])], whether to untie the
    embeddings, and the output vocab size.
    """
    meta = {}
    for path, _ in shards:
        with _Shard(path) as shard:
            meta.update({k: (v[0], v[1], path) for k, v in shard.meta.items()})
    tied = EMBED in meta and HEAD not in meta
    touched = {f"{m}.weight" for m in modules} | set(replace)
    untie = tied and bool(touched & {EMBED, HEAD})
    lookup = dict(meta)
    if untie:
        lookup[HEAD] = meta[EMBED]
    for module, slot in modules.items():
        name = f"{module}.weight"
        if name not in lookup:
            raise UserError(f"the adapter has LoRA weights for {module} but the base has no tensor {name}; "
                            "pass the --base_model the adapter was trained on.")
        shape = tuple(replace[name].shape) if name in replace else lookup[name][1]
        rows, cols = ((slot["A"].shape[1], slot["B"].shape[0]) if slot["embedding"]
                      else (slot["B"].shape[0], slot["A"].shape[1]))
        if slot["embedding"] or not slot.get("fan_in_fan_out"):
            want = (rows, cols)
        else:
            want = (cols, rows)
        if want != shape:
            raise UserError(f"the adapter's LoRA update for {name} has shape {list(want)} but the base tensor has "
                            f"{list(shape)}; pass the --base_model the adapter was trained on.")
    for name, value in replace.items():
        if name not in lookup:
            raise UserError(f"the adapter replaces {name} (modules_to_save) but the base has no such tensor; "
                            "pass the --base_model the adapter was trained on.")
        base_shape = lookup[name][1]
        if value.dim() != len(base_shape) or tuple(value.shape[1:]) != tuple(base_shape[1:]):
            raise UserError(f"the adapter's {name} has shape {list(value.shape)} "
                            f"but the base's has {list(base_shape)}; "
                            f"pass the --base_model the adapter was trained on.")
    vocab = {tuple(replace[n].shape)[0] if n in replace else lookup[n][1][0] for n in (EMBED, HEAD) if n in lookup}
    if len(vocab) > 1:
        raise UserError(f"after merging, {EMBED} and {HEAD} would have different row counts {sorted(vocab)}; save both "
                        f"embed_tokens and lm_head with the adapter (modules_to_save) after resizing.")
    plan = []
    for path, names in shards:
        entries = []
        for name in names:
            dtype, shape, _ = meta[name]
            shape = tuple(replace[name].shape) if name in replace else shape
            out = out_dtype if out_dtype is not None and dtype.is_floating_point else dtype
            entries.append((name, name, out, shape))
            if untie and name == EMBED:
                entries.append((HEAD, EMBED, out, tuple(replace[HEAD].shape) if HEAD in replace else shape))
        plan.append((path, entries))
    return plan, untie, (vocab.pop() if vocab else base_config.get("vocab_size"))


def merged_tensor(name, weight, modules, replace, out_dtype, qlora):
    """One output tensor: the modules_to_save replacement, or W + scale * B @ A in fp32 (DoRA rescaled), cast once."""
    module = name.removesuffix(".weight")
    if name in replace and module not in modules:
        return replace[name].to(out_dtype)
    if module not in modules:
        if qlora and weight.dim() == 2 and _LAYER.search(name):
            return nf4_roundtrip(weight, qlora).to(out_dtype)
        return weight.to(out_dtype)
    slot = modules[module]
    base = replace[name] if name in replace else weight
    w = nf4_roundtrip(base, qlora) if qlora and _LAYER.search(name) else base.float()
    a, b = slot["A"].float(), slot["B"].float()
    if slot["embedding"] or slot.get("fan_in_fan_out"):
        w = w + (b @ a).T * slot["scale"]
    else:
        w = torch.addmm(w, b, a, alpha=slot["scale"])
    if slot["magnitude"] is not None:  # DoRA: new magnitude over the row norm of the merged direction
        w = w * (slot["magnitude"].float() / torch.linalg.norm(w, dim=1)).unsqueeze(1)
    return w.to(out_dtype)


def check_vocab(tokenizer_dir, vocab_size, trust_remote_code=False):
    """A base whose embeddings have fewer rows than the adapter's tokenizer has tokens is the wrong base."""
    if vocab_size is None:
        return

    count = len(load_tokenizer(tokenizer_dir, local_files_only=True, trust_remote_code=trust_remote_code))
    if count > vocab_size:
        raise UserError(f"the adapter's tokenizer in {tokenizer_dir} has {count} tokens but the merged {EMBED} has "
                        f"{vocab_size} rows; pass the --base_model the adapter was trained on.")


def tokenizer_source(adapter_dir, lora_model, base_path):
    for folder in (adapter_dir, Path(lora_model).resolve(), adapter_dir.parent):
        if (folder / "tokenizer_config.json").is_file():
            return folder
    return Path(base_path) if (Path(base_path) / "tokenizer_config.json").is_file() else None


def _gib(n):
    return n / 2**30


def merge(lora_model, output_dir, base_model=None, dtype=None, overwrite=False, allow_pickle=False, qlora_base=None,
          verify=True, trust_remote_code=None, on_start=None):
    """Merge, verify (unless verify=False) and write; returns the summary written to merge_info.json.
    trust_remote_code None follows the run config: a base that ships code is merged with its code copied along.
    on_start() runs once every input is checked, before the work (merge_lora.py prints its banner there).

    Everything is written into a hidden folder beside output_dir, which is renamed into place at the end, so
    a failed or killed merge never leaves a half-written output_dir.
    """
    from tqdm import tqdm

    adapter_dir = find_adapter(lora_model)
    run_config = read_run_config(adapter_dir) or {}
    base_model = base_model or adapter_base(adapter_dir, run_config)
    if not base_model:
        raise UserError(f"neither {adapter_dir}/adapter_config.json nor a run_config.json names the base model; "
                        "pass --base_model.")
    base_path = download_model_folder(resolve_model_path(base_model))
    trust_remote_code = bool(run_config.get("trust_remote_code")) if trust_remote_code is None else trust_remote_code
    check_remote_code(base_path, trust_remote_code)
    out = Path(output_dir).expanduser().resolve()
    for name, folder in (("--lora_model", adapter_dir), ("--base_model", Path(base_path).resolve())):
        if out == folder or out in folder.parents:
            raise UserError(f"--output_dir={out} would replace {name} {folder}; pass another --output_dir.")
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir={out} is a file; pass a folder path.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already exists and is not empty; "
                        "pass --overwrite_output_dir=True to replace it, or another --output_dir.")
    if qlora_base is None:
        qlora_base = run_config.get("bits") == 4
    qlora = DTYPES.get(run_config.get("dtype"), torch.float32) if qlora_base else None

    config, modules, replace = load_adapter(adapter_dir, allow_pickle)
    if config.get("fan_in_fan_out"):
        for slot in modules.values():
            slot["fan_in_fan_out"] = True
    base_config = json.loads((Path(base_path) / "config.json").read_text(encoding="utf-8"))
    shards = base_shards(base_path, allow_pickle)
    plan, untie, vocab_size = plan_merge(shards, modules, replace, base_config, dtype)
    tok_dir = tokenizer_source(adapter_dir, lora_model, base_path)
    if tok_dir is not None and tok_dir != Path(base_path):
        check_vocab(tok_dir, vocab_size, trust_remote_code)

    sizes = [sum(math.prod(s) * torch.empty((), dtype=d).element_size() for _, _, d, s in entries)
             for _, entries in plan]
    need = sum(sizes) + 64 * 2**20
    existing = next(p for p in out.parents if p.exists())
    free = shutil.disk_usage(existing).free
    if free < need:
        raise UserError(f"{out.parent} has {_gib(free):.2f} GiB free but the merged model needs {_gib(need):.2f} GiB; "
                        f"free some space or pass an --output_dir on another disk.")

    if on_start is not None:
        on_start()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.merging-*"):  # left by a merge that was killed
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.merging-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        weight_map, n = {}, len(plan)
        bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="merging", disable=None)
        for i, (path, entries) in enumerate(plan, 1):
            file_name = f"model-{i:05d}-of-{n:05d}.safetensors"
            with _Shard(path) as shard:
                source = {name: src for name, src, _, _ in entries}
                dtypes = {name: d for name, _, d, _ in entries}

                def produce(name):
                    tensor = merged_tensor(name, shard.get(source[name]), modules, replace, dtypes[name], qlora)
                    bar.update(tensor.numel() * tensor.element_size())
                    return tensor

                try:
                    write_safetensors(tmp / file_name, [(name, d, s) for name, _, d, s in entries], produce)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    raise UserError(f"the disk holding {out.parent} filled up while writing {file_name}; free some "
                                    f"space or pass an --output_dir on another disk.") from None
            weight_map.update({name: file_name for name, _, _, _ in entries})
        bar.close()
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        _write_configs(tmp, base_path, base_config, plan, untie, vocab_size, tok_dir, run_config, adapter_dir,
                       base_model)
        for code in ships_code(base_path):  # the merged model runs the same code as its base
            shutil.copy2(Path(base_path) / code, tmp / code)
        summary = {"base_model": str(base_model), "base_model_path": str(base_path), "adapter": str(adapter_dir),
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "dtype": str(dtype or "base's own").replace("torch.", ""),
                   "qlora_base": str(qlora).replace("torch.", "") if qlora else None,
                   "merged_modules": len(modules), "replaced_tensors": sorted(replace), "untied_embeddings": untie,
                   "shards": n, "largest_shard_bytes": max(sizes), "total_bytes": sum(sizes),
                   "merge_peak_rss_bytes": peak_rss(), "verification": None, "trust_remote_code": trust_remote_code}
        if verify:
            summary["verification"] = verify_merge(tmp, summary, modules, replace, tok_dir)
            summary["verification"]["peak_rss_bytes"] = peak_rss()
        (tmp / "merge_info.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _write_configs(tmp, base_path, base_config, plan, untie, vocab_size, tok_dir, run_config, adapter_dir, base_model):
    config = dict(base_config)
    dtypes = {d for _, entries in plan for _, _, d, _ in entries if d.is_floating_point}
    main_dtype = max(dtypes, key=lambda d: sum(math.prod(s) for _, entries in plan for _, _, dd, s in entries
                                               if dd == d))
    config["dtype"] = str(main_dtype).replace("torch.", "")
    config.pop("torch_dtype", None)
    if untie:
        config["tie_word_embeddings"] = False
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (Path(base_path) / "generation_config.json").is_file():
        shutil.copy2(Path(base_path) / "generation_config.json", tmp / "generation_config.json")
    else:
        keys = ("bos_token_id", "eos_token_id", "pad_token_id")
        (tmp / "generation_config.json").write_text(
            json.dumps({k: config[k] for k in keys if config.get(k) is not None}, indent=2) + "\n")
    if tok_dir is not None:
        for name in TOKENIZER_FILES:
            if (tok_dir / name).is_file():
                shutil.copy2(tok_dir / name, tmp / name)
    merged_from = {"base_model": str(base_model), "adapter": str(adapter_dir)}
    write_run_config(tmp, {**run_config, "merged_from": merged_from})


def verify_merge(out, summary, modules, replace, tok_dir, sample=8):
    """Compare the merged model with base + adapter through PEFT, both in fp32, on the probe prompts.

    When two fp32 copies cannot fit in the available memory, compare the sampled merged tensors instead:
    a PEFT LoRA layer built on the base tensor against a plain linear layer holding the merged tensor, on
    random inputs. Returns the figures.
    """
    params = summary["total_bytes"] / 2  # at least 2 bytes per parameter in every dtype we write
    need = params * 4 * 1.3
    avail = available_memory()
    if need > avail * 0.8:
        return _verify_layers(out, summary, modules, replace, sample, need, avail)
    return _verify_full(out, summary, tok_dir)


@torch.no_grad()
def _logits(model, batches):
    return [model(input_ids=ids).logits.float() for ids in batches]


def _verify_full(out, summary, tok_dir):
    from peft import PeftModel

    vocab = json.loads((out / "config.json").read_text())["vocab_size"]
    trust = summary["trust_remote_code"]
    if tok_dir is not None:
        tokenizer = load_tokenizer(tok_dir, local_files_only=True, trust_remote_code=trust)
        batches = [torch.tensor([tokenizer(p)["input_ids"][:64]]) for p in PROBES]
    else:  # no tokenizer anywhere: fixed token ids spread over the vocabulary
        batches = [(torch.arange(1, 33) * (i + 1) * 7919 % vocab).unsqueeze(0) for i in range(len(PROBES))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = load_model(summary["base_model_path"], torch.float32, local_files_only=True,
                               trust_remote_code=trust)
        if summary["qlora_base"]:  # bitsandbytes' own 4-bit CPU matmul is not exact, so dequantize into an fp32 model
            for name, param in reference.named_parameters():
                if param.dim() == 2 and _LAYER.search(name):
                    param.data = nf4_roundtrip(param.data, DTYPES[summary["qlora_base"]])
        if reference.get_input_embeddings().weight.shape[0] != vocab:
            reference.resize_token_embeddings(vocab)
        reference = PeftModel.from_pretrained(reference, summary["adapter"]).eval()
        expected = _logits(reference, batches)
        del reference
        merged = load_model(str(out), torch.float32, local_files_only=True, trust_remote_code=trust).eval()
        got = _logits(merged, batches)
    diff = max((e - g).abs().max().item() for e, g in zip(expected, got))
    agree = sum((e.argmax(-1) == g.argmax(-1)).sum().item() for e, g in zip(expected, got))
    total = sum(e.shape[1] for e in expected)
    return {"mode": "full model, fp32, base + adapter through PEFT"
                    + (" on the NF4-dequantized base" if summary["qlora_base"] else ""),
            "probe_prompts": len(PROBES), "max_abs_logit_diff": diff, "greedy_agreement": agree / total,
            "positions": total}


def _verify_layers(out, summary, modules, replace, sample, need, avail):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear
    from safetensors import safe_open

    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    names = sorted(m for m, s in modules.items() if not s["embedding"] and not s.get("fan_in_fan_out"))
    picked = [names[round(i * (len(names) - 1) / max(sample - 1, 1))] for i in range(min(sample, len(names)))]
    shards = dict(_find_base_tensors(summary["base_model_path"], [f"{m}.weight" for m in picked]))
    torch.manual_seed(0)
    diff = 0.0
    for module in picked:
        slot, name = modules[module], f"{module}.weight"
        base_weight = replace[name] if name in replace else shards[name]
        w0 = nf4_roundtrip(base_weight, DTYPES[summary["qlora_base"]]) if summary["qlora_base"] else base_weight.float()
        linear = torch.nn.Linear(w0.shape[1], w0.shape[0], bias=False)
        linear.weight.data = w0
        config = LoraConfig(r=slot["A"].shape[0], lora_alpha=1, lora_dropout=0.0,
                            use_dora=slot["magnitude"] is not None)
        layer = LoraLinear(linear, "default", config, r=config.r, lora_alpha=1)
        layer.scaling["default"] = slot["scale"]
        layer.lora_A["default"].weight.data = slot["A"].float()
        layer.lora_B["default"].weight.data = slot["B"].float()
        if slot["magnitude"] is not None:
            layer.lora_magnitude_vector["default"].weight.data = slot["magnitude"].float()
        with safe_open(str(out / index[name]), "pt") as f:
            merged = f.get_tensor(name).float()
        x = torch.randn(16, w0.shape[1])
        with torch.no_grad():
            diff = max(diff, (layer(x) - x @ merged.T).abs().max().item())
    return {"mode": f"sampled layers: {len(picked)} of {len(modules)} merged tensors, "
                    f"a PEFT LoRA layer on the base tensor against the merged tensor on random inputs "
                    f"(a full check needs {_gib(need):.1f} GiB, {_gib(avail):.1f} GiB is available)",
            "max_abs_output_diff": diff, "modules": picked}


def _find_base_tensors(base_path, names):
    wanted = set(names)
    for path, keys in base_shards(base_path, allow_pickle=True):
        hits = wanted.intersection(keys)
        if hits:
            with _Shard(path) as shard:
                for name in hits:
                    yield name, shard.get(name)
