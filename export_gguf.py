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

from utils.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parent


def main(
    model_path: str = None,
    outtype: str = "f16",
    output: str = None,
    modelfile: bool = False,
    local_files_only: bool = False,
):
    """Write one GGUF file from an HF LLaMA folder.

    Args:
        model_path: an HF LLaMA folder with safetensors weights (e.g. merge_lora.py's output) or hub id; default the built-in model.
        outtype: f32, f16, bf16 or q8_0 (norms stay f32).
        output: the .gguf path to write; default models/<folder name>-<outtype>.gguf in the toolkit folder.
        modelfile: also write an Ollama Modelfile next to the GGUF file.
        local_files_only: never download a model from the hub.
    """
    from utils.gguf_export import TYPES, modelfile as ollama_modelfile, write_gguf
    from utils.model import BUILTIN, download_model_folder, load_config, load_tokenizer, resolve_model_path

    outtype = str(outtype).lower()
    if outtype not in TYPES:
        raise UserError(f"--outtype={outtype!r} is not one of {', '.join(TYPES)}; for k-quants run llama.cpp's llama-quantize on the f16 file.")
    if model_path and (Path(model_path).expanduser() / "adapter_config.json").is_file():
        raise UserError(f"{model_path} is a LoRA adapter folder; merge it first (python merge_lora.py --lora_model={model_path}) and export the merged folder.")
    folder = Path(download_model_folder(resolve_model_path(model_path or BUILTIN, local_files_only, "model_path")))
    path = Path(output).expanduser() if output else ROOT / "models" / f"{folder.name}-{outtype}.gguf"
    if path.suffix != ".gguf":
        raise UserError(f"--output={output!r} must end in .gguf.")
    path.parent.mkdir(parents=True, exist_ok=True)
    config, tokenizer = load_config(folder, local_files_only), load_tokenizer(folder, local_files_only)
    print(f"Exporting {folder} to {path} ({outtype})")
    start = time.perf_counter()
    count = write_gguf(folder, path, outtype, config, tokenizer, name=folder.name)
    seconds = time.perf_counter() - start
    written = [path]
    if modelfile:
        written.append(path.parent / "Modelfile")
        written[-1].write_text(ollama_modelfile(path, tokenizer), encoding="utf-8")
    print(f"{count} tensors, {path.stat().st_size / 2**20:.1f} MiB in {seconds:.1f} s")
    print(f"Wrote {', '.join(str(p) for p in written)}")


if __name__ == "__main__":
    run_cli(main)
