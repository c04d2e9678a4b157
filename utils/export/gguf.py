"""HF LLaMA-family folder -> one GGUF file that llama.cpp (and Ollama) load: tensors, hyperparameters, tokenizer.

Written with the gguf package's GGUFWriter, following llama.cpp's conventions (its converter and loader in the
llama-cpp-python sdist this project pins) for each architecture in ARCHS: its tensor names, attention biases,
Q/K rows permuted from HF's rotate-half layout to the interleaved pairs of llama.cpp's `llama` rope (qwen2's rope
takes HF's layout as it is), norms kept in f32, and the general.* names its converter writes. Types f32, f16, bf16
and q8_0 are written here (what the gguf package can write); the k-quants (QUANTS) are llama.cpp's own quantizer
run on the f16 file, through llama-cpp-python, which also measures perplexity and greedy continuations for the
checks.
"""
import json
import math
from pathlib import Path

import numpy as np

from utils.core.errors import UserError
from utils.core.files import check_safetensors, read_json
from utils.core.run_folder import BUILTIN

TYPES = ("f32", "f16", "bf16", "q8_0")
QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
          "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}
OUTTYPES = TYPES + tuple(QUANTS)
# HF model_type -> llama.cpp architecture. Mistral is llama to llama.cpp's converter too: its sliding window is not
# written (llama.cpp attends over the whole context, which equals the window up to `sliding_window` tokens).
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
PERMUTED = ("llama",)  # rope on interleaved pairs; qwen2's (NEOX-style) rope pairs the halves, as HF does
# the split regexes of LLaMA-3's and Qwen2's tokenizer.json, as llama.cpp's llama-bpe and qwen2 pre-tokenizers split
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def permute_qk(weight, heads):
    """HF stores each head's rotary dims as two halves; llama.cpp's rope wants them as interleaved pairs."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2)
            .reshape(weight.shape))


def gguf_name(hf_name):
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    parts = hf_name.split(".")
    if hf_name.startswith("model.layers.") and parts[-1] in ("weight", "bias"):
        short = LAYER_NAMES.get(".".join(parts[3:-1]))
        if short:
            return f"blk.{parts[2]}.{short}.{parts[-1]}"
    return None


def weight_files(folder):
    """The folder's safetensors files, each checked to open (a cut-short shard is refused before any writing)."""
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(read_json(index, "restore it, or merge again")["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    if not all((folder / f).is_file() for f in files):
        raise UserError(f"{folder} has no model.safetensors (or its shards); "
                        "export needs safetensors weights, e.g. a merge_lora.py output folder.")
    for f in files:
        check_safetensors(folder / f, "merge again, or copy the file again")
    return files


def read_weights(folder, shapes_only=False):
    """Yield (name, float32 numpy array) from the folder's safetensors files, one tensor at a time; with
    shapes_only, (name, shape) from the files' headers, reading no weights."""
    from safetensors import safe_open

    for f in weight_files(folder):
        with safe_open(str(folder / f), "pt") as st:
            names = list(st.keys())
            if shapes_only:
                yield from ((name, tuple(st.get_slice(name).get_shape())) for name in names)
        for name in () if shapes_only else names:
            # opened again per tensor: the file is memory-mapped, and pages read stay resident while it is open
            with safe_open(str(folder / f), "pt") as st:
                array = st.get_tensor(name).float().numpy()
            yield name, array


def rope_settings(config, head_dim):
    """(theta, scaling kv pairs, optional rope_freqs tensor) from config.rope_parameters / rope_scaling."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, {}, None
    if kind == "linear":
        return theta, {"linear": params["factor"]}, None
    if kind == "llama3":  # llama.cpp applies LLaMA-3.1's frequency-dependent factors from a rope_freqs tensor
        factor, low, high = params["factor"], params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
        old = params.get("original_max_position_embeddings", 8192)
        factors = []
        for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim):
            wavelen = 2 * math.pi / freq
            if wavelen < old / high:
                factors.append(1.0)
            elif wavelen > old / low:
                factors.append(factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        return theta, {}, np.array(factors, dtype=np.float32)
    raise UserError(f"rope type {kind!r} is not supported by this exporter (default, linear, llama3 are); "
                    "use llama.cpp's convert_hf_to_gguf.py.")


def bpe_pre(tokenizer_json):
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, read from its structure: the one whose
    split (and whole-word lookup, ignore_merges) llama.cpp reproduces exactly, which its converter's guess from a
    hash of sample tokens does not always find (SmolLM2 as transformers derives it from a GGUF: gpt-2, not smollm)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    ignore_merges = bool(tokenizer_json.get("model", {}).get("ignore_merges"))
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not ignore_merges:
        return "gpt-2"  # llama.cpp spells the pre-tokenizer with a hyphen (the tokenizer model is "gpt2")
    if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True)
            and not ignore_merges):
        return "smollm"  # GPT-2's split after isolating every digit
    if (kinds == ["Split", "ByteLevel"] and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
            and not steps[1].get("use_regex", True)):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == LLAMA3_SPLIT and ignore_merges:
            return "llama-bpe"
        if regex == QWEN2_SPLIT and not ignore_merges:
            return "qwen2"
    raise UserError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) has no llama.cpp pre-tokenizer "
                    "known here to split text exactly as it does; use llama.cpp's convert_hf_to_gguf.py.")


def tokenizer_vocab(folder, tokenizer, vocab_size):
    """(model, pre, tokens, types, scores or None, merges or None), padded to the embedding's vocab_size."""
    from gguf import TokenType

    tj_path = folder / "tokenizer.json"
    tj = json.loads(tj_path.read_text(encoding="utf-8")) if tj_path.is_file() else {}
    if tj.get("model", {}).get("type") == "BPE" and not tj["model"].get("byte_fallback"):
        vocab = tj["model"]["vocab"]
        added = {t["id"]: t for t in tj.get("added_tokens", [])}
        tokens, types = [], []
        by_id = {i: tok for tok, i in vocab.items()} | {i: t["content"] for i, t in added.items()}
        for i in range(max(by_id) + 1):
            tokens.append(by_id.get(i, f"[PAD{i}]"))
            types.append(TokenType.UNUSED if i not in by_id else
                         (TokenType.CONTROL if added[i]["special"] else TokenType.USER_DEFINED) if i in added
                         else TokenType.NORMAL)
        merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
        model, pre, scores = "gpt2", bpe_pre(tj), None
    elif (folder / "tokenizer.model").is_file():  # LLaMA-2-style SentencePiece
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        tokens, types, scores = [], [], []
        for i in range(sp.vocab_size()):
            tokens.append(sp.id_to_piece(i))
            scores.append(sp.get_score(i))
            types.append(TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i) else
                         TokenType.UNUSED if sp.is_unused(i) else TokenType.BYTE if sp.is_byte(i) else TokenType.NORMAL)
        for token, i in sorted(tokenizer.get_added_vocab().items(), key=lambda kv: kv[1]):
            if i >= len(tokens):
                tokens.append(token)
                scores.append(-1000.0)
                types.append(TokenType.CONTROL if token in tokenizer.all_special_tokens else TokenType.USER_DEFINED)
        model, pre, merges = "llama", "default", None
    else:
        raise UserError(f"{folder} has neither a byte-level BPE tokenizer.json nor a SentencePiece tokenizer.model; "
                        "use llama.cpp's convert_hf_to_gguf.py.")
    if len(tokens) > vocab_size:
        raise UserError(f"{folder}: the tokenizer has {len(tokens)} tokens but the embedding only {vocab_size} rows.")
    for i in range(len(tokens), vocab_size):  # embedding rows beyond the tokenizer, as llama.cpp pads them
        tokens.append(f"[PAD{i}]")
        types.append(TokenType.UNUSED)
        if scores is not None:
            scores.append(-1000.0)
    return model, pre, tokens, types, scores, merges


def parameter_count(folder, tied):
    """Parameters in the folder's weights (a tied output projection counted once), from the safetensors headers."""
    from safetensors import safe_open

    total = 0
    for f in weight_files(folder):
        with safe_open(str(folder / f), "np") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys()
                         if gguf_name(k) and not (tied and k == "lm_head.weight"))
    return total


def model_names(folder, run_config=None):
    """(basename, finetune) as llama.cpp's converter derives them from a model name ("SmolLM2-135M-Instruct":
    SmolLM2, Instruct). A merged fine-tune (run_config.json beside it) is named for its base model, and its
    finetune for its own folder; finetune is None where the name holds none."""
    import gguf

    _, _, basename, finetune, _, _ = gguf.Metadata.get_model_id_components(folder.name)
    if run_config and (run_config.get("base_model_path") or run_config.get("base_model")):
        base = str(run_config.get("base_model_path") or run_config["base_model"])
        if base == BUILTIN or Path(base).expanduser().is_dir():
            base = "smollm2-135m-instruct" if base == BUILTIN else Path(base).name
        _, _, base_name, _, _, _ = gguf.Metadata.get_model_id_components(base)
        return base_name or base.split("/")[-1], folder.name
    return basename or folder.name, finetune


def ggml_type(shape, outtype):
    """The GGML type a tensor of this shape is written in: 1-D tensors (norms, biases) stay f32, and q8_0 rows
    that are not a multiple of its 32-wide blocks stay f16."""
    from gguf import GGMLQuantizationType as Q

    if len(shape) == 1 or outtype == "f32":
        return Q.F32
    if outtype == "f16" or (outtype == "q8_0" and shape[-1] % 32):
        return Q.F16
    return Q.BF16 if outtype == "bf16" else Q.Q8_0


def convert(array, outtype):
    """(data, GGML type) of the float32 array in the output type."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    kind = ggml_type(array.shape, outtype)
    if kind in (Q.F32, Q.F16):
        return array.astype(np.float32 if kind == Q.F32 else np.float16), kind
    return quantize(array, kind), kind


def architecture(folder, config):
    """llama.cpp's architecture for the config's model_type, or one sentence naming those this exporter writes."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise UserError(f"{folder}/config.json has model_type {model_type!r}; this exporter writes "
                        f"{', '.join(ARCHS)} models only: use llama.cpp's convert_hf_to_gguf.py for it.")
    return ARCHS[model_type]


def write_gguf(folder, path, outtype, config, tokenizer, name, chat_template=None, add_bos=None, names=None):
    """Write the GGUF file; returns the number of tensors written.

    chat_template: tokenizer.chat_template (default the tokenizer's own); add_bos: whether llama.cpp prepends
    BOS (default: whether the tokenizer does); names: (basename, finetune) (default model_names(folder)).
    """
    import gguf

    if outtype not in TYPES:
        raise UserError(f"--outtype={outtype!r} is not one of {', '.join(TYPES)} (k-quants go through the f16 file); "
                        "pass one of them.")
    arch = architecture(folder, config)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    theta, scaling, rope_freqs = rope_settings(config, head_dim)
    if rope_freqs is not None and arch != "llama":
        raise UserError(f"{folder}/config.json asks for llama3 rope scaling on {config.model_type}, which llama.cpp "
                        "applies to llama models only; use llama.cpp's convert_hf_to_gguf.py.")
    model, pre, tokens, types, scores, merges = tokenizer_vocab(folder, tokenizer, config.vocab_size)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    basename, finetune = names or model_names(folder)
    w.add_basename(basename)
    if finetune:
        w.add_finetune(finetune)
    tied = getattr(config, "tie_word_embeddings", False)
    w.add_size_label(gguf.size_label(parameter_count(folder, tied), 0, 0, 0))
    w.add_vocab_size(config.vocab_size)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if "linear" in scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["linear"]))
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    for key, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                       ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if value is not None:
            getattr(w, f"add_{key}_token_id")(value)
    if add_bos is None:
        add_bos = tokenizer.bos_token_id is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
    w.add_add_bos_token(bool(add_bos))
    w.add_add_eos_token(False)
    if model == "llama":
        w.add_add_space_prefix(True)
    chat_template = tokenizer.chat_template if chat_template is None else chat_template
    if chat_template:
        w.add_chat_template(chat_template)

    # Streamed: the tensor table is planned from the safetensors headers, then each tensor is read, converted and
    # written in turn, so memory holds one tensor, not the model (GGUFWriter.add_tensor would keep them all).
    from gguf.quants import quant_shape_to_byte_shape

    def targets(items):
        for hf_name, item in items:
            target = gguf_name(hf_name)
            if target is None and not hf_name.endswith("rotary_emb.inv_freq"):
                unknown.append(hf_name)
            # a tied output projection is left out: llama.cpp then reads token_embd for it
            if target is not None and not (target == "output.weight" and tied):
                yield target, item

    unknown, planned = [], [("rope_freqs.weight", rope_freqs.shape)] if rope_freqs is not None else []
    planned += list(targets(read_weights(folder, shapes_only=True)))
    if unknown:  # raised before the file is opened, so no partial file is left behind
        raise UserError(f"{folder} holds tensors a {arch} GGUF has no place for ({', '.join(unknown[:3])}...); "
                        "merge adapters first with merge_lora.py.")
    for target, shape in planned:
        kind = ggml_type(shape, outtype)  # rope_freqs, 1-D, stays f32
        w.add_tensor_info(target, shape, np.dtype(np.float32), math.prod(quant_shape_to_byte_shape(shape, kind)),
                          raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    if rope_freqs is not None:
        w.write_tensor_data(rope_freqs)
    for target, array in targets(read_weights(folder)):
        if arch in PERMUTED and ".attn_q." in target:  # weight and bias alike
            array = permute_qk(array, heads)
        elif arch in PERMUTED and ".attn_k." in target:
            array = permute_qk(array, kv_heads)
        w.write_tensor_data(convert(array, outtype)[0])
    w.close()
    return len(planned)


def load_llama(gguf_path, **kwargs):
    """llama-cpp-python's Llama on the file, quiet, on 2 threads, weights in llama.cpp's plain CPU buffers: on CPUs
    with AMX its repacked buffers segfault in the first q8_0 matmul (llama.cpp issue 20824;
    bench/RESULTS.md). Llama() takes no such setting, so its default model parameters are patched while it loads."""
    import llama_cpp
    from llama_cpp import Llama

    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without_repacking():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = without_repacking
    try:
        return Llama(model_path=str(gguf_path), n_threads=2, verbose=False, **{"n_ctx": 512, **kwargs})
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults


def llama_cpp_greedy(gguf_path, prompt_ids, max_new_tokens=16, **kwargs):
    """llama.cpp's greedy continuation (token ids) of each prompt, through llama-cpp-python; kwargs go to Llama()
    (lora_path: a GGUF LoRA file applied over the model)."""
    llm = load_llama(gguf_path, logits_all=False, **kwargs)
    outs = []
    for ids in prompt_ids:
        llm.reset()
        out = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if len(out) == max_new_tokens:
                break
        outs.append(out)
    return outs, llm


def llama_cpp_perplexity(gguf_path, text, max_tokens=1024):
    """(perplexity, tokens) of llama.cpp on `text` in one window: its own tokenization, BOS as the file says."""
    llm = load_llama(gguf_path, n_ctx=max_tokens, logits_all=True)
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True)[:max_tokens]
    llm.eval(ids)
    nll = 0.0
    for row, target in zip(llm.scores[:len(ids) - 1], ids[1:]):  # row by row: a window of logits is large
        peak = row.max()
        nll += float(peak + np.log(np.exp(row - peak, dtype=np.float64).sum()) - row[target])
    llm.close()
    return math.exp(nll / (len(ids) - 1)), len(ids)


def quantize(f16_path, out_path, outtype):
    """llama.cpp's quantizer from the f16 file to one of QUANTS; returns how many tensors fell back to another type
    (rows not a multiple of 256, such as SmolLM2's 576: Q4_K falls back to q5_0, Q6_K to q8_0). Its per-tensor log
    is collected instead of printed (llama-cpp-python's callback, put back afterwards, misreads its levels)."""
    import ctypes

    import llama_cpp
    from llama_cpp import _logger

    lines = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTS[outtype])
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        code = llama_cpp.llama_model_quantize(str(f16_path).encode(), str(out_path).encode(), params)
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    if code != 0:
        last = next((line.strip() for line in reversed(lines) if line.strip()), "no message")
        raise UserError(f"llama.cpp could not quantize {f16_path} to {outtype} ({last}); "
                        "check the free disk space, or pass --outtype=f16.")
    return sum("falling back to" in line for line in lines)
