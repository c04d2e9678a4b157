"""C-Eval and CMMLU: the two csv layouts, the standard prompts, and batched scoring with a shared prefix.

letter: the official k-shot prompt (subject header, question, options A-D, the answer cue); the prediction
is the option letter whose token has the highest next-token logit. This is what published numbers use.
cloze: lm-eval-harness's multiple-choice method. The context is `Question: {question}\nAnswer:` (after
k solved examples), each option is scored as the summed log-probability of " {option}" after it; `acc`
takes the highest sum, `acc_norm` the highest sum divided by the option's length in characters (as
lm-eval-harness), `acc_bytes` by its length in UTF-8 bytes. Tokens follow lm-eval-harness's
`_encode_pair`: the continuation is what encoding context+option adds after the encoded context.
"""
import csv
import dataclasses
from pathlib import Path

from utils.core.errors import UserError
from utils.core.files import read_json

CHOICES = ("A", "B", "C", "D")
CMMLU_NAMES = dict(  # CMMLU's own English-to-Chinese subject names, used in its prompt header
    agronomy="农学", anatomy="解剖学", ancient_chinese="古汉语", arts="艺术学", astronomy="天文学",
    business_ethics="商业伦理", chinese_civil_service_exam="中国公务员考试", chinese_driving_rule="中国驾驶规则",
    chinese_food_culture="中国饮食文化", chinese_foreign_policy="中国外交政策", chinese_history="中国历史",
    chinese_literature="中国文学", chinese_teacher_qualification="中国教师资格", clinical_knowledge="临床知识",
    college_actuarial_science="大学精算学", college_education="大学教育学",
    college_engineering_hydrology="大学工程水文学", college_law="大学法律", college_mathematics="大学数学",
    college_medical_statistics="大学医学统计", college_medicine="大学医学", computer_science="计算机科学",
    computer_security="计算机安全", conceptual_physics="概念物理学", construction_project_management="建设工程管理",
    economics="经济学", education="教育学", electrical_engineering="电气工程", elementary_chinese="小学语文",
    elementary_commonsense="小学常识", elementary_information_and_technology="小学信息技术",
    elementary_mathematics="初等数学", ethnology="民族学", food_science="食品科学", genetics="遗传学",
    global_facts="全球事实", high_school_biology="高中生物", high_school_chemistry="高中化学",
    high_school_geography="高中地理", high_school_mathematics="高中数学", high_school_physics="高中物理学",
    high_school_politics="高中政治", human_sexuality="人类性行为", international_law="国际法学", journalism="新闻学",
    jurisprudence="法理学", legal_and_moral_basis="法律与道德基础", logical="逻辑学", machine_learning="机器学习",
    management="管理学", marketing="市场营销", marxist_theory="马克思主义理论", modern_chinese="现代汉语",
    nutrition="营养学", philosophy="哲学", professional_accounting="专业会计", professional_law="专业法学",
    professional_medicine="专业医学", professional_psychology="专业心理学", public_relations="公共关系",
    security_study="安全研究", sociology="社会学", sports_science="体育学", traditional_chinese_medicine="中医中药",
    virology="病毒学", world_history="世界历史", world_religions="世界宗教",
)
LAYOUT_HELP = ("a C-Eval file has the header id,question,A,B,C,D[,answer,explanation], "
               "a CMMLU file ,Question,A,B,C,D,Answer")


@dataclasses.dataclass
class Question:
    id: str
    question: str
    options: list
    answer: str | None  # None in splits without answers (C-Eval test)


def read_questions(path):
    """(layout, questions) of one csv file, "ceval" or "cmmlu", or one UserError naming the file and row."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f) if row]
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                        "re-save it as UTF-8.") from None
    if not rows:
        raise UserError(f"{path} is empty; {LAYOUT_HELP}.")
    header = [h.strip() for h in rows[0]]
    layout = "cmmlu" if "Question" in header else "ceval"
    names = {h.lower(): i for i, h in enumerate(header)}
    missing = [c for c in ("question", "a", "b", "c", "d") if c not in names]
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(missing)}; {LAYOUT_HELP}.")
    id_col = names.get("id", 0 if header[0] == "" else None)
    questions = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) < len(header):
            raise UserError(f"{path} row {line} has {len(row)} fields but the header has {len(header)}; "
                            "quote fields that hold commas.")
        answer = row[names["answer"]].strip() if "answer" in names else None
        if answer is not None and answer not in CHOICES:
            raise UserError(f"{path} row {line} has the answer {answer!r}, which is not one of A, B, C, D; "
                            "fix or remove that row.")
        text = row[names["question"]]
        if not text.strip():
            raise UserError(f"{path} row {line} has an empty question; fix or remove that row.")
        qid = row[id_col].strip() if id_col is not None else str(line - 2)
        questions.append(Question(qid, text, [row[names[c.lower()]] for c in CHOICES], answer))
    if not questions:
        raise UserError(f"{path} holds a header but no questions; remove the file or add questions.")
    return layout, questions


def subject_files(data_dir, split):
    """{subject: csv path} in data_dir/split; C-Eval names files `{subject}_{split}.csv`, CMMLU `{subject}.csv`."""
    folder = Path(data_dir) / split
    if not folder.is_dir():
        have = sorted(p.name for p in Path(data_dir).iterdir() if p.is_dir()) if Path(data_dir).is_dir() else []
        if split == "dev":
            raise UserError(f"{folder} does not exist: few-shot prompts take their examples from dev/ (--data_dir has: "
                            f"{', '.join(have) or 'nothing'}); add it, or pass --few_shot=0.")
        raise UserError(f"{folder} does not exist; --data_dir needs a {split}/ folder of csv files "
                        f"(it has: {', '.join(have) or 'nothing'}); "
                        "pass --split= one of them, or an unpacked C-Eval or CMMLU folder.")
    files = {}
    for path in sorted(folder.glob("*.csv")):
        name = path.stem[: -len(split) - 1] if path.stem.endswith(f"_{split}") else path.stem
        files[name] = path
    if not files:
        raise UserError(f"{folder} holds no .csv files; point --data_dir at an unpacked C-Eval or CMMLU folder"
                        + (", or pass --few_shot=0." if split == "dev" else "."))
    return files


def subject_title(subject, data_dir):
    """The subject's Chinese name for the prompt header: C-Eval's subject_mapping.json, CMMLU's table, else the name."""
    mapping = Path(data_dir) / "subject_mapping.json"
    if mapping.is_file():
        table = read_json(mapping, 'fix it (C-Eval\'s layout: {"subject": ["English name", "中文名", "category"]}), '
                                   'or delete it')
        if not isinstance(table, dict):
            raise UserError(f"{mapping} holds a {type(table).__name__}, not a subject table; fix it, or delete it.")
        entry = table.get(subject)
        if entry:
            return entry[1] if isinstance(entry, list) and len(entry) > 1 else str(entry)
    return CMMLU_NAMES.get(subject, subject.replace("_", " "))


def letter_header(title, layout):
    if layout == "cmmlu":
        return f"以下是关于{title}的单项选择题，请直接给出正确答案的选项。\n\n"
    return f"以下是中国关于{title}考试的单项选择题，请选出其中的正确答案。\n\n"


def letter_example(q, layout, with_answer):
    """One question in the official layout: CMMLU's `题目：…答案是：`, C-Eval's `…答案：`."""
    text = ("题目：" if layout == "cmmlu" else "") + q.question
    text += "".join(f"\n{c}. {o}" for c, o in zip(CHOICES, q.options))
    text += "\n答案是：" if layout == "cmmlu" else "\n答案："
    return text + (f"{q.answer}\n\n" if with_answer else "")


def cloze_example(q, with_answer):
    text = f"Question: {q.question.strip()}\nAnswer:"
    return text + (f" {q.options[CHOICES.index(q.answer)]}\n\n" if with_answer else "")


def letter_token_ids(tokenizer):
    """The id of each option letter as the model would emit it (the last token of encoding "A", as CMMLU does)."""
    return [tokenizer(c).input_ids[-1] for c in CHOICES]


def fit_shots(build, shots, max_length):
    """The largest k <= shots whose sequences build(k) all fit max_length tokens, dropping the last shot first.

    build(k) returns [(token ids, number of scored tokens at the end)], one prompt or one per option.
    Returns (k, sequences); when even k = 0 is too long, each keeps its last max_length tokens.
    """
    for k in range(shots, -1, -1):
        seqs = build(k)
        if max(len(ids) for ids, _ in seqs) <= max_length:
            return k, seqs
    return 0, [(ids[-max_length:], n) for ids, n in seqs]


def cloze_tokens(encode, context, option):
    """lm-eval-harness's _encode_pair: (context ids, continuation ids) for " option" after context."""
    whole = encode(context + " " + option)
    context_ids = encode(context)
    return context_ids, whole[len(context_ids):]


class SharedPrefix:
    """The KV cache of a prompt head shared by many sequences, computed once: a subject's header and shots,
    or one question's context before its four options. With a parent (the subject's), only the tokens
    after what the parent holds are run."""

    def __init__(self, model, ids, parent=None):
        import torch

        self.ids = ids
        n = min(parent.common(ids), len(ids) - 1) if parent is not None else 0
        kwargs = {}
        if n:
            kwargs = dict(past_key_values=parent.cache(n, 1),
                          position_ids=torch.arange(n, len(ids), device=model.device)[None])
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids[n:]], device=model.device), use_cache=True, logits_to_keep=1,
                        **kwargs)
        self.kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]

    def common(self, seq):
        n = 0
        for a, b in zip(self.ids, seq):
            if a != b:
                break
            n += 1
        return n

    def cache(self, n, batch):
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=[(k[..., :n, :].expand(batch, -1, -1, -1),
                                             v[..., :n, :].expand(batch, -1, -1, -1)) for k, v in self.kv])


def log_probs_at(model, seqs, positions, prefix=None, pad_id=0):
    """Next-token log-probabilities at positions[i] (a list per sequence) of each sequence, as one batch.

    Sequences are right-padded: a causal model's outputs at real positions never see the padding, so no
    attention mask is needed. With a SharedPrefix, the tokens all sequences share with it are read from
    its cache instead of being recomputed. Returns a list of (len(positions[i]), vocab) float tensors.
    """
    import torch

    n = 0
    if prefix is not None:
        n = min(min(prefix.common(s) for s in seqs), min(min(p) for p in positions))
    tails = [s[n:] for s in seqs]
    width = max(len(t) for t in tails)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, t in enumerate(tails):
        ids[i, :len(t)] = torch.tensor(t)
    most = max(len(p) for p in positions)
    keep = torch.tensor([[q - n for q in p] + [p[-1] - n] * (most - len(p)) for p in positions])
    kwargs = {}
    if n:
        kwargs = dict(past_key_values=prefix.cache(n, len(seqs)), use_cache=True,
                      position_ids=torch.arange(n, n + width, device=model.device).expand(len(seqs), -1))
    with torch.no_grad():
        logits = model(input_ids=ids.to(model.device), logits_to_keep=keep.to(model.device), **kwargs).logits
    logits = torch.log_softmax(logits.float(), dim=-1).cpu()
    return [logits[i, :len(p)] for i, p in enumerate(positions)]


def batches(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]
