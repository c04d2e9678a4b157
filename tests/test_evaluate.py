"""evaluate.py: both scorers against a plain one-question-at-a-time reference, both layouts, shot dropping, bad
input."""
import csv
import json
import sys

import pytest
import torch
from conftest import ROOT, SHARED_DATA

from utils.core.errors import UserError

sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402

QUESTIONS = [
    ("水的化学式是什么？", "H2O", "CO2", "NaCl", "O2", "A"),
    ("Which planet is known as the red planet?", "Venus", "Mars", "Jupiter", "Saturn", "B"),
    ("中国的首都是", "上海", "广州", "北京", "深圳", "C"),
    ("2 + 3 =", "4", "6", "7", "5", "D"),
    ("The largest ocean on Earth is the", "Atlantic Ocean", "Indian Ocean", "Pacific Ocean", "Arctic Ocean", "C"),
    ("光在真空中的速度约为每秒多少公里？", "30万", "3万", "300万", "3000", "A"),
    ("Who wrote 'Romeo and Juliet'?", "Charles Dickens", "William Shakespeare", "Mark Twain", "Jane Austen", "B"),
]
SHOTS = [
    ("一年有几个季节？", "两个", "三个", "四个", "五个", "C"),
    ("Ice is frozen", "water", "sand", "iron", "air", "A"),
    ("太阳从哪个方向升起？", "西", "东", "南", "北", "B"),
]
TITLES = {"cmmlu": "解剖学", "ceval": "解剖学"}


def write_csv(path, rows, layout, answers=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if layout == "cmmlu":
            w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
            w.writerows([i, *r] for i, r in enumerate(rows))
        else:
            w.writerow(["id", "question", "A", "B", "C", "D"] + (["answer", "explanation"] if answers else []))
            w.writerows([i, *(r if answers else r[:5])] + (["because"] if answers else []) for i, r in enumerate(rows))


@pytest.fixture
def cmmlu_dir(tmp_path):
    root = tmp_path / "cmmlu"
    write_csv(root / "dev" / "anatomy.csv", SHOTS, "cmmlu")
    write_csv(root / "test" / "anatomy.csv", QUESTIONS, "cmmlu")
    write_csv(root / "dev" / "world_history.csv", SHOTS[::-1], "cmmlu")
    write_csv(root / "test" / "world_history.csv", QUESTIONS[::-1][:4], "cmmlu")
    return root


@pytest.fixture
def ceval_dir(tmp_path):
    root = tmp_path / "ceval"
    write_csv(root / "dev" / "anatomy_dev.csv", SHOTS, "ceval")
    write_csv(root / "val" / "anatomy_val.csv", QUESTIONS, "ceval")
    write_csv(root / "test" / "anatomy_test.csv", QUESTIONS[:3], "ceval", answers=False)
    return root


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from utils.model.loading import load_for_inference

    model, tokenizer, _, _ = load_for_inference(str(tiny_model_dir), precision="fp32")
    return model, tokenizer


def run(tmp_path, **kwargs):
    kwargs.setdefault("output_dir", str(tmp_path / "results"))
    kwargs.setdefault("precision", "fp32")
    evaluate.main(**kwargs)
    return json.loads(next((tmp_path / "results").glob("results_*.json")).read_text(encoding="utf-8"))


# The reference: the prompt strings spelled out by hand from the official scripts and lm-eval-harness,
# one unbatched, uncached forward pass per prompt.
def ref_letter_prompt(layout, shots, q):
    def one(r, answer):
        if layout == "cmmlu":
            return (f"题目：{r[0]}\nA. {r[1]}\nB. {r[2]}\nC. {r[3]}\nD. {r[4]}\n答案是："
                    + (f"{r[5]}\n\n" if answer else ""))
        return (f"{r[0]}\nA. {r[1]}\nB. {r[2]}\nC. {r[3]}\nD. {r[4]}\n答案："
                + (f"{r[5]}\n\n" if answer else ""))
    head = (f"以下是关于{TITLES[layout]}的单项选择题，请直接给出正确答案的选项。\n\n" if layout == "cmmlu"
            else f"以下是中国关于{TITLES[layout]}考试的单项选择题，请选出其中的正确答案。\n\n")
    return head + "".join(one(s, True) for s in shots) + one(q, False)


@torch.no_grad()
def ref_letter(model, tokenizer, prompt):
    ids = tokenizer(prompt).input_ids
    logits = model(torch.tensor([ids])).logits[0, -1]
    letters = [tokenizer.convert_tokens_to_ids(c) for c in "ABCD"]
    return torch.log_softmax(logits.float(), -1)[letters]


@torch.no_grad()
def ref_cloze(model, tokenizer, shots, q):
    context = ("".join(f"Question: {s[0]}\nAnswer: {s[1 + 'ABCD'.index(s[5])]}\n\n" for s in shots)
               + f"Question: {q[0]}\nAnswer:")
    lls = []
    for option in q[1:5]:
        ctx = tokenizer(context).input_ids
        whole = tokenizer(context + " " + option).input_ids
        cont = whole[len(ctx):]
        logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].float(), -1)
        lls.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
    return lls


def items_and_scores(tiny, layout, shots, method, max_length=4096, batch_size=3):
    from tqdm import tqdm

    from utils.eval.ceval_cmmlu import Question

    model, tokenizer = tiny
    qs = [Question(str(i), r[0], list(r[1:5]), r[5]) for i, r in enumerate(QUESTIONS)]
    ss = [Question(str(i), r[0], list(r[1:5]), r[5]) for i, r in enumerate(shots)]
    items, used, prefixes = evaluate.build_items(tokenizer, layout, TITLES[layout], ss, qs, method, len(ss), max_length)
    scores = evaluate.score(model, tokenizer, items, prefixes, method, batch_size, tokenizer.pad_token_id,
                            tqdm(disable=True))
    return used, scores, evaluate.predict(scores, qs, method)


@pytest.mark.parametrize("layout", ["cmmlu", "ceval"])
@pytest.mark.parametrize("shots", [0, 3])
def test_letter_scores_match_the_reference(tiny, layout, shots):
    used, scores, _ = items_and_scores(tiny, layout, SHOTS[:shots], "letter")
    assert used == [shots] * len(QUESTIONS)
    for qi, q in enumerate(QUESTIONS):
        expected = ref_letter(*tiny, ref_letter_prompt(layout, SHOTS[:shots], q))
        torch.testing.assert_close(scores[qi], expected, atol=2e-4, rtol=0)


@pytest.mark.parametrize("shots", [0, 2])
def test_cloze_scores_and_normalisations_match_the_reference(tiny, shots):
    _, scores, preds = items_and_scores(tiny, "cmmlu", SHOTS[:shots], "cloze")
    for qi, q in enumerate(QUESTIONS):
        lls = ref_cloze(*tiny, SHOTS[:shots], q)
        assert [scores[qi, o] for o in range(4)] == pytest.approx(lls, abs=2e-4)
        chars = [ll / len(opt) for ll, opt in zip(lls, q[1:5])]
        by_bytes = [ll / len(opt.encode("utf-8")) for ll, opt in zip(lls, q[1:5])]
        for name, values in (("acc", lls), ("acc_norm", chars), ("acc_bytes", by_bytes)):
            ranked = sorted(values, reverse=True)
            if ranked[0] - ranked[1] > 1e-3:  # only where the reference's choice is not a numerical tie
                assert preds[name][qi] == "ABCD"[values.index(ranked[0])], (name, qi)


def test_shots_are_dropped_one_at_a_time_to_fit(tiny):
    model, tokenizer = tiny
    lengths = [len(tokenizer(ref_letter_prompt("cmmlu", SHOTS[:k], QUESTIONS[0])).input_ids) for k in range(4)]
    limit = (lengths[1] + lengths[2]) // 2  # one shot fits the first question, two do not
    used, scores, _ = items_and_scores(tiny, "cmmlu", SHOTS, "letter", max_length=limit)
    expected_k = max(k for k in range(4)
                     if len(tokenizer(ref_letter_prompt("cmmlu", SHOTS[:k], QUESTIONS[0])).input_ids) <= limit)
    assert used[0] == expected_k == 1
    assert all(k < 3 for k in used)
    torch.testing.assert_close(scores[0],
                               ref_letter(model, tokenizer, ref_letter_prompt("cmmlu", SHOTS[:1], QUESTIONS[0])),
                               atol=2e-4, rtol=0)


def test_cmmlu_end_to_end_table_and_json(tiny_model_dir, cmmlu_dir, tmp_path, capsys):
    report = run(tmp_path, model_path=str(tiny_model_dir), data_dir=str(cmmlu_dir), few_shot=2, batch_size=4)
    assert (report["split"] == "test" and report["method"] == "letter"
            and set(report["subjects"]) == {"anatomy", "world_history"})
    anatomy = report["subjects"]["anatomy"]
    assert anatomy["questions"] == 7 and anatomy["shots"] == 2 and len(anatomy["predictions"]) == 7
    assert anatomy["acc"] == sum(p == q[5] for p, q in zip(anatomy["predictions"], QUESTIONS)) / 7
    assert report["average"]["acc"] == pytest.approx((anatomy["acc"] + report["subjects"]["world_history"]["acc"]) / 2)
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["results_cmmlu_test_letter_2shot.json"]
    out = capsys.readouterr().out
    assert "anatomy" in out and "average" in out and "s per 100 questions" in out


def test_ceval_val_scores_and_test_writes_a_submission(tiny_model_dir, ceval_dir, tmp_path):
    report = run(tmp_path, model_path=str(tiny_model_dir), data_dir=str(ceval_dir), method="cloze", subjects="anatomy")
    assert report["split"] == "val" and {"acc", "acc_norm", "acc_bytes"} <= set(report["subjects"]["anatomy"])
    evaluate.main(model_path=str(tiny_model_dir), data_dir=str(ceval_dir), split="test", few_shot=1,
                  output_dir=str(tmp_path / "sub"), precision="fp32")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["results_ceval_test_letter_1shot.json",
                                                                    "submission_ceval_test_letter_1shot.json"]
    submission = json.loads((tmp_path / "sub" / "submission_ceval_test_letter_1shot.json").read_text())
    assert list(submission) == ["anatomy"] and list(submission["anatomy"]) == ["0", "1", "2"]
    assert set(submission["anatomy"].values()) <= set("ABCD")


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.write_text(",Question,A,B,C,Answer\n0,q,a,b,c,A\n", encoding="utf-8"),
     r"test/anatomy.csv lacks the column\(s\) d"),
    (lambda p: p.write_text(",Question,A,B,C,D,Answer\n0,q,a,b,c,d,E\n", encoding="utf-8"),
     r"anatomy.csv row 2 has the answer 'E', which is not one of A, B, C, D"),
    (lambda p: p.write_text(",Question,A,B,C,D,Answer\n", encoding="utf-8"),
     r"anatomy.csv holds a header but no questions"),
    (lambda p: p.write_text("", encoding="utf-8"), r"anatomy.csv is empty"),
])
def test_bad_files_get_one_clear_sentence(cmmlu_dir, tmp_path, edit, message):
    edit(cmmlu_dir / "test" / "anatomy.csv")
    with pytest.raises(UserError, match=message):
        evaluate.main(data_dir=str(cmmlu_dir), output_dir=str(tmp_path / "r"))


def test_bad_arguments(cmmlu_dir, tmp_path):
    with pytest.raises(UserError, match="no test file for subject\\(s\\) virology"):
        evaluate.main(data_dir=str(cmmlu_dir), subjects="anatomy,virology")
    with pytest.raises(UserError, match="--method must be one of letter, cloze, got .mc."):
        evaluate.main(data_dir=str(cmmlu_dir), method="mc")
    with pytest.raises(UserError, match="is not a folder"):
        evaluate.main(data_dir=str(tmp_path / "nowhere"))
    (cmmlu_dir / "dev" / "anatomy.csv").unlink()
    with pytest.raises(UserError, match="has no file for anatomy; --few_shot needs"):
        evaluate.main(data_dir=str(cmmlu_dir), few_shot=5)


def test_damaged_data_is_one_sentence_before_loading(cmmlu_dir, ceval_dir):
    from utils.eval.ceval_cmmlu import subject_title

    (cmmlu_dir / "test" / "anatomy.csv").write_bytes(
        ",Question,A,B,C,D,Answer\n0,\xb2\xe2\xca\xd4,a,b,c,d,A\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"anatomy.csv is not UTF-8 \(byte 0xb2 at offset \d+\); re-save it as UTF-8"):
        evaluate.main(data_dir=str(cmmlu_dir), subjects="anatomy")
    (ceval_dir / "subject_mapping.json").write_text('{"anatomy": ["Anatomy", "解剖学"', encoding="utf-8")
    with pytest.raises(UserError, match=r"subject_mapping.json is not readable JSON \(.*\); fix it"):
        subject_title("anatomy", ceval_dir)


@pytest.mark.skipif(not (SHARED_DATA / "cmmlu").is_dir(), reason="needs ../shared/data/cmmlu (not part of a clone)")
def test_builtin_model_on_real_cmmlu_matches_the_reference(smollm2_dir, tmp_path):
    """The built-in model on real questions it was not tuned on: 1-shot letter predictions equal the reference's."""
    from utils.eval.ceval_cmmlu import read_questions
    from utils.model.loading import load_for_inference

    report = run(tmp_path, data_dir=str(SHARED_DATA / "cmmlu"), subjects="world_history", few_shot=1, limit=3,
                 batch_size=2)
    model, tokenizer, _, _ = load_for_inference(None, precision="fp32")
    _, questions = read_questions(SHARED_DATA / "cmmlu" / "test" / "world_history.csv")
    _, shots = read_questions(SHARED_DATA / "cmmlu" / "dev" / "world_history.csv")
    as_row = lambda q: (q.question, *q.options, q.answer)  # noqa: E731
    TITLES["cmmlu"] = "世界历史"
    try:
        expected = ["ABCD"[int(ref_letter(model, tokenizer, ref_letter_prompt("cmmlu", [as_row(s) for s in shots[:1]],
                                                                               as_row(q))).argmax())]
                    for q in questions[:3]]
    finally:
        TITLES["cmmlu"] = "解剖学"
    assert report["subjects"]["world_history"]["predictions"] == expected
