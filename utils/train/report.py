"""The end-of-run report: what training changed, told before the user finds out in a chat window.

The base model (the adapter switched off: no second copy) and the tuned model answer the same prompts, the
validation records' and the probes', greedily and with no repetition penalty, as llama.cpp, vLLM and Ollama
decode by default. The report says how often each model ends its answer by itself (EOS or an end-of-turn token
before --report_max_new_tokens), how often it loops (some LOOP_NGRAM tokens in a row come back LOOP_REPEATS
times), how long it talks, how often a probe's expected words appear, and for validation records how often
the tuned answer is the reference exactly. It warns, with the likely causes, when the tuned model stops less
often than the base or loops more. report.md and report.json go to the run folder.
"""
import collections
import json
import re
import time
from pathlib import Path

from utils.core.errors import UserError
from utils.core.files import ROOT, cache_dir, write_text_atomic
from utils.data.encoding import IGNORE, Encoder, encode_prompt
from utils.data.preference import sides
from utils.model.distributed import shards_weights

DATA = ROOT / "data"
LOOP_NGRAM, LOOP_REPEATS = 5, 3
MAX_VALIDATION = 16  # validation records answered in the report, the first ones
PT_PROMPT_TOKENS = 32  # --stage pt: the head of each held text the models continue
CACHED_ANSWERS = 1000  # base answers kept per base model (BaseAnswers)


def read_probes(value, demo=False):
    """--probe_prompts: None (the shipped general probes, data/probes.json, plus data/demo_probes.json for the
    demo data), a .json file (a list of strings or of {"prompt", "expect"}: a regex the answer should match),
    a .txt file (one prompt a line), one prompt, or a list of prompts. Returns [{"prompt", "expect"}]."""
    if value is None:
        return read_probes(str(DATA / "probes.json")) + (read_probes(str(DATA / "demo_probes.json")) if demo else [])
    if isinstance(value, (list, tuple)):
        return [probe for v in value for probe in read_probes(str(v))]
    path = Path(str(value))
    if path.suffix in (".json", ".txt") and not path.is_file():
        raise UserError(f"--probe_prompts={path} does not exist; pass a .json or .txt file of prompts, or the prompts.")
    if path.suffix not in (".json", ".txt"):
        return [{"prompt": str(value), "expect": None}]
    try:
        if path.suffix == ".txt":
            return [{"prompt": line.strip(), "expect": None}
                    for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        items = json.loads(path.read_text(encoding="utf-8"))
        probes = [{"prompt": p, "expect": None} if isinstance(p, str) else
                  {"prompt": p["prompt"], "expect": p.get("expect")} for p in items]
        for probe in probes:
            if not isinstance(probe["prompt"], str) or not probe["prompt"].strip():
                raise ValueError("a prompt is not a non-empty string")
            if probe["expect"] is not None:
                re.compile(probe["expect"])
        return probes
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, re.error) as e:
        raise UserError(f"--probe_prompts={path} is not a list of prompts ({type(e).__name__}: {e}); write a JSON "
                        'list of strings or of {"prompt": ..., "expect": "regex"}, or a .txt file of one prompt a line.'
                        ) from None


def loops(ids, n=LOOP_NGRAM, repeats=LOOP_REPEATS):
    """Whether some n tokens in a row occur `repeats` times in the answer."""
    counts = collections.Counter(tuple(ids[i:i + n]) for i in range(len(ids) - n + 1))
    return bool(counts) and max(counts.values()) >= repeats


def greedy(model, tokenizer, prompts, stop_ids, max_new_tokens, batch_size=64):
    """[(answer ids up to the first stop token, whether one came)] for each prompt (token ids), decoded greedily
    with no penalty in left-padded batches."""
    import torch
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
                              eos_token_id=sorted(stop_ids), pad_token_id=pad)
    answers = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
        with torch.no_grad():
            rows = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        rows = rows[:, width:].tolist()
        for row in rows:
            cut = next((i for i, t in enumerate(row) if t in stop_ids), None)
            answers.append((row if cut is None else row[:cut], cut is not None))
    return answers


def figures(answers, expects=()):
    """The shares that stop and loop, the mean length in tokens, and the expected-words hits where asked."""
    n = max(len(answers), 1)
    result = {"answers": len(answers), "stop": sum(a["stopped"] for a in answers) / n,
              "loop": sum(a["loops"] for a in answers) / n, "mean_tokens": sum(a["tokens"] for a in answers) / n}
    asked = [(a, e) for a, e in zip(answers, expects) if e]
    if asked:
        result["expected"] = sum(bool(re.search(e, a["text"], re.IGNORECASE)) for a, e in asked) / len(asked)
    return result


def _validation_items(val, tokenizer, stage):
    """(prompt ids, reference text) of the first validation examples: sft splits at the last answer (its tokens
    are the supervised ones at the end), dpo likewise with a pair's chosen answer, pt gives the head of each held
    block and no reference."""
    items = []
    for i in range(min(len(val or ()), MAX_VALIDATION)):
        example = val[i]
        if "prompt_ids" in example:  # a preference pair (--stage dpo): its chosen answer is the reference
            example = sides(example)[0]
        ids, labels = list(example["input_ids"]), list(example["labels"])
        if stage == "pt":
            items.append((ids[:PT_PROMPT_TOKENS], None))
            continue
        start = len(labels)
        while start > 0 and labels[start - 1] != IGNORE:
            start -= 1
        if 0 < start < len(ids):  # with --train_on_inputs nothing is masked: no prompt to split off
            answer = [t for t in ids[start:] if t != tokenizer.eos_token_id]
            items.append((ids[:start], tokenizer.decode(answer, skip_special_tokens=True).strip()))
    return items


def end_of_run_report(model, tokenizer, template, out, stage="sft", val=None, probes=(), eval_loss=None,
                      max_new_tokens=128, say=print, engine=None):
    """Answer the validation prompts and the probes with the adapter off and on, print the comparison and write
    report.md and report.json to `out`. `model` is the trained peft model; it is left ready for inference. Under
    an `engine` that shards the weights (ZeRO-3, FSDP2) no process holds the whole model: it says so instead."""
    if shards_weights(engine):
        return say(f"no report: under {engine} no process holds the whole model; merge the adapter "
                   f"(merge_lora.py) and chat with the merged model instead")
    from utils.serve.generation import stop_token_ids  # late: imports torch (flag checks stay torch-free)
    from utils.train.fast import for_inference  # imports torch, as above

    for_inference(model)
    items = [("validation", None, ids, ref) for ids, ref in _validation_items(val, tokenizer, stage)]
    texts = Encoder(tokenizer, "pt").tokenize([p["prompt"] for p in probes]) if stage == "pt" else []
    for i, p in enumerate(probes):  # --stage pt continues each probe as raw text (no BOS, as pt trained)
        ids = texts[i] if texts else encode_prompt(tokenizer, template, "", [], p["prompt"])
        items.append(("probe", p, ids, None))
    if not items:
        say("report: no validation data and no --probe_prompts to answer; skipped.")
        return None
    prompts, stops = [ids for _, _, ids, _ in items], stop_token_ids(tokenizer, model, template)
    cache, started = BaseAnswers(model, stops, max_new_tokens), time.time()
    missing, kept = cache.missing(prompts), sum(cache.key(ids) in cache.answers for ids in prompts)
    say(f"report: {len(prompts)} prompts, answered by the tuned model and {len(missing)} by the base model "
        f"({kept} base answers kept from an earlier run on this base) ...")
    if missing:  # the base model is the same weights with the adapter switched off: no second copy
        with model.disable_adapter():  # a batch of its own is faster than peft's per-row adapters (bench/RESULTS.md)
            cache.add(missing, greedy(model, tokenizer, missing, stops, max_new_tokens))
    base = [cache.answers[cache.key(ids)] for ids in prompts]
    tuned = greedy(model, tokenizer, prompts, stops, max_new_tokens)  # alone, so a cached base changes nothing
    rows = []
    for (kind, probe, ids, ref), b, t in zip(items, base, tuned):
        row = {"kind": kind, "prompt": probe["prompt"] if probe else tokenizer.decode(ids, skip_special_tokens=True),
               "reference": ref, "expect": probe and probe["expect"]}
        for name, (answer, stopped) in (("base", b), ("tuned", t)):
            row[name] = {"text": tokenizer.decode(answer, skip_special_tokens=True).strip(), "stopped": stopped,
                         "loops": loops(answer), "tokens": len(answer)}
        rows.append(row)
    expects = [r["expect"] for r in rows]
    report = {"max_new_tokens": max_new_tokens, "loop_rule": f"{LOOP_NGRAM} tokens in a row seen {LOOP_REPEATS} times",
              "base_answers_from_cache": kept, "seconds": round(time.time() - started, 1),
              "figures": {name: figures([r[name] for r in rows], expects) for name in ("base", "tuned")}}
    held = [r for r in rows if r["reference"] is not None]
    if held or eval_loss is not None:
        same = sum(r["tuned"]["text"] == r["reference"] for r in held)
        report["validation"] = {"loss": eval_loss, "answered": len(held), "exact_match": same / max(len(held), 1)}
    report["warnings"] = warnings(report["figures"]["base"], report["figures"]["tuned"])
    report["prompts"] = rows
    write_text_atomic(Path(out) / "report.json", json.dumps(report, ensure_ascii=False, indent=1) + "\n", "output_dir")
    write_text_atomic(Path(out) / "report.md", markdown(report), "output_dir")
    say(terminal(report))
    return report


class BaseAnswers:
    """The base model's report answers kept from earlier runs, in the cache folder (utils.core.files.cache_dir()):
    runs on the same base answer the same probes again only with the tuned model, which halves the report's work
    and skips the base's long, looping answers. A file holds the answers of one base, loaded and decoded one way:
    its name hashes the weight files (path, size, modification time), the dtype, quantization and device, the stop
    ids, the token limit and the library versions. The cache only saves time: when it cannot be read or written,
    every answer is computed."""

    def __init__(self, model, stops, max_new_tokens):
        import hashlib

        import peft
        import torch
        import transformers

        self.answers, self.path = {}, None
        base = model.get_base_model()
        folder = Path(str(getattr(base.config, "_name_or_path", "") or "."))
        weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.glob("*")
                         if f.suffix in (".safetensors", ".bin", ".gguf")) if folder.is_dir() else []
        if not weights:  # not a local folder of weights: nothing to key the answers on
            return
        quantization = getattr(base.config, "quantization_config", None)
        key = json.dumps([str(folder.resolve()), weights, str(base.dtype), str(quantization), base.device.type,
                          sorted(stops), max_new_tokens, torch.__version__, transformers.__version__,
                          peft.__version__], default=str)
        try:
            self.path = cache_dir() / "report" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
            if self.path.is_file():
                self.answers = {k: (ids, stopped) for k, (ids, stopped) in
                                json.loads(self.path.read_text(encoding="utf-8")).items()}
        except (OSError, ValueError, TypeError, UserError):  # unreadable or damaged: computed again
            self.answers = {}

    @staticmethod
    def key(ids):
        return ",".join(map(str, ids))

    def missing(self, prompts):
        """The prompts (token ids) not answered yet, each once."""
        return list({self.key(ids): list(ids) for ids in prompts if self.key(ids) not in self.answers}.values())

    def add(self, prompts, answers):
        self.answers.update({self.key(p): (list(answer), stopped) for p, (answer, stopped) in zip(prompts, answers)})
        if prompts and self.path is not None:
            kept = dict(list(self.answers.items())[-CACHED_ANSWERS:])  # the newest: validation prompts change
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(self.path, json.dumps(kept), "LORA_KIT_CACHE")
            except (OSError, UserError):
                pass


def warnings(base, tuned):
    """The sentences to print when training made answers stop less often or loop more."""
    said = []
    if tuned["stop"] < base["stop"]:
        said.append(f"the tuned model ends {tuned['stop']:.0%} of its answers by itself, the base {base['stop']:.0%}")
    if tuned["loop"] > base["loop"]:
        said.append(f"{tuned['loop']:.0%} of the tuned model's answers loop, the base's {base['loop']:.0%}")
    if said:
        said.append("likely causes: answers in the data that do not end (EOS is added to each answer; check that "
                    "the --template's end-of-turn token matches the model's), too high a --learning_rate, or too many "
                    "--num_epochs on too few records; try a lower --learning_rate or fewer --num_epochs, or more "
                    "varied answers")
    return said


def _summary_lines(report):
    lines = []
    for name in ("base", "tuned"):
        f = report["figures"][name]
        expected = f"   expected words {f['expected']:>5.0%}" if "expected" in f else ""
        lines.append(f"{name:<6} stops {f['stop']:>5.0%}   loops {f['loop']:>5.0%}   "
                     f"mean {f['mean_tokens']:>5.1f} tokens{expected}")
    if "validation" in report:
        v = report["validation"]
        lines.append(f"validation: loss {v['loss']:.3f}, " if v["loss"] is not None else "validation: ")
        lines[-1] += f"{v['exact_match']:.0%} of {v['answered']} answers equal the reference"
    return lines


def terminal(report, width=56):
    """The comparison for the terminal: each prompt's two answers side by side, cut to `width`."""
    def cut(text, marks=""):  # the marks stay when the text is cut
        text = " ".join(text.split())
        room = width - len(marks)
        return (text if len(text) <= room else text[:room - 1] + "…") + marks

    lines = [f"--- report ({report['seconds']} s; greedy, no repetition penalty, up to {report['max_new_tokens']} "
             "new tokens; [loop] loops, [...] did not stop) ---", f"{'base':<{width}}  | tuned"]
    for r in report["prompts"]:
        lines.append(f"> {cut(r['prompt'])}")
        b, t = (r[n] for n in ("base", "tuned"))
        marks = [(" [loop]" if a["loops"] else "") + ("" if a["stopped"] else " [...]") for a in (b, t)]
        lines.append(f"{cut(b['text'], marks[0]):<{width}}  | {cut(t['text'], marks[1])}")
    lines += _summary_lines(report)
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)


def markdown(report):
    def cell(text):
        return " ".join(text.split()).replace("|", "\\|") or " "

    lines = ["# What the run changed", "",
             f"Greedy decoding, no repetition penalty, at most {report['max_new_tokens']} new tokens; an answer loops "
             f"when {report['loop_rule']}.", "", "```", *_summary_lines(report), "```", ""]
    lines += [f"**Warning:** {w}" for w in report["warnings"]] + ([""] if report["warnings"] else [])
    lines += ["| | prompt | base | tuned |", "|---|---|---|---|"]
    for r in report["prompts"]:
        marks = [(" *(loops)*" if r[n]["loops"] else "") + ("" if r[n]["stopped"] else " *(did not stop)*")
                 for n in ("base", "tuned")]
        lines.append(f"| {r['kind']} | {cell(r['prompt'])} | {cell(r['base']['text'])}{marks[0]} | "
                     f"{cell(r['tuned']['text'])}{marks[1]} |")
    return "\n".join(lines) + "\n"
