"""Encoding: exact masks, truncation that keeps EOS, packing that changes nothing, the fast path's kernels."""
import pytest
import torch

from utils.data.encoding import IGNORE, Collator, encode_dialogs, encode_texts
from utils.data.templates import load_template


def runs(tokenizer, example):
    """The example as [(masked?, text), ...] runs, the way the summary shows it."""
    out, ids, labels = [], example["input_ids"], example["labels"]
    for i, (t, label) in enumerate(zip(ids, labels)):
        masked = label == IGNORE
        if out and out[-1][0] == masked:
            out[-1][1].append(t)
        else:
            out.append((masked, [t]))
    return [(m, tokenizer.decode(t)) for m, t in out]


def test_masks_single_turn(tokenizer):
    template = load_template("chatml", tokenizer)
    (ex,), _ = encode_dialogs([("", [("who are you?", "I am Lumi.")], "")], tokenizer, template)
    assert runs(tokenizer, ex) == [
        (True, "<|im_start|>user\nwho are you?<|im_end|>\n<|im_start|>assistant\n"),
        (False, "I am Lumi.<|im_end|>"),
    ]


def test_masks_multi_turn_and_train_on_inputs(tokenizer):
    template = load_template("alpaca", tokenizer)
    dialog = ("", [("Hi", "Hello!"), ("Translate", "Hi")], "你好")
    (ex,), _ = encode_dialogs([dialog], tokenizer, template)
    system = template.system + "\n\n"
    assert runs(tokenizer, ex) == [
        (True, system + "### Instruction:\nHi\n\n### Response:\n"),
        (False, "Hello!<|im_end|>"),
        (True, "\n\n### Instruction:\nTranslate\n\n### Input:\n你好\n\n### Response:\n"),
        (False, "Hi<|im_end|>"),
    ]
    (full,), _ = encode_dialogs([dialog], tokenizer, template, train_on_inputs=True)
    assert full["input_ids"] == ex["input_ids"] and full["labels"] == full["input_ids"]


def test_truncation_cuts_context_and_keeps_eos(tokenizer):
    template = load_template("chatml", tokenizer)
    history = [(f"question {i} " * 10, f"answer {i} " * 10) for i in range(6)]
    dialog = ("", history + [("final question", "the final answer")], "")
    (short,), _ = encode_dialogs([dialog], tokenizer, template)
    (ex,), stats = encode_dialogs([dialog], tokenizer, template, cutoff_len=64)
    assert len(short["input_ids"]) > 64 and len(ex["input_ids"]) == 64 and stats["truncated"] == 1
    assert ex["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex["input_ids"]).endswith(
        "final question<|im_end|>\n<|im_start|>assistant\nthe final answer<|im_end|>")
    assert ex["input_ids"][-40:] == short["input_ids"][-40:]  # the tail, answer included, is untouched
    long_answer = ("", [("q", "word " * 300)], "")
    (ex,), _ = encode_dialogs([long_answer], tokenizer, template, cutoff_len=50)
    assert len(ex["input_ids"]) == 50 and ex["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex["input_ids"]).startswith("<|im_start|>user\nq<|im_end|>")  # short prompt kept whole


def test_zero_supervised_tokens_are_dropped_and_counted(tokenizer):
    template = load_template("chatml", tokenizer)
    examples, stats = encode_dialogs([("", [("q " * 50, "a")], "")], tokenizer, template, cutoff_len=1)
    assert examples == [] and stats["dropped"] == 1


def test_pt_blocks(tokenizer):
    examples, stats = encode_texts(["one two three", "four five"], tokenizer, block_size=4)
    stream = [t for e in examples for t in e["input_ids"]]
    assert all(len(e["input_ids"]) <= 4 for e in examples) and stream.count(tokenizer.eos_token_id) == 2
    assert all(e["labels"] == e["input_ids"] for e in examples)


def test_packed_equals_padded(tiny_model_dir, tokenizer):
    """The fast path (packed row, per-example attention, fused LoRA layers, the loss on supervised tokens
    only, with logits or projected in the loss) gives the same loss and LoRA gradients as the plain padded
    batch with transformers' own loss; so does a padded batch whose loss is projected in the loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from utils.train.fast import PACKED_ATTENTION, causal_lm_loss, register_packed_attention
    from utils.train.fast.lora import fast_lora
    from utils.train.fast.loss import project_in_loss

    register_packed_attention()
    template = load_template("auto", tokenizer)
    dialogs = [("", [("q" * n, "answer " * (n % 5 + 1))], "") for n in (1, 7, 20, 3)]
    dialogs.append(("", [("Hi", "Hello!"), ("Name?", "Lumi.")], ""))
    examples, _ = encode_dialogs(dialogs, tokenizer, template)
    results = []
    for packing, fast in ((False, False), (True, False), (True, True), (False, True)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                     attn_implementation=PACKED_ATTENTION if packing else "sdpa")
        model.config.use_cache = False
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False))
        head = None
        if fast:
            fast_lora(model)
            head = project_in_loss(model)
            assert head is model.base_model.model.lm_head
        batch = Collator(tokenizer.pad_token_id, packing)(examples)
        if packing:
            assert batch["input_ids"].shape[0] == 1 and len(batch["logits_to_keep"]) < batch["input_ids"].shape[1] / 2
        if packing or fast:
            labels = batch.pop("labels")
            outputs = model(**batch)
            rows = len(batch["logits_to_keep"]) if packing else batch["input_ids"].shape[1]
            assert outputs.logits.shape[1:] == (rows, model.config.hidden_size if fast else model.config.vocab_size)
            loss = causal_lm_loss(outputs, labels, head=head)
        else:
            loss = model(**batch).loss
        loss.backward()
        results.append((loss.item(), [p.grad for n, p in model.named_parameters() if p.requires_grad]))
    (padded_loss, padded_grads), *fast_paths = results
    for loss, grads in fast_paths:
        assert abs(loss - padded_loss) < 1e-5
        assert len(grads) == 2 * 3 * 2 and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, padded_grads))


def test_linear_cross_entropy_equals_full_logits(monkeypatch):
    """_LinearCrossEntropy, in blocks of rows, gives F.cross_entropy's loss and hidden-state gradient on the
    full logits: to fp32 rounding in fp32, and to bf16's precision under bf16 autocast."""
    import torch.nn.functional as F

    from utils.train.fast.loss import _LinearCrossEntropy

    monkeypatch.setattr(_LinearCrossEntropy, "BLOCK", 7 * 300)  # 7 rows per block: 43 rows make 7 blocks
    torch.manual_seed(0)
    hidden, weight, targets = torch.randn(43, 32), torch.randn(300, 32) * 0.3, torch.randint(0, 300, (43,))
    for autocast, tolerance in ((False, 1e-5), (True, 0.02)):
        results = []
        for fused in (False, True):
            h = hidden.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                if fused:
                    loss = _LinearCrossEntropy.apply(h, weight, targets) / 43
                else:
                    loss = F.cross_entropy(F.linear(h, weight).float(), targets, reduction="sum") / 43
            loss.backward()
            results.append((loss.item(), h.grad))
        (want, want_grad), (got, got_grad) = results
        assert abs(got - want) < tolerance * want
        assert got_grad.dtype == torch.float32 and ((got_grad - want_grad).norm() / want_grad.norm()).item() < tolerance


@pytest.mark.parametrize("keep_up_to", [1024, 0], ids=["kept probabilities", "recomputed in chunks"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0.03)])
def test_causal_attention_equals_sdpa(monkeypatch, dtype, tolerance, keep_up_to):
    """causal_attention (the CPU bf16 path of packed rows) gives causal SDPA's outputs and gradients, per
    example, with grouped-query heads, whether an example keeps its probabilities for the backward or is
    recomputed in chunks (examples longer than a chunk included): exactly in fp32, to bf16's precision in bf16."""
    import torch.nn.functional as F

    from utils.train.fast.attention import _CausalAttention, causal_attention

    monkeypatch.setattr(_CausalAttention, "CHUNK", 8)
    monkeypatch.setattr(_CausalAttention, "KEEP_UP_TO", keep_up_to)
    lengths, heads, kv_heads, dim = [20, 1, 8, 13, 9], 6, 2, 16
    torch.manual_seed(0)
    inputs = [torch.randn(n, sum(lengths), dim, dtype=torch.float64) for n in (heads, kv_heads, kv_heads)]
    grad_out = torch.randn(heads, sum(lengths), dim, dtype=torch.float64)

    def run(attend, dtype):
        q, k, v = [x.detach().to(dtype).requires_grad_() for x in inputs]
        out = attend(q, k, v)
        out.backward(grad_out.to(dtype))
        return [t.double() for t in (out, q.grad, k.grad, v.grad)]

    def sdpa(q, k, v):
        k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
        return torch.cat([F.scaled_dot_product_attention(*parts, is_causal=True, scale=0.3)
                          for parts in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))], 1)

    expected = run(sdpa, torch.float64)
    got = run(lambda q, k, v: causal_attention(q, k, v, lengths, 0.3), dtype)
    for name, a, b in zip(("output", "query grad", "key grad", "value grad"), got, expected):
        assert ((a - b).norm() / b.norm()).item() < tolerance, name
