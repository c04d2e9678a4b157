"""Tokenization in llama.cpp equals the HF tokenizer's, on one fixed multilingual text with a chat template's special
tokens, for the three tokenizer families our GGUF files carry: the built-in SmolLM2 (GPT-2-style byte-level BPE), a
LLaMA-2-style SentencePiece tokenizer and LLaMA-3/Qwen2-style byte-level BPEs with a split regex (both trained here).
Run with -s to see each family's line."""
import importlib.util
import json
import shutil
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT))
import export_gguf  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                                   reason="llama_cpp is not importable: pip install -r "
                                                          "requirements-dev.txt (builds llama-cpp-python, ~8 min)")]

# English, Chinese, digits, code, emoji, whitespace runs ("\n\n\n", spaces, tabs, trailing), punctuation
TEXT = ("Hello, world! It's 2026-12-05; the price is $1,234.56 (about 1234567 cents). I'VE been told they'll go.\n"
        "中文测试：北京是中国的首都。你好，世界！数字１２３和123。\n"
        "def add(a, b):\n    return a + b  # sum of 2 numbers\n\n\n"
        "Emoji: 🦙🚀 😶‍🌫️ ✅ 👍🏽\n"
        "   three spaces,\ttab\t\there\n\n\n\nand  two  spaces   \n"
        "x=1;y=22;z=333;w=4444 \n\n1. first\n  2. second")
CORPUS = ([TEXT] * 3 + ["The quick brown fox jumps over the lazy dog. 中国的首都是北京。 12345."] * 40
          + [f"Hello world, a tiny corpus line {i}: value = {i * 37}\n" for i in range(200)]
          + ["def f(x):\n    return x + 1\n\n\nclass A:\n    pass\n"] * 20)


def chat(start, end, bos=""):
    """TEXT inside a ChatML conversation, as the chat template renders it (special tokens included)."""
    return f"{bos}{start}system\nBe brief.{end}\n{start}user\n{TEXT}{end}\n{start}assistant\nOK 42{end}\n{start}user\n"


def tiny_llama(folder, tokenizer):
    """A 1-layer LLaMA around the tokenizer (its vocabulary is what the GGUF file carries)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def compare(family, folder, tokenizer, text, tmp_path):
    """Export the folder, tokenize `text` in llama.cpp (vocab only) and with the HF tokenizer; print one line."""
    from gguf import GGUFReader

    from utils.export.gguf import load_llama

    path = tmp_path / f"{folder.name}.gguf"
    export_gguf.main(model_path=str(folder), outtype="f32", output=str(path))
    field = GGUFReader(str(path)).fields
    model, pre = field["tokenizer.ggml.model"].contents(), field["tokenizer.ggml.pre"].contents()
    llm = load_llama(path, vocab_only=True)
    got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    want = tokenizer(text, add_special_tokens=False).input_ids
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    print(f"\n{family}: tokenizer.ggml.model={model}, pre={pre}: llama.cpp {len(got)} tokens, HF {len(want)} tokens, "
          + ("identical" if got == want else f"FIRST DIFFERENCE at token {first}: llama.cpp {got[first:first + 5]}, "
                                             f"HF {want[first:first + 5]}"))
    llm.close()
    return got, want, pre


def test_builtin_smollm2(tmp_path, tiny_model_dir, tokenizer):
    """The built-in model's tokenizer (the tiny LLaMA fixture carries it unchanged). The built-in conversion gives it
    SmolLM2's own split, every digit isolated before GPT-2's (transformers does not derive it from the package's
    GGUF), which llama.cpp calls smollm."""
    got, want, pre = compare("SmolLM2 (built-in)", tiny_model_dir, tokenizer, chat("<|im_start|>", "<|im_end|>"),
                             tmp_path)
    assert pre == "smollm" and got == want


def test_smollm2_with_gpt2_split(tmp_path, tiny_model_dir, tokenizer):
    """SmolLM2's vocabulary with GPT-2's split alone, the pre-tokenizer transformers derives from the package's GGUF
    (which the built-in conversion replaces): written as gpt-2, also exact in llama.cpp. It differs from SmolLM2's
    own split where a digit follows a whitespace run ("\\n\\n1" is two tokens in SmolLM2's, three in GPT-2's)."""
    from tokenizers import pre_tokenizers

    folder = tmp_path / "smollm2-gpt2"
    shutil.copytree(tiny_model_dir, folder)
    hf = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    hf["pre_tokenizer"] = json.loads(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                                              use_regex=True).__getstate__())
    (folder / "tokenizer.json").write_text(json.dumps(hf, ensure_ascii=False), encoding="utf-8")
    from utils.model.loading import load_tokenizer

    gpt2 = load_tokenizer(folder)
    got, want, pre = compare("SmolLM2, GPT-2's split (gpt-2)", folder, gpt2, chat("<|im_start|>", "<|im_end|>"),
                             tmp_path)
    assert pre == "gpt-2" and got == want
    assert len(tokenizer("\n\n1", add_special_tokens=False).input_ids) == 2
    assert len(gpt2("\n\n1", add_special_tokens=False).input_ids) == 3


@pytest.mark.parametrize("legacy", [True, False])
def test_sentencepiece_llama2_style(tmp_path, legacy):
    """A SentencePiece BPE (byte fallback, digits split, no normalization: as LLaMA-2's) trained here, loaded as
    transformers loads a LLaMA-2 folder (tokenizer.model converted), with ChatML special tokens added.

    legacy=True is sentencepiece's own behaviour, which llama.cpp reproduces: every text after a special token
    starts with "▁". transformers' legacy=False prefixes only the text at the very start, which llama.cpp cannot
    express (its add_space_prefix is one switch for both): there the two differ right after special tokens, and
    only there."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=600,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    folder = tmp_path / "llama2ish"
    folder.mkdir()
    shutil.copy(tmp_path / "sp.model", folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "legacy": legacy}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tiny_llama(folder, tokenizer)
    text = chat("<|im_start|>", "<|im_end|>", bos="<s>")
    got, want, pre = compare(f"SentencePiece (LLaMA-2 style, legacy={legacy})", folder, tokenizer, text, tmp_path)
    assert pre == "default"
    if legacy:
        assert got == want
    else:  # the same once each text after a special token is given the "▁" llama.cpp gives it
        from utils.export.gguf import load_llama

        llm = load_llama(tmp_path / "llama2ish.gguf", vocab_only=True)
        for part in text.split("<|im_start|>")[1:]:
            part = part.split("<|im_end|>")[0]
            assert llm.tokenize(part.encode(), add_bos=False, special=True) == tokenizer(
                part, add_special_tokens=False).input_ids, part
        assert got != want


@pytest.mark.parametrize("style", ["llama3", "qwen2"])
def test_byte_level_bpe_with_split_regex(tmp_path, style):
    """A tiktoken-style byte-level BPE trained here with the `tokenizers` library: LLaMA-3's split regex and whole
    words looked up before merging (ignore_merges), or Qwen2's (single digits, NFC, merges always)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from utils.export.gguf import LLAMA3_SPLIT, QWEN2_SPLIT

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    if style == "qwen2":
        bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT if style == "llama3" else QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    state = json.loads(bpe.to_str())
    state["model"]["ignore_merges"] = style == "llama3"
    bpe = Tokenizer.from_str(json.dumps(state))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|im_end|>")
    folder = tiny_llama(tmp_path / f"{style}ish", tokenizer)
    got, want, pre = compare(f"byte-level BPE ({style} style)", folder, tokenizer,
                             chat("<|im_start|>", "<|im_end|>", bos="<|begin_of_text|>"), tmp_path)
    assert pre == {"llama3": "llama-bpe", "qwen2": "qwen2"}[style] and got == want


def test_builtin_cache_from_an_older_conversion_is_converted_again(tmp_path, monkeypatch, smollm2_dir):
    """A cached built-in folder without the current conversion's marker (one converted with GPT-2's split alone) is
    replaced, so users upgrading train, chat and export with SmolLM2's own tokenization."""
    from utils.model.builtin import BUILTIN_CONVERSION, builtin_path

    monkeypatch.setenv("LORA_KIT_CACHE", str(tmp_path))
    old = tmp_path / "smollm2-135m-instruct"
    shutil.copytree(smollm2_dir, old)
    (old / "lora-kit-conversion.txt").unlink()
    (old / "stale.txt").write_text("from the older conversion")
    assert builtin_path() == old
    assert (old / "lora-kit-conversion.txt").read_text().strip() == BUILTIN_CONVERSION
    assert not (old / "stale.txt").exists() and not list(tmp_path.glob(".old-*")) + list(tmp_path.glob(".tmp-*"))
    assert "Digits" in json.dumps(json.loads((old / "tokenizer.json").read_text())["pre_tokenizer"])
