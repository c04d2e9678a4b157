"""CMMLU on the built-in model and on the finetune demo adapter: both methods, 0- and 5-shot, seconds per 100 questions.

    flock /tmp/lora-kit-bench.lock nice -n 19 python bench/eval_cmmlu.py --limit=40

The base model is the baseline for the adapter in the same run (fine-tuning should not wreck knowledge).
Prints a markdown table; the per-run JSON files go to --output_dir.
"""
import json
import sys
from pathlib import Path

import fire

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(data_dir: str = str(ROOT.parent / "shared" / "data" / "cmmlu"), lora_model: str = str(ROOT / "output"),
         limit: int = None, output_dir: str = "/tmp/lora-kit-eval-bench", shots: str = "0,5",
         methods: str = "letter,cloze", models: str = "built-in,demo adapter", precision: str = "auto"):
    """Args:
        data_dir: the CMMLU folder. lora_model: the adapter compared with its base. limit: questions per subject.
        output_dir: where evaluate.py's JSON files go. shots, methods: the grid to run.
        models: which of "built-in" and "demo adapter" to run. precision: as evaluate.py takes it (auto: bf16 on
            a CPU with fast bf16, as evaluate.py runs by default).
    """
    import evaluate
    from utils.core.errors import as_list

    as_names = lambda v, flag: as_list([str(x) for x in v] if isinstance(v, (list, tuple)) else str(v), flag)  # noqa: E731

    rows = []
    wanted_models, wanted_methods = as_names(models, "models"), as_names(methods, "methods")
    for k in [int(s) for s in as_names(shots, "shots")]:
        for model_name, kwargs in (("built-in", {}), ("demo adapter", {"lora_model": lora_model})):
            if model_name not in wanted_models:
                continue
            for method in wanted_methods:
                out = Path(output_dir) / model_name.replace(" ", "_")
                evaluate.main(data_dir=data_dir, method=method, few_shot=k, limit=limit, output_dir=str(out),
                              precision=precision, **kwargs)
                r = json.loads((out / f"results_cmmlu_test_{method}_{k}shot.json").read_text())
                rows.append((model_name, method, k, r["questions"], r["average"], r["seconds_per_100_questions"]))
                print(rows[-1], flush=True)
    import torch

    print(f"\nprecision {precision}, torch threads {torch.get_num_threads()}")
    print("\n| model | method | shots | questions | acc | acc_norm (chars) | acc_bytes | s / 100 questions |")
    print("|---|---|---|---|---|---|---|---|")
    for name, method, k, n, avg, speed in rows:
        cell = lambda m: f"{100 * avg[m]:.1f}" if m in avg else "-"  # noqa: E731
        print(f"| {name} | {method} | {k} | {n} | {cell('acc')} | {cell('acc_norm')} | {cell('acc_bytes')} "
              f"| {speed:.1f} |")


if __name__ == "__main__":
    fire.Fire(main)
