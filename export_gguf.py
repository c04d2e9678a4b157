"""Export an HF LLaMA-architecture folder (a merged model, or the built-in one) to GGUF for llama.cpp and Ollama.

    python export_gguf.py                                             # built-in model, f16
    python export_gguf.py --model_path=models/merged --outtype=q8_0   # merge_lora.py's output
    python export_gguf.py --model_path=models/merged --modelfile     # plus an Ollama Modelfile

Then: `llama-cli -m models/merged-f16.gguf -cnv`, or `ollama create mymodel -f models/Modelfile`.
Types: f32, f16, bf16, q8_0. For k-quants (Q4_K_M, ...), run llama.cpp's `llama-quantize` on the f16 file.
An adapter folder must be merged first (merge_lora.py): GGUF holds one set of plain weights.
"""
import time
from pathlib import Path

from utils.errors import run_cli
from utils.files import atomic_path, output_problem, write_text_atomic
from utils.flags import Checks

ROOT = Path(__file__).resolve().parent


def main(
    model_path: str = None,
    outtype: str = "f16",
    output: str = None,
    modelfile: bool = False,
    local_files_only: bool = False,
    trust_remote_code: bool = False,
):
    """Write one GGUF file from an HF LLaMA folder.

    Args:
        model_path: an HF LLaMA folder with safetensors weights (e.g. merge_lora.py's output) or hub id; default the
            built-in model.
        outtype: f32, f16, bf16 or q8_0 (norms stay f32).
        output: the .gguf path to write, or a folder for <model folder name>-<outtype>.gguf (also --output_dir); default
            the toolkit's models/ folder.
        modelfile: also write an Ollama Modelfile next to the GGUF file.
        local_files_only: never download a model from the hub.
        trust_remote_code: run the Python code the model ships (to read its config and tokenizer).
    """
    from utils.gguf_export import TYPES, modelfile as ollama_modelfile, weight_files, write_gguf
    from utils.model import check_remote_code, download_model_folder, load_config, load_tokenizer, resolve_model_path
    from utils.run_folder import BUILTIN

    c = Checks()
    model_path, output = c.text("model_path", model_path), c.text("output", output)
    modelfile, local_files_only = c.boolean("modelfile", modelfile), c.boolean("local_files_only", local_files_only)
    trust_remote_code = c.boolean("trust_remote_code", trust_remote_code)
    outtype = str(outtype).lower()
    if outtype not in TYPES:
        c.add(f"--outtype={outtype!r} is not one of {', '.join(TYPES)}; "
              "for k-quants run llama.cpp's llama-quantize on the f16 file")
    target = Path(output).expanduser() if isinstance(output, str) else None
    # a folder: the file is named for the model; an existing .gguf is replaced
    into_folder = target is not None and (target.is_dir() or target.suffix != ".gguf")
    c.add(output_problem(target if into_folder else target.parent, "output") if target is not None else None)
    if model_path and (Path(model_path).expanduser() / "adapter_config.json").is_file():
        c.add(f"{model_path} is a LoRA adapter folder; merge it first (python merge_lora.py --lora_model={model_path}) "
              "and export the merged folder")
    c.done()
    folder = Path(download_model_folder(resolve_model_path(model_path or BUILTIN, local_files_only, "model_path")))
    path = (target if target is not None and not into_folder
            else (target or ROOT / "models") / f"{folder.name}-{outtype}.gguf")
    weight_files(folder)
    check_remote_code(folder, trust_remote_code)
    config = load_config(folder, local_files_only, trust_remote_code)
    tokenizer = load_tokenizer(folder, local_files_only, trust_remote_code)
    path.parent.mkdir(parents=True, exist_ok=True)  # only once every input has been checked
    print(f"Exporting {folder} to {path} ({outtype})")
    start = time.perf_counter()
    with atomic_path(path, "output") as tmp:  # a failed or interrupted export leaves no partial .gguf
        count = write_gguf(folder, tmp, outtype, config, tokenizer, name=folder.name)
    seconds = time.perf_counter() - start
    written = [path]
    if modelfile:
        written.append(path.parent / "Modelfile")
        write_text_atomic(written[-1], ollama_modelfile(path, tokenizer), "output")
    print(f"{count} tensors, {path.stat().st_size / 2**20:.1f} MiB in {seconds:.1f} s")
    print(f"Wrote {', '.join(str(p) for p in written)}")


if __name__ == "__main__":
    run_cli(main, aliases={"output_dir": "output"})
