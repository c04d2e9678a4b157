"""Training set-up: the LoRA model ready to train, the epochs and learning rate by default, and whether
activations fit. The callbacks every run uses are utils/train/callbacks.py.

The fast path's kernels live in utils/train/fast/, behind one entry point, `prepare_for_training`.
"""
import math
import os

import torch

from utils.core.host import available_memory, return_freed_memory, reuse_freed_memory
from utils.model.distributed import shards_weights, size_zero3_gathering
from utils.model.loading import load_config, load_model
from utils.model.lora import find_target_modules, lora_config
from utils.train.fast import attention_for, prepare_for_training, register_packed_attention
from utils.train.fast.attention import _CausalAttention


def lora_for_training(model_path, dtype, bits, device, lora, checkpointing, tokens_per_step, length,
                      local_files_only=False, trust_remote_code=False, sharding=None, adapter=None):
    """Load the base, wrap it in LoRA (`lora`: r, alpha, dropout, target_modules, modules_to_save), or in the
    trained `adapter` folder to continue it (`lora` then takes the adapter's settings), and apply the fast path.
    Returns (the peft model, the head the loss projects with or None, whether activations are recomputed, the
    banner's lines). `checkpointing` True/False, or "auto": on for a 4/8-bit base (chosen
    to save memory), else only when the activations of `tokens_per_step` tokens would not fit. `sharding`: the
    engine (utils/model/distributed.engine), for the fast path and a sharded QLoRA base."""
    from peft import get_peft_model

    register_packed_attention()
    gathers = device == "cpu" and shards_weights(sharding)  # ZeRO-3, FSDP2: every use gathers a weight, then frees it
    if gathers:  # from loading on (ZeRO-3 fills its shards from temporaries): freed memory goes back (utils/core/host)
        return_freed_memory()
    gathered = (size_zero3_gathering(load_config(model_path, local_files_only, trust_remote_code))
                if sharding == "zero3" else None)  # before zero.Init reads the config
    model = load_model(model_path, dtype, bits, local_files_only=local_files_only,
                       attn_implementation=attention_for(device), trust_remote_code=trust_remote_code,
                       engine=sharding)
    memory_first = bits < 16  # a 4/8-bit base exists to save memory: recompute activations, return freed memory
    if device == "cpu" and not gathers:  # (a sharded run's choice is made above, before loading)
        if memory_first:  # a 4/8-bit base hands its dequantized temporaries back (utils/core/host says why)
            return_freed_memory()
        else:  # keep freed activations for the next step
            reuse_freed_memory()
    model.config.use_cache = False  # a cache would also disable packed-sequence attention
    # A quantized base needs no more preparation than a 16-bit one: peft's prepare_model_for_kbit_training
    # would copy the embeddings, norms and lm_head to fp32 (bench/RESULTS.md), and autocast
    # already computes in the half type. Whatever trains is fp32 (LoRA weights, modules_to_save copies).
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
        config = model.peft_config["default"]
        names = config.target_modules
        lora.update(r=config.r, alpha=config.lora_alpha, dropout=config.lora_dropout, modules_to_save=sorted(
            config.modules_to_save or []), target_modules=[names] if isinstance(names, str) else sorted(names))
    targets = lora["target_modules"] = (find_target_modules(model) if lora["target_modules"] in ([], ["auto"])
                                        else lora["target_modules"])
    if not adapter:
        model = get_peft_model(model, lora_config(model, lora["r"], lora["alpha"], lora["dropout"], targets,
                                                  lora["modules_to_save"]))
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    head, fast = prepare_for_training(model, device, sharding)  # the kernels measured to pay here (utils/train/fast)
    if checkpointing == "auto":
        checkpointing = memory_first or needs_checkpointing(model.config, tokens_per_step, length, dtype.itemsize,
                                                            device, logits=head is None)
    trainable, total = model.get_nb_trainable_parameters()
    live = (gathered or {}).get("stage3_max_live_parameters")  # what size_zero3_gathering set, if it set it
    quantized = sum(type(m).__module__.startswith("bitsandbytes") for m in model.modules())
    banner = (f"base: {str(dtype)[6:]}, {bits}-bit, {quantized} quantized linear layers   "
              f"LoRA r={lora['r']} on {', '.join(targets)}   trainable {trainable:,} of {total:,} parameters\n"
              f"activation checkpointing: {'on' if checkpointing else 'off'}"
              + (f"   {torch.get_num_threads()} CPU threads" if device == "cpu" else "")
              + f"   fast path: {', '.join(fast)}" + (f"   engine: {sharding}" if sharding else "")
              + (f" (at most {live:,} parameters gathered)" if live else ""))
    return model, head, bool(checkpointing), banner


AUTO_EPOCHS, AUTO_MIN_UPDATES, AUTO_MAX_EPOCHS = 3, 75, 10


def auto_epochs(examples, examples_per_update, num_epochs="auto", stage="sft"):  # examples: per process
    """`num_epochs`, or for --num_epochs=auto: 3 passes over the data, or more for a small data set, so that the run
    makes at least AUTO_MIN_UPDATES optimizer updates (at most AUTO_MAX_EPOCHS passes), as OpenAI's fine-tuning
    picks its epochs from the data's size. The demo's 120 records at 8 a step: 5 epochs (3 leave its persona
    half-learnt and looping: the report in README.md); 200 records or more at 8 a step: 3. --stage=dpo: always 3;
    more passes over few pairs only push the rejected answers further down, and the model with them (README)."""
    if num_epochs != "auto":
        return num_epochs
    if stage == "dpo":
        return AUTO_EPOCHS
    per_epoch = math.ceil(examples / (examples_per_update * int(os.environ.get("WORLD_SIZE", 1))))
    return max(AUTO_EPOCHS, min(AUTO_MAX_EPOCHS, math.ceil(AUTO_MIN_UPDATES / max(per_epoch, 1))))


def auto_learning_rate(learning_rate=None, stage="sft"):
    """`learning_rate`, or when it is not given: 5e-4, or 2e-4 for --stage=dpo (at SFT's rate the demo pairs pushed
    the chosen answers down with the rejected ones: README)."""
    return learning_rate or (2e-4 if stage == "dpo" else 5e-4)


def needs_checkpointing(config, tokens_per_step, sequence_length, dtype_bytes, device, logits=True):
    """Whether the activations of the largest step would not fit in free memory without recomputation.

    The estimate counts what the backward pass keeps per token and layer on the fast path (the inputs of
    the norms, the projections and the MLP, about 6·hidden + 4·intermediate values, plus the attention
    probabilities an example keeps, heads x its length), plus fp32 logits and their gradient when the loss
    runs on logits, against 70% of the memory free once the model is loaded.
    """
    # a model's own config may lack intermediate_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    heads = getattr(config, "num_attention_heads", 1) * min(sequence_length, _CausalAttention.KEEP_UP_TO)
    per_token = config.num_hidden_layers * (6 * config.hidden_size + 4 * intermediate + heads) * dtype_bytes
    need = tokens_per_step * (per_token + (8 * config.vocab_size if logits else 0))
    if device == "cuda":
        free = torch.cuda.mem_get_info()[0]
    else:
        free = available_memory()
    return need > 0.7 * free
