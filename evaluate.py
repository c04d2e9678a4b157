"""Multiple-choice subject knowledge on C-Eval or CMMLU: per-subject and average accuracy.

    python evaluate.py --data_dir=../shared/data/cmmlu                         # built-in model, letter, 0-shot
    python evaluate.py --model_path=models/merged --data_dir=data/ceval --few_shot=5
    python evaluate.py --lora_model=output/ --data_dir=data/cmmlu --method=cloze --subjects=anatomy,world_history
    python evaluate.py --data_dir=data/ceval --split=test --few_shot=5           # C-Eval test: a submission file

--method letter (default) is the official protocol: a k-shot prompt from the dev split, and the option
letter with the highest next-token logit wins. --method cloze is lm-eval-harness's: each option's text
is scored by its log-probability after `Question: ...\\nAnswer:`; small models show their knowledge
here, while their letter scores sit near chance (25%). Writes a results JSON (and, for a split without
answers, a C-Eval submission JSON) to --output_dir.
"""
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

from utils.core.cli import run_cli
from utils.core.errors import UserError, as_list
from utils.core.files import output_problem, write_text_atomic
from utils.core.flags import Checks
from utils.eval.ceval_cmmlu import (
    CHOICES,
    SharedPrefix,
    batches,
    cloze_example,
    cloze_tokens,
    fit_shots,
    letter_example,
    letter_header,
    letter_token_ids,
    log_probs_at,
    read_questions,
    subject_files,
    subject_title,
)

ROOT = Path(__file__).resolve().parent


def build_items(tokenizer, layout, title, shots, questions, method, few_shot, max_length):
    """One scoring item per prompt (letter) or per option (cloze), and the shots each question kept."""
    encode = lambda text: tokenizer(text).input_ids  # noqa: E731 - the tokenizer's defaults (BOS for LLaMA)
    if method == "letter":
        head = letter_header(title, layout)
        shot_text = [letter_example(s, layout, True) for s in shots]
    else:
        head, shot_text = "", [cloze_example(s, True) for s in shots]
    items, used = [], []
    for qi, q in enumerate(questions):
        if method == "letter":
            query = letter_example(q, layout, False)
            build = lambda k: [(encode(head + "".join(shot_text[:k]) + query), 0)]  # noqa: E731
        else:
            query = cloze_example(q, False)

            def build(k, query=query, q=q):
                pairs = [cloze_tokens(encode, "".join(shot_text[:k]) + query, option) for option in q.options]
                return [(ctx + cont, len(cont)) for ctx, cont in pairs]
        k, seqs = fit_shots(build, few_shot, max_length)
        used.append(k)
        items += [(k, qi, option, ids, n) for option, (ids, n) in enumerate(seqs)]
    return items, used, [encode(head + "".join(shot_text[:k])) for k in range(few_shot + 1)]


def score(model, tokenizer, items, prefixes, method, batch_size, pad_id, bar):
    """{(question, option): score}; for letter, option -1 maps to the four letters' log-probabilities."""
    import torch

    letters = letter_token_ids(tokenizer)
    out = {}
    by_shots = defaultdict(list)
    for item in items:
        by_shots[item[0]].append(item)
    for k, group in sorted(by_shots.items()):
        # the shared head is worth caching when it is long compared with what follows it
        prefix = SharedPrefix(model, prefixes[k]) if k and len(prefixes[k]) >= 32 else None
        group.sort(key=lambda item: len(item[3]))
        if method == "cloze":  # a question's context is run once, then its four options from that cache
            per_question = defaultdict(list)
            for item in group:
                per_question[item[1]].append(item)
            group = list(per_question.values())
        for batch in (group if method == "cloze" else batches(group, batch_size)):
            if method == "letter":
                seqs = [ids for *_, ids, _ in batch]
                rows = log_probs_at(model, seqs, [[len(s) - 1] for s in seqs], prefix, pad_id)
                for (_, qi, *_), row in zip(batch, rows):
                    out[qi] = row[0, letters]
            else:
                seqs = [ids[:-1] for *_, ids, _ in batch]  # the last token is only ever a target
                positions = [list(range(len(ids) - n - 1, len(ids) - 1)) for *_, ids, n in batch]
                context = seqs[0][:min(p[0] for p in positions) + 1]
                rows = log_probs_at(model, seqs, positions, SharedPrefix(model, context, prefix), pad_id)
                for (_, qi, option, ids, n), row in zip(batch, rows):
                    out[qi, option] = row.gather(1, torch.tensor(ids[-n:])[:, None]).sum().item()
            bar.update(len(batch))
    return out


def predict(scores, questions, method):
    """Predicted letters; cloze gives three: by summed log-probability, per character, per UTF-8 byte."""
    if method == "letter":
        return {"acc": [CHOICES[int(scores[qi].argmax())] for qi in range(len(questions))]}
    preds = {"acc": [], "acc_norm": [], "acc_bytes": []}
    for qi, q in enumerate(questions):
        lls = [scores[qi, o] for o in range(4)]
        for name, length in (("acc", lambda s: 1), ("acc_norm", len), ("acc_bytes", lambda s: len(s.encode()))):
            norm = [ll / max(length(opt), 1) for ll, opt in zip(lls, q.options)]
            preds[name].append(CHOICES[max(range(4), key=norm.__getitem__)])
    return preds


def main(
    model_path: str = None,
    lora_model: str = None,
    base_model: str = None,
    data_dir: str = None,
    subjects: str = None,
    split: str = None,
    few_shot: int = 0,
    method: str = "letter",
    output_dir: str = None,
    batch_size: int = 16,
    max_length: int = None,
    precision: str = "auto",
    local_files_only: bool = False,
    limit: int = None,
    trust_remote_code: bool = None,
):
    """Score a model on C-Eval or CMMLU and write the results.

    Args:
        model_path: an HF model folder or hub id (a merged model); none and no lora_model: the built-in model.
        lora_model: a finetune.py output folder; its base model comes from its run_config.json.
        base_model: override the adapter's base model.
        data_dir: a C-Eval (dev/ val/ test/, files `{subject}_{split}.csv`) or CMMLU (dev/ test/, `{subject}.csv`)
            folder.
        subjects: comma-separated subject names (file names without `_{split}.csv`); default all.
        split: the split to score: default val when data_dir has one (C-Eval), else test.
        few_shot: solved dev examples before each question (C-Eval and CMMLU publish 5-shot and 0-shot).
        method: letter (official: next-token logits of A-D) or cloze (lm-eval-harness: log-probability of each
            option's text).
        output_dir: where the JSON files go; default eval_results/ in the toolkit folder.
        batch_size: questions per forward pass for letter (cloze runs each question's context once, then its four
            options as one batch).
        max_length: prompt limit in tokens, above which shots are dropped one at a time; default the model's context.
        precision: auto, bf16, fp16 or fp32 for the weights (also --dtype).
        local_files_only: never download a model from the hub.
        limit: score only the first N questions of each subject (a quick check, not a benchmark figure).
        trust_remote_code: run the Python code the model ships; default: what training recorded in run_config.json.
    """
    c = Checks()
    model_path, lora_model = c.text("model_path", model_path), c.text("lora_model", lora_model)
    base_model = c.text("base_model", base_model)
    data_dir, split = c.text("data_dir", data_dir, True, "path/to/cmmlu"), c.text("split", split)
    output_dir = c.text("output_dir", output_dir)
    method = c.choice("method", method, ("letter", "cloze"))
    precision = c.choice("precision", precision, ("auto", "bf16", "fp16", "fp32"))
    few_shot, batch_size = c.integer("few_shot", few_shot, 0), c.integer("batch_size", batch_size, 1)
    max_length, limit = c.integer("max_length", max_length, 16, none=True), c.integer("limit", limit, 1, none=True)
    local_files_only = c.boolean("local_files_only", local_files_only)
    trust_remote_code = None if trust_remote_code is None else c.boolean("trust_remote_code", trust_remote_code)
    if isinstance(data_dir, str) and not Path(data_dir).expanduser().is_dir():
        c.add(f"--data_dir={data_dir} is not a folder; pass an unpacked C-Eval or CMMLU folder (with dev/ and test/)")
    if not isinstance(output_dir, bool):
        c.add(output_problem(output_dir or ROOT / "eval_results", "output_dir"))
    if model_path and lora_model:
        c.add("--model_path and --lora_model exclude each other; pass a merged folder or an adapter folder")
    c.done()
    data_dir = Path(data_dir).expanduser().resolve()
    split = split or ("val" if (data_dir / "val").is_dir() else "test")
    files = subject_files(data_dir, split)
    wanted = as_list(subjects, "subjects") or sorted(files)
    unknown = [s for s in wanted if s not in files]
    if unknown:
        raise UserError(f"no {split} file for subject(s) {', '.join(unknown)} in {data_dir / split}; "
                        f"it has {', '.join(sorted(files))}.")
    dev_files = subject_files(data_dir, "dev") if few_shot else {}
    data = {}
    for subject in wanted:  # read and check every file before loading the model
        layout, questions = read_questions(files[subject])
        questions = questions[:limit] if limit else questions
        shots = []
        if few_shot:
            if subject not in dev_files:
                raise UserError(f"{data_dir / 'dev'} has no file for {subject}; "
                                "--few_shot needs solved dev examples, or pass --few_shot=0.")
            shots = read_questions(dev_files[subject])[1]
            if any(s.answer is None for s in shots):
                raise UserError(f"{dev_files[subject]} has no answer column; few-shot examples need answers.")
        data[subject] = (layout, questions, shots[:few_shot], subject_title(subject, data_dir))

    from tqdm.auto import tqdm

    from utils.core.host import reuse_freed_memory
    from utils.model.loading import load_for_inference

    model, tokenizer, _, _ = load_for_inference(model_path, lora_model, base_model, precision=precision,
                                               local_files_only=local_files_only, trust_remote_code=trust_remote_code)
    reuse_freed_memory()  # scoring allocates large logits per batch: keep that memory instead of page-faulting it anew
    max_length = int(max_length or getattr(model.config, "max_position_embeddings", 2048))
    name = lora_model or model_path or "builtin:smollm2"
    print(f"Evaluating {name} on {data_dir.name}/{split}: {len(wanted)} subjects, {method}, {few_shot}-shot, "
          f"max_length {max_length}")
    prepared = {s: build_items(tokenizer, layout, title, shots, qs, method, len(shots), max_length)
                for s, (layout, qs, shots, title) in data.items()}
    start = time.perf_counter()
    bar = tqdm(total=sum(len(items) for items, _, _ in prepared.values()), desc="scoring", unit="seq")
    results, submission = {}, {}
    for subject, (items, used, prefixes) in prepared.items():
        questions = data[subject][1]
        preds = predict(score(model, tokenizer, items, prefixes, method, batch_size, tokenizer.pad_token_id or 0, bar),
                        questions, method)
        submission[subject] = {q.id: p for q, p in zip(questions, preds["acc"])}
        entry = {"questions": len(questions), "shots": min(used), "shots_used": dict(sorted(Counter(used).items())),
                 "predictions": preds["acc"]}
        if all(q.answer is not None for q in questions):
            for metric, letters in preds.items():
                entry[metric] = sum(p == q.answer for p, q in zip(letters, questions)) / len(questions)
        results[subject] = entry
    bar.close()
    seconds = time.perf_counter() - start
    total = sum(r["questions"] for r in results.values())
    metrics = [m for m in ("acc", "acc_norm", "acc_bytes") if all(m in r for r in results.values())]
    average = {m: sum(r[m] for r in results.values()) / len(results) for m in metrics}
    average.update({f"{m}_weighted": sum(r[m] * r["questions"] for r in results.values()) / total for m in metrics})

    width = max(len(s) for s in results) + 2
    print(f"\n{'subject':<{width}}{'n':>5} {'shots':>5}" + "".join(f"{m:>10}" for m in metrics))
    for subject, r in results.items():
        print(f"{subject:<{width}}{r['questions']:>5} {r['shots']:>5}"
              + "".join(f"{100 * r[m]:>10.1f}" for m in metrics))
    print(f"{'average':<{width}}{total:>5} {'':>5}" + "".join(f"{100 * average[m]:>10.1f}" for m in metrics))
    print(f"{seconds:.1f} s, {100 * seconds / total:.1f} s per 100 questions")

    out = Path(output_dir).expanduser() if output_dir else ROOT / "eval_results"
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{data_dir.name}_{split}_{method}_{few_shot}shot"
    report = {"model": name, "data_dir": str(data_dir), "split": split, "method": method, "few_shot": few_shot,
              "max_length": max_length, "subjects": results, "average": average, "questions": total,
              "seconds": round(seconds, 2), "seconds_per_100_questions": round(100 * seconds / total, 2)}
    path = out / f"results_{tag}.json"
    write_text_atomic(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n", "output_dir")
    written = [path]
    if not metrics:  # a split without answers: predictions in C-Eval's submission format
        written.append(out / f"submission_{tag}.json")
        write_text_atomic(written[-1], json.dumps(submission, indent=2, ensure_ascii=False) + "\n", "output_dir")
    print(f"Wrote {', '.join(str(p) for p in written)}")


if __name__ == "__main__":
    run_cli(main, aliases={"dtype": "precision"})
