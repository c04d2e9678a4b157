"""Merge a LoRA adapter into its base model, shard by shard, and check that the result answers as base + adapter
does.

    python merge_lora.py --lora_model=output/ --output_dir=models/merged
    python merge_lora.py --lora_model=output/checkpoint-200 --output_dir=models/merged --precision=bf16
    python merge_lora.py --lora_model=Chinese-Vicuna-lora-7b --base_model=path/to/llama-7b \\
        --output_dir=models/vicuna-7b --allow_pickle          # a third-party adapter with .bin weights
    python merge_lora.py --lora_model=output/ --output_dir=models/merged --qlora_base=False   # see --qlora_base

The base model comes from the adapter's run_config.json (or adapter_config.json) unless --base_model is given.
Memory stays near one tensor plus the adapter, whatever the model's size. The output is an HF folder
(safetensors shards and their index, config, generation config, tokenizer with its chat template,
run_config.json, merge_info.json) that loads unchanged in transformers and vLLM, and that
`cli_demo.py --model_path=` uses with the template training used.
"""
import time

from utils.core.cli import run_cli
from utils.core.files import output_problem
from utils.core.flags import Checks


def main(
    lora_model: str = None,
    output_dir: str = None,
    base_model: str = None,
    precision: str = "auto",
    qlora_base: bool = None,
    overwrite_output_dir: bool = False,
    no_verify: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = None,
):
    """Merge a LoRA adapter into its base model and write a standalone HF model folder.

    Args:
        lora_model: the adapter (required): a finetune.py output folder, a checkpoint-N folder in it, a folder with an
            older adapter_model/ subfolder, or any PEFT LoRA adapter folder.
        output_dir: where the merged model goes (required); it must not exist or be empty, unless
            --overwrite_output_dir.
        base_model: the base to merge into (a local HF folder, hub id, or builtin:smollm2); default: the base the
            adapter was trained on.
        precision: the merged weights' dtype: auto (the base's own), bf16, fp16 or fp32 (older name: --dtype). The merge
            itself is computed in fp32 and rounded once.
        qlora_base: QLoRA: merge onto the base's NF4-dequantized weights, which are what a 4-bit-trained adapter
            learned against, instead of its original weights. Default: on when run_config.json says the adapter was
            trained in 4 bits. The result then matches the QLoRA model you evaluated; off, it keeps the base's
            full-precision weights but drifts from what was trained.
        overwrite_output_dir: replace a non-empty --output_dir (older name: --overwrite).
        no_verify: skip the check that loads base + adapter through PEFT and the merged model in fp32 and compares
            their logits on probe prompts.
        allow_pickle: allow pickled .bin weights (adapter or base), which can run code when loaded; safetensors are
            used whenever present.
        trust_remote_code: run the Python code the base model ships; default: what the run config of the adapter says.
    """
    c = Checks()
    lora_model = c.text("lora_model", lora_model, True, "output/")
    output_dir = c.text("output_dir", output_dir, True, "models/merged")
    base_model = c.text("base_model", base_model)
    precision = c.choice("precision", precision, ("auto", "bf16", "fp16", "fp32"))
    qlora_base = None if qlora_base is None else c.boolean("qlora_base", qlora_base)
    overwrite, no_verify = c.boolean("overwrite_output_dir", overwrite_output_dir), c.boolean("no_verify", no_verify)
    allow_pickle = c.boolean("allow_pickle", allow_pickle)
    trust_remote_code = None if trust_remote_code is None else c.boolean("trust_remote_code", trust_remote_code)
    c.add(output_problem(output_dir, "output_dir") if isinstance(output_dir, str) else None)
    c.done()

    from utils.export.merge import merge, parse_dtype

    out_dtype = parse_dtype(precision)
    t0 = time.time()
    banner = (f"merging {lora_model} into {base_model or 'the base it was trained on'} -> {output_dir} "
              f"(precision: {precision})")
    summary = merge(lora_model, output_dir, base_model=base_model, dtype=out_dtype, overwrite=overwrite,
                    allow_pickle=allow_pickle, qlora_base=qlora_base, verify=not no_verify,
                    trust_remote_code=trust_remote_code, on_start=lambda: print(banner, flush=True))
    gib = 2**30
    print(f"base: {summary['base_model']}   adapter: {summary['adapter']}   "
          f"merged {summary['merged_modules']} LoRA modules"
          + (f", replaced {', '.join(summary['replaced_tensors'])}" if summary["replaced_tensors"] else "")
          + (", untied the embeddings" if summary["untied_embeddings"] else ""))
    if summary["qlora_base"]:
        print(f"QLoRA: merged onto the NF4-dequantized base (quantized from {summary['qlora_base']}), "
              "as the adapter was trained; pass --qlora_base=False to merge onto the original weights.")
    print(f"memory: peak RSS {summary['merge_peak_rss_bytes'] / gib:.2f} GiB for the merge; "
          f"largest shard {summary['largest_shard_bytes'] / gib:.2f} GiB")
    check = summary["verification"]
    if check is None:
        print("verification skipped (--no_verify).")
    elif "max_abs_logit_diff" in check:
        print(f"verification ({check['mode']}): max |logit difference| {check['max_abs_logit_diff']:.3g}, "
              f"greedy tokens agree at {check['greedy_agreement']:.1%} of {check['positions']} positions on "
              f"{check['probe_prompts']} probe prompts "
              f"(peak RSS with verification {check['peak_rss_bytes'] / gib:.2f} GiB)")
    else:
        print(f"verification ({check['mode']}): max |output difference| {check['max_abs_output_diff']:.3g}")
    print(f"wrote the merged model ({summary['shards']} shards, {summary['total_bytes'] / gib:.2f} GiB) and "
          f"merge_info.json to {output_dir} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    run_cli(main, aliases={"dtype": "precision", "overwrite": "overwrite_output_dir"})
