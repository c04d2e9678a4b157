"""Export an HF LLaMA-family folder (llama, mistral, qwen2: a merged model, or the built-in one) to GGUF for llama.cpp
and Ollama, or a LoRA adapter to a GGUF LoRA file that llama.cpp applies over its base's GGUF.

    python export_gguf.py                                               # built-in model, f16
    python export_gguf.py --model_path=models/merged --outtype=q8_0     # merge_lora.py's output
    python export_gguf.py --model_path=models/merged --outtype=q4_k_m   # a k-quant, with a quality line
    python export_gguf.py --model_path=models/merged --modelfile        # plus an Ollama Modelfile
    python export_gguf.py --lora_model=output/                          # the adapter alone: output-lora-f16.gguf

Then: `llama-cli -m models/merged-f16.gguf -cnv --jinja`, or `ollama create mymodel -f models/Modelfile`, or with
the adapter: `llama-cli -m models/smollm2-135m-instruct-f16.gguf --lora models/output-lora-f16.gguf -cnv --jinja`.
The file's chat template and the Modelfile's TEMPLATE are the prompt format the model was tuned with (the
run_config.json beside a merged folder), so llama.cpp and Ollama prompt it as training did.
"""
import importlib.util
import os
import time
from pathlib import Path

from utils.core.cli import run_cli
from utils.core.files import atomic_path, output_problem, write_text_atomic
from utils.core.flags import Checks

ROOT = Path(__file__).resolve().parent
HELD_TEXT = ROOT / "data" / "gguf_held.txt"
WARN_RISE = 0.10  # a perplexity rise over f16 above this is reported as a quality loss


def main(
    model_path: str = None,
    lora_model: str = None,
    outtype: str = "f16",
    output: str = None,
    template: str = "auto",
    modelfile: bool = False,
    local_files_only: bool = False,
    trust_remote_code: bool = False,
):
    """Write one GGUF file from an HF LLaMA-family folder (llama, mistral, qwen2), or from a LoRA adapter.

    Args:
        model_path: an HF folder with safetensors weights (e.g. merge_lora.py's output) or hub id; default the
            built-in model. With --lora_model: the base the adapter goes over (default: the one it was trained on).
        lora_model: a LoRA adapter folder (finetune.py's output or a checkpoint-N in it) to write as a GGUF LoRA file
            (f32, f16, bf16 or q8_0), which llama.cpp loads over the base model's GGUF (`--lora`).
        outtype: f32, f16, bf16 or q8_0 (norms stay f32), or a llama.cpp quantization: q4_k_m, q5_k_m, q6_k, q4_0
            (these need llama-cpp-python; the f16 file is quantized, and llama.cpp's perplexity on a held text is
            printed for both).
        output: the .gguf path to write, or a folder for <model folder name>-<outtype>.gguf (also --output_dir); default
            the toolkit's models/ folder.
        template: the prompt format for the file's chat template and the Modelfile: auto (the one run_config.json
            beside the model records, else the tokenizer's own chat template, else alpaca), a name from templates/,
            or a template .json file.
        modelfile: also write an Ollama Modelfile next to the GGUF file.
        local_files_only: never download a model from the hub.
        trust_remote_code: run the Python code the model ships (to read its config and tokenizer).
    """
    from utils.core.files import read_json
    from utils.core.run_folder import BUILTIN, RUN_CONFIG
    from utils.data.templates import check_template
    from utils.export.gguf import OUTTYPES, QUANTS, TYPES, architecture, model_names, weight_files, write_gguf
    from utils.model.loading import (
        check_remote_code,
        download_model_folder,
        load_config,
        load_tokenizer,
        resolve_model_path,
    )

    c = Checks()
    model_path, output = c.text("model_path", model_path), c.text("output", output)
    lora_model = c.text("lora_model", lora_model)
    template = c.text("template", template) or "auto"
    modelfile, local_files_only = c.boolean("modelfile", modelfile), c.boolean("local_files_only", local_files_only)
    trust_remote_code = c.boolean("trust_remote_code", trust_remote_code)
    outtype = str(outtype).lower()
    if outtype not in OUTTYPES:
        c.add(f"--outtype={outtype!r} is not one of {', '.join(OUTTYPES)}; pass one of them")
    elif outtype in QUANTS and lora_model:
        c.add(f"--outtype={outtype} quantizes a whole model; a GGUF LoRA file is f32, f16, bf16 or q8_0, so pass one "
              "of them (and quantize the base model's file)")
    elif outtype in QUANTS and importlib.util.find_spec("llama_cpp") is None:
        c.add(f"--outtype={outtype} quantizes with llama-cpp-python, which is not installed; "
              "pip install -r requirements-dev.txt, or pass --outtype=f16")
    if isinstance(template, str):
        c.call(check_template, template)
    target = Path(output).expanduser() if isinstance(output, str) else None
    # a folder: the file is named for the model; an existing .gguf is replaced
    into_folder = target is not None and (target.is_dir() or target.suffix != ".gguf")
    c.add(output_problem(target if into_folder else target.parent, "output") if target is not None else None)
    if model_path and (Path(model_path).expanduser() / "adapter_config.json").is_file():
        c.add(f"{model_path} is a LoRA adapter folder; merge it first (python merge_lora.py --lora_model={model_path}) "
              f"and export the merged folder, or pass --lora_model={model_path} for a GGUF LoRA file")
    if lora_model and modelfile:
        c.add("--modelfile goes with a model's GGUF; export the base model with --modelfile and add the line "
              "`ADAPTER <the LoRA file>` to that Modelfile")
    c.done()
    if lora_model:
        return export_lora(lora_model, model_path, outtype, target, into_folder, local_files_only, trust_remote_code)
    folder = Path(download_model_folder(resolve_model_path(model_path or BUILTIN, local_files_only, "model_path")))
    path = (target if target is not None and not into_folder
            else (target or ROOT / "models") / f"{folder.name}-{outtype}.gguf")
    weight_files(folder)
    check_remote_code(folder, trust_remote_code)
    config = load_config(folder, local_files_only, trust_remote_code)
    architecture(folder, config)
    tokenizer = load_tokenizer(folder, local_files_only, trust_remote_code)
    run_config = read_json(folder / RUN_CONFIG, "restore it, or merge again") if (folder / RUN_CONFIG).is_file() else {}
    run_config = run_config if isinstance(run_config, dict) else {}
    tmpl, chat_template, add_bos = chat_format(template, tokenizer, run_config, modelfile)
    names = model_names(folder, run_config)
    path.parent.mkdir(parents=True, exist_ok=True)  # only once every input has been checked
    print(f"Exporting {folder} to {path} ({outtype}; prompt format {repr(tmpl.name) if tmpl else 'of the tokenizer'})")

    def write(file, kind):
        return write_gguf(folder, file, kind, config, tokenizer, folder.name, chat_template, add_bos, names)

    start = time.perf_counter()
    # a k-quant is llama.cpp's quantizer run on an f16 file written beside the output, removed afterwards
    f16 = None if outtype in TYPES else path.with_name(f".{path.stem}.f16-{os.getpid()}.gguf")
    try:
        with atomic_path(f16 or path, "output") as tmp:  # a failed or interrupted export leaves no partial .gguf
            count = write(tmp, "f16" if f16 else outtype)
        if f16:
            from utils.export.gguf import quantize

            print(f"Quantizing to {outtype} with llama.cpp")
            with atomic_path(path, "output") as tmp:
                fallbacks = quantize(f16, tmp, outtype)
        seconds = time.perf_counter() - start
        if f16:
            quality(f16, path, outtype, fallbacks, count)
    finally:
        if f16:
            f16.unlink(missing_ok=True)
    written = [path]
    if modelfile:
        from utils.export.runtime_templates import modelfile as ollama_modelfile
        from utils.serve.generation import DEFAULTS

        written.append(path.parent / "Modelfile")
        text = ollama_modelfile(path.name, tmpl, tokenizer.eos_token, min(config.max_position_embeddings, 4096),
                                DEFAULTS)
        write_text_atomic(written[-1], text, "output")
    print(f"{count} tensors, {path.stat().st_size / 2**20:.1f} MiB in {seconds:.1f} s")
    print(f"Wrote {', '.join(str(p) for p in written)}")


def export_lora(lora_model, base_model, outtype, target, into_folder, local_files_only, trust_remote_code):
    """The adapter as a GGUF LoRA file, named <run folder>-lora-<outtype>.gguf unless --output names the file."""
    from utils.core.run_folder import adapter_base, find_adapter, read_run_config
    from utils.export.gguf import architecture
    from utils.export.gguf_lora import lora_tensors, write_lora_gguf
    from utils.model.loading import check_remote_code, download_model_folder, load_config, resolve_model_path

    adapter = find_adapter(lora_model)
    run_config = read_run_config(adapter) or {}
    base = base_model or adapter_base(adapter, run_config)
    folder = Path(download_model_folder(resolve_model_path(base, local_files_only, "model_path")))
    check_remote_code(folder, trust_remote_code)
    config = load_config(folder, local_files_only, trust_remote_code)
    arch = architecture(folder, config)
    alpha, tensors = lora_tensors(adapter, config, arch)
    run = adapter.parent if adapter.name == "adapter_model" else adapter
    path = (target if target is not None and not into_folder
            else (target or ROOT / "models") / f"{run.name}-lora-{outtype}.gguf")
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"Exporting the LoRA adapter {adapter} (base {base}) to {path} ({outtype})")
    with atomic_path(path, "output") as tmp:
        count = write_lora_gguf(tmp, outtype, arch, alpha, tensors, run.name)
    print(f"{count} tensors, {path.stat().st_size / 2**20:.1f} MiB; llama.cpp applies it over the base model's GGUF: "
          f"llama-cli -m <base>.gguf --lora {path}")
    print(f"Wrote {path}")


def chat_format(name, tokenizer, run_config, modelfile):
    """(the Template, the GGUF's chat template, whether llama.cpp prepends BOS) for --template.

    The tokenizer's own chat template is kept verbatim when it is the prompt format (auto without a recorded
    one: the Template is derived from it and checked against it; one that cannot be split into a Template is
    still kept, with the tokenizer's BOS, unless a Modelfile needs the Template); otherwise the Template is
    written as Jinja. BOS follows the template as training did (utils/data/encoding.adds_bos).
    """
    from utils.core.errors import UserError
    from utils.data.encoding import adds_bos
    from utils.data.templates import resolve_template
    from utils.export.runtime_templates import jinja_chat_template

    recorded = isinstance(run_config.get("template"), dict)
    own = name == "auto" and not recorded and getattr(tokenizer, "chat_template", None)
    try:
        template = resolve_template(name, tokenizer, run_config if recorded else None)
    except UserError:
        if own and not modelfile:
            return None, tokenizer.chat_template, None
        raise
    bos = adds_bos(tokenizer, template)
    if own:
        return template, tokenizer.chat_template, bos
    return template, jinja_chat_template(template, tokenizer.eos_token, bos), bos


def quality(f16, path, outtype, fallbacks, count):
    """One line: llama.cpp's perplexity on the held text for the f16 and the quantized file, with their sizes;
    one more when the quantized file loses more than WARN_RISE."""
    from utils.export.gguf import llama_cpp_perplexity

    text = HELD_TEXT.read_text(encoding="utf-8")
    base, tokens = llama_cpp_perplexity(f16, text)
    quant, _ = llama_cpp_perplexity(path, text)
    rise = quant / base - 1
    print(f"Quality: llama.cpp perplexity on {HELD_TEXT.name} ({tokens} tokens): f16 {base:.2f} "
          f"({f16.stat().st_size / 2**20:.1f} MiB) -> {outtype} {quant:.2f} ({path.stat().st_size / 2**20:.1f} MiB), "
          f"{rise:+.1%}" + (f"; {fallbacks} of {count} tensors fell back to another type" if fallbacks else ""))
    if rise > WARN_RISE:
        print(f"warning: {outtype} raises perplexity by {rise:.0%} over f16: small models lose quality below 6 bits "
              "(and rows not a multiple of 256 fall back to older types); q6_k or q8_0 keep more.")
    return base, quant


if __name__ == "__main__":
    run_cli(main, aliases={"output_dir": "output"})
