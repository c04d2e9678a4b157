"""Serve a model, or several LoRA adapters over one copy of their base, behind the OpenAI API.

    python api_server.py                                          # the built-in model on http://127.0.0.1:8000/v1
    python api_server.py --model_path=models/merged               # a merged (or any HF) model folder
    python api_server.py --lora_model=output/                     # an adapter, named "output", and its base
    python api_server.py --lora_modules=lumi=output/,law=runs/law --api_key=secret --port=8080

Any OpenAI client talks to it; a request's `model` picks an adapter by its name, the base by its own:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")
    client.chat.completions.create(model="lumi", messages=[{"role": "user", "content": "who are you?"}])

Endpoints: POST /v1/chat/completions, POST /v1/completions (both also streamed), GET /v1/models, GET /health.
Every adapter is asked in the prompt template of its own run_config.json. Concurrent requests, for any mix of
adapters, are decoded together, one batched forward per token (utils/serve/engine.py); see utils/serve/openai_api.py for
the request fields taken.
"""
import socket
import sys
from pathlib import Path

from utils.core.cli import run_cli
from utils.core.errors import UserError
from utils.core.flags import Checks


def adapter_flags(c, lora_model, lora_modules):
    """--lora_model (named after its folder) and --lora_modules name=path pairs, as [(name, path, flag)]."""
    pairs = [(Path(str(lora_model)).resolve().name, str(lora_model), "lora_model")] if lora_model else []
    for item in c.names("lora_modules", lora_modules):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            c.add(f"--lora_modules takes name=path pairs joined by commas (lumi=output/,law=runs/law), got {item!r}")
        else:
            pairs.append((name.strip(), path.strip(), "lora_modules"))
    names = [name for name, _, _ in pairs]
    if len(set(names)) < len(names):
        c.add(f"adapter names must differ, got {', '.join(names)}; name them with --lora_modules=name=path,...")
    return pairs


def api_keys(value):
    """--api_key: the key, or a file holding one key a line."""
    text = str(value)
    path = Path(text).expanduser()
    keys = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else [text]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise UserError(f"--api_key file {path} holds no key; write one key a line.")
    return keys


def load_served(load, adapters, base_model, local_files_only):
    """Load the base once and every adapter onto it; returns (model, tokenizer, [Served], base name). Adapters whose
    run configs name different bases are refused before anything loads."""
    import torch

    from utils.core.run_folder import BUILTIN, adapter_base, find_adapter, read_run_config
    from utils.data.templates import resolve_template
    from utils.model.loading import load_for_inference, resolve_model_path
    from utils.serve.generation import stop_token_ids
    from utils.serve.openai_api import Served

    if not adapters:
        model, tokenizer, template, _ = load_for_inference(**load)
        name = load["model_path"] or BUILTIN
        name = Path(name).resolve().name if Path(name).is_dir() else name
        return model, tokenizer, [Served(name, None, template, stop_token_ids(tokenizer, model, template))], name
    folders, configs, bases = [], [], {}
    for name, path, flag in adapters:
        folders.append(find_adapter(path, flag))
        configs.append(read_run_config(folders[-1]) or {})
        recorded = adapter_base(folders[-1], configs[-1]) or BUILTIN
        try:
            bases.setdefault(resolve_model_path(recorded, local_files_only), []).append((name, recorded))
        except UserError:
            if not base_model:  # the recorded base must load; with --base_model it need not exist any more
                raise
            bases.setdefault(recorded, []).append((name, recorded))
    if len(bases) > 1:
        which = "; ".join(f"{', '.join(n for n, _ in group)} on {group[0][1]}" for group in bases.values())
        raise UserError(f"the adapters were trained on different base models ({which}); "
                        "serve each base from its own server.")
    base = base_model or next(iter(bases.values()))[0][1]
    model, tokenizer, template, _ = load_for_inference(**{**load, "lora_model": str(folders[0]), "base_model": base})
    served = [Served(adapters[0][0], "default", template, stop_token_ids(tokenizer, model, template))]
    for i, ((name, path, _), folder, config) in enumerate(zip(adapters[1:], folders[1:], configs[1:]), 1):
        try:
            model.load_adapter(str(folder), adapter_name=f"adapter{i}")
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0][:200]
            raise UserError(f"adapter {name} ({path}) does not fit the base {base} of {adapters[0][0]} ({first}); "
                            "serve it from its own server.") from None
        template_i = resolve_template(load["template"], tokenizer, config)
        served.append(Served(name, f"adapter{i}", template_i, stop_token_ids(tokenizer, model, template_i)))
    model.eval()
    base_path = resolve_model_path(base, local_files_only)
    base_config = read_run_config(base_path) if Path(base_path).is_dir() else None  # a merged folder's
    template_0 = resolve_template(load["template"], tokenizer, base_config)
    name = Path(base).resolve().name if Path(base).is_dir() else base
    if name in [s.name for s in served]:
        raise UserError(f"an adapter is named {name!r} like the base model; name it otherwise in --lora_modules.")
    served.append(Served(name, None, template_0, stop_token_ids(tokenizer, model, template_0)))
    for s in served[:-1]:
        s.parent = name
    ids = torch.tensor([[tokenizer.eos_token_id or 0]] * 2, device=model.get_input_embeddings().weight.device)
    try:  # peft's mixed-adapter forward, once, so that a failure shows now and not at every request
        with torch.inference_mode():
            model(input_ids=ids, adapter_names=["default", "__base__"])
    except (ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"peft cannot mix these adapters in one batch ({str(e).strip().splitlines()[0][:200]}); "
                        "serve each adapter from its own server.") from None
    return model, tokenizer, served, name


def main(model_path: str = None, lora_model: str = None, lora_modules: str = None, base_model: str = None,
         template: str = "auto", num_gpus: int = 1, use_8bit: bool = False, use_4bit: bool = False,
         precision: str = "auto", local_files_only: bool = False, trust_remote_code: bool = None,
         # server
         host: str = "127.0.0.1", port: int = 8000, api_key: str = None, max_batch: int = 16, max_queue: int = 64,
         # generation defaults; a request's own fields win
         max_new_tokens: int = 512, temperature: float = 0.7, top_p: float = 0.9, top_k: int = 40,
         repetition_penalty: float = 1.1, no_repeat_ngram_size: int = 0, do_sample: bool = True,
         max_context: int = None):
    """Serve the OpenAI API for a merged model, one or several LoRA adapters on their base, or the built-in model.

    Args:
        model_path: A merged (or any HF) model folder, or a hub id. With no model flag, the built-in model is served.
        lora_model: A finetune.py output folder (or a checkpoint-N inside it), served under its folder's name
            beside its base model.
        lora_modules: Several adapters over one copy of their common base, as name=path pairs joined by commas;
            a request's `model` picks one by name. Adapters trained on different bases are refused.
        base_model: Override the adapters' base model (a folder, hub id or builtin:smollm2).
        template: Prompt template for every model: auto (what each adapter's training used, else the tokenizer's
            chat template), a name from templates/ or a template .json file.
        num_gpus: Spread the model over this many GPUs with a device map; ignored on CPU.
        use_8bit: Load the base model quantized to 8 bits (bitsandbytes).
        use_4bit: Load the base model quantized to 4 bits (NF4).
        precision: auto, bf16, fp16 or fp32 for the model weights.
        local_files_only: Never contact the model hub.
        trust_remote_code: Run the Python code the model ships; default: what training recorded in run_config.json.
        host: The address to listen on; 127.0.0.1 serves this machine only, 0.0.0.0 the network.
        port: The port to listen on.
        api_key: Require `Authorization: Bearer <key>` on /v1 requests: the key, or a file with one key a line.
        max_batch: Answers decoded together; more requests wait in the queue.
        max_queue: Requests that may wait; past that a request gets 429.
        max_new_tokens: Default longest answer, in tokens (a request's max_tokens wins).
        temperature: Default sampling temperature; 0 means greedy decoding.
        top_p: Default nucleus sampling threshold.
        top_k: Default number of most likely tokens to sample among (0 means no limit).
        repetition_penalty: Default penalty on repeating earlier tokens (above 1 discourages it).
        no_repeat_ngram_size: Forbid any repeated n-gram of this size (0: off).
        do_sample: Sample (True) or decode greedily (False) when a request gives no temperature.
        max_context: Tokens of prompt plus answer; default the model's context length.
    """
    from utils.serve import generation

    c = Checks()
    if model_path and (lora_model or lora_modules):
        c.add("--model_path serves a merged model; adapters go with their base (--lora_model, --lora_modules, "
              "--base_model)")
    load, max_context = generation.chat_model_flags(c, model_path, None, base_model, template, None, num_gpus,
                                                    use_8bit, use_4bit, precision, local_files_only, max_context,
                                                    trust_remote_code)
    adapters = adapter_flags(c, c.text("lora_model", lora_model), lora_modules)
    host, port = c.text("host", host, required=True), c.integer("port", port, 1, 65535)
    max_batch, max_queue = c.integer("max_batch", max_batch, 1, 1024), c.integer("max_queue", max_queue, 0)
    api_key = c.text("api_key", api_key)
    settings = generation.check_settings(max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                                         no_repeat_ngram_size, do_sample, checks=c)
    keys = c.call(api_keys, api_key, default=[]) if api_key else []
    c.done()
    with socket.socket() as probe:  # a taken port would otherwise fail only after the model has loaded
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port or --host.") from None

    import uvicorn

    from utils.serve.engine import Engine
    from utils.serve.openai_api import build_app

    model, tokenizer, served, base = load_served(load, adapters, load["base_model"], load["local_files_only"])
    context = max_context or generation.context_length(model)
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue).start()
    app = build_app(engine, served, tokenizer, context, settings, keys, base)
    names = ", ".join(f"{s.name} (template {s.template.name})" for s in served)
    print(f"Serving {names} on http://{host}:{port}/v1 with up to {engine.max_batch} answers per step"
          f"{', an API key required' if keys else ''}.", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        engine.close()


if __name__ == "__main__":
    sys.exit(run_cli(main))
