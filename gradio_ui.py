"""A chat web page for a model, streaming token by token, in the prompt format it was trained with.

    python gradio_ui.py                                      # the built-in model, on http://127.0.0.1:7860
    python gradio_ui.py --lora_model=output/                 # a finetune.py output folder (base + adapter)
    python gradio_ui.py --lora_model=output/ --compare       # the base model's answers beside the tuned model's
    python gradio_ui.py --model_path=models/merged --num_gpus=2 --input_pattern=prompt --load_8bit=False
    python gradio_ui.py --lora_model=output/ --server_name=0.0.0.0 --server_port=8080 --auth=alice:secret

Every browser session has its own conversation. Stop ends an answer at once, Regenerate asks the last
question again, Clear forgets the conversation. Conversations longer than the context lose their
oldest turns; a question longer than the context keeps its end. --compare shows two chats side by side, each with
its own history: the base model (adapter off) and the tuned model answer together, from one copy of the weights.
"""
import contextlib
import threading
from pathlib import Path

from utils.core.cli import run_cli
from utils.core.errors import UserError
from utils.core.flags import Checks

PARAMS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "no_repeat_ngram_size", "do_sample")


def parse_auth(auth):
    """--auth user:pass, several joined by commas, or a file with one user:pass a line; None for no login."""
    if auth is None or auth == "":
        return None
    text = str(auth)
    if Path(text).expanduser().is_file():
        where, entries = text, [line.strip()
                                for line in Path(text).expanduser().read_text(encoding="utf-8").splitlines()]
    else:
        where, entries = "--auth", [part.strip() for part in text.split(",")]
    pairs = [tuple(e.split(":", 1)) for e in entries if e and not e.startswith("#")]
    if not pairs or any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
        raise UserError(f"{where} must hold user:password entries (or be a file with one a line); got {text!r}.")
    return pairs


def to_messages(pairs):
    """(question, answer) turns to the Chatbot's list of role/content messages."""
    return [{"role": role, "content": text} for q, a in pairs for role, text in (("user", q), ("assistant", a))]


def build_demo(model, tokenizer, template, settings, title="lora-kit chat", context_len=None, concurrency=2,
               engine=None):
    """The page: chat, system prompt, generation sliders, Send, Stop, Regenerate, Clear; queue enabled. With `engine`
    (a started utils.serve.engine.Engine over the PeftModel) two chats side by side, the base's and the tuned
    model's."""
    import gradio as gr

    from utils.serve import compare, generation

    context = context_len or generation.context_length(model)
    running = {}  # session hash -> stop Event of the answer(s) that session is generating
    columns = ([("Base model (adapter off)", "base"), ("Tuned model (adapter on)", "tuned")] if engine
               else [("Conversation", "chatbot")])

    def generate(query, turns, system, params, seed, request):
        try:
            chosen = generation.check_settings(**params)
            seed = None if seed is None or int(seed) < 0 else int(seed)
            args = (tokenizer, template, query, turns if engine else turns[0], system or "", chosen, seed,
                    threading.Event(), context)
            stream = compare.stream_compare(engine, *args) if engine else generation.stream_chat(model, *args)
        except UserError as e:
            raise gr.Error(str(e)) from None
        key = request.session_hash
        running[key] = stream.stop_event
        prompts = stream.prompts if engine else [stream.prompt]
        if max(p.dropped_turns for p in prompts):
            gr.Warning(f"The {max(p.dropped_turns for p in prompts)} oldest turn(s) no longer fit the context and "
                       "were left out.")
        if any(p.query_trimmed for p in prompts):
            gr.Warning("The message is longer than the context; only its end was sent.")

        def shown():
            new = [p.history + [(query, text)] for p, text in zip(prompts, stream.texts if engine else [stream.text])]
            return *map(to_messages, new), new

        try:
            for _ in stream:
                yield shown()
        except UserError as e:  # decoding failed (stream_compare)
            raise gr.Error(str(e)) from None
        finally:  # the page closed or the event was cancelled: free the CPU at once
            stream.stop()
            if running.get(key) is stream.stop_event:
                running.pop(key, None)
        yield shown()

    def send(message, turns, system, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
             no_repeat_ngram_size, do_sample, seed, request: gr.Request):
        params = dict(zip(PARAMS, (max_new_tokens, temperature, top_p, top_k, repetition_penalty, no_repeat_ngram_size,
                                   do_sample)))
        if not message or not message.strip():
            yield *map(to_messages, turns), turns, message
            return
        yield *(to_messages(t + [(message, "")]) for t in turns), turns, ""
        for shown in generate(message, turns, system, params, seed, request):
            yield *shown, ""

    def regenerate(turns, system, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                   no_repeat_ngram_size, do_sample, seed, request: gr.Request):
        params = dict(zip(PARAMS, (max_new_tokens, temperature, top_p, top_k, repetition_penalty, no_repeat_ngram_size,
                                   do_sample)))
        if not turns[-1]:
            yield *map(to_messages, turns), turns
            return
        yield from generate(turns[-1][-1][0], [t[:-1] for t in turns], system, params, seed, request)

    def stop(request: gr.Request):
        event = running.get(request.session_hash)
        if event is not None:
            event.set()

    def fresh():
        return *([] for _ in columns), [[] for _ in columns]

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"### {title}")
        turns = gr.State([[] for _ in columns])  # this session's (question, answer) turns, one list per chat
        with gr.Row() if engine else contextlib.nullcontext():
            chatbots = [gr.Chatbot(label=label, height=420, elem_id=name, buttons=["copy"]) for label, name in columns]
        with gr.Row():
            message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=8,
                                 lines=1, max_lines=8, elem_id="message")
            send_btn = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        with gr.Row():
            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
            regen_btn = gr.Button("Regenerate", elem_id="regenerate")
            clear_btn = gr.Button("Clear", elem_id="clear")
        with gr.Accordion("System prompt and generation settings", open=False):
            system = gr.Textbox(label="System prompt", placeholder=template.system or "(the template's default)",
                                lines=2)
            controls = [
                gr.Slider(1, max(1, context // 2), value=min(settings["max_new_tokens"], max(1, context // 2)), step=1,
                          label="max_new_tokens"),
                gr.Slider(0.0, 2.0, value=settings["temperature"], step=0.05, label="temperature (0: greedy)"),
                gr.Slider(0.0, 1.0, value=settings["top_p"], step=0.01, label="top_p"),
                gr.Slider(0, 200, value=settings["top_k"], step=1, label="top_k (0: no limit)"),
                gr.Slider(1.0, 2.0, value=settings["repetition_penalty"], step=0.01, label="repetition_penalty"),
                gr.Slider(0, 10, value=settings["no_repeat_ngram_size"], step=1, label="no_repeat_ngram_size (0: off)"),
                gr.Checkbox(value=settings["do_sample"], label="do_sample"),
                gr.Number(value=-1, precision=0, label="seed (-1: random)"),
            ]
        inputs = [message, turns, system, *controls]
        message.submit(send, inputs, [*chatbots, turns, message], api_name="chat")
        send_btn.click(send, inputs, [*chatbots, turns, message], api_name=False)
        regen_btn.click(regenerate, [turns, system, *controls], [*chatbots, turns], api_name="regenerate")
        stop_btn.click(stop, None, None, queue=False, api_name="stop")
        clear_btn.click(stop, None, None, queue=False, api_name=False).then(
            fresh, None, [*chatbots, turns], queue=False, api_name="clear")
        for chatbot in chatbots:  # a chat's own trash icon clears every column
            chatbot.clear(stop, None, None, queue=False, api_name=False).then(
                fresh, None, [*chatbots, turns], queue=False, api_name=False)
    demo.queue(default_concurrency_limit=concurrency)
    return demo


def main(model_path: str = None, lora_model: str = None, base_model: str = None, template: str = "auto",
         input_pattern: str = None, num_gpus: int = 1, use_8bit: bool = False, use_4bit: bool = False,
         precision: str = "auto", local_files_only: bool = False, trust_remote_code: bool = None,
         # server
         server_name: str = "127.0.0.1", server_port: int = None, share: bool = False, auth: str = None,
         concurrency: int = 2, compare: bool = False,
         # generation defaults shown on the page
         max_new_tokens: int = 512, temperature: float = 0.7, top_p: float = 0.9, top_k: int = 40,
         repetition_penalty: float = 1.1, no_repeat_ngram_size: int = 0, do_sample: bool = True,
         max_context: int = None):
    """Serve a chat page for a merged model, a LoRA adapter on its base, or the built-in model.

    Args:
        model_path: A merged (or any HF) model folder, or a hub id. With neither this nor --lora_model,
            the built-in model is used.
        lora_model: A finetune.py output folder (or a checkpoint-N inside it); its base model and template
            come from its run_config.json.
        base_model: Override the adapter's base model (a folder, hub id or builtin:smollm2).
        template: Prompt template: auto (what training used, else the tokenizer's chat template), a name
            from templates/ (alpaca, chatml, llama3, prompt, vicuna) or a template .json file.
        input_pattern: The older project's name for --template.
        num_gpus: Spread the model over this many GPUs with a device map; ignored on CPU.
        use_8bit: Load the base model quantized to 8 bits (bitsandbytes); older name: --load_8bit.
        use_4bit: Load the base model quantized to 4 bits (NF4); older name: --load_4bit.
        precision: auto, bf16, fp16 or fp32 for the model weights (also --dtype).
        local_files_only: Never contact the model hub.
        trust_remote_code: Run the Python code the model ships; default: what training recorded in run_config.json.
        server_name: The address to listen on; 0.0.0.0 opens the page to the network.
        server_port: The port; default the first free one from 7860.
        share: Also publish the page through a temporary public gradio.live link.
        auth: Ask for a login, given as user and password joined by a colon (several joined by commas),
            or a file with one such entry a line.
        concurrency: How many answers are generated at the same time; more requests wait in the queue.
        compare: Show the base model's answer (the adapter switched off) beside the tuned model's for every
            message, decoded together from one copy of the base weights; needs --lora_model.
        max_new_tokens: Default longest answer, in tokens (at most half the context).
        temperature: Default sampling temperature; 0 means greedy decoding.
        top_p: Default nucleus sampling threshold.
        top_k: Default number of most likely tokens to sample among (0 means no limit).
        repetition_penalty: Default penalty on repeating earlier tokens (above 1 discourages it).
        no_repeat_ngram_size: Default size of n-grams that may not repeat (0 means off).
        do_sample: Sample (True) or decode greedily (False) by default.
        max_context: Tokens of prompt plus answer; default the model's context length.
    """
    from utils.serve import generation

    c = Checks()
    load, max_context = generation.chat_model_flags(c, model_path, lora_model, base_model, template, input_pattern,
                                                    num_gpus, use_8bit, use_4bit, precision, local_files_only,
                                                    max_context, trust_remote_code)
    share, server_name = c.boolean("share", share), c.text("server_name", server_name, True)
    server_port = c.integer("server_port", server_port, 1, 65535, none=True)
    concurrency, compare = c.integer("concurrency", concurrency, 1), c.boolean("compare", compare)
    if compare is True and not load["lora_model"]:
        c.add("--compare shows the base model beside its LoRA adapter, so it needs --lora_model (a finetune.py "
              "output folder), e.g. --lora_model=output/ --compare")
    settings = generation.check_settings(max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                                         no_repeat_ngram_size, do_sample, checks=c)
    logins = c.call(parse_auth, auth)
    c.done()
    import socket  # a bad address or a taken port would otherwise fail only after the model has loaded

    try:
        family = socket.getaddrinfo(str(server_name), server_port or 0, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family) as probe:
            probe.bind((str(server_name), int(server_port or 0)))
    except OSError as e:
        fix = ("pass another --server_port, or leave it out to take the first free port from 7860" if server_port
               and not isinstance(e, socket.gaierror) else "pass an address of this machine as --server_name "
               "(127.0.0.1, or 0.0.0.0 for every network)")
        where = f"{server_name}:{server_port}" if server_port else server_name
        raise UserError(f"cannot listen on {where} ({e.strerror}); {fix}.") from None

    from utils.model.loading import load_for_inference
    from utils.serve.engine import Engine

    model, tokenizer, template, _ = load_for_inference(**load)
    name = Path(str(lora_model or model_path)).name if (lora_model or model_path) else "built-in SmolLM2-135M-Instruct"
    name += " beside its base model" if compare else ""
    engine = Engine(model, max_batch=2 * int(concurrency)).start() if compare else None  # one decoding thread
    demo = build_demo(model, tokenizer, template, settings, title=f"lora-kit chat: {name}",
                      context_len=max_context, concurrency=int(concurrency), engine=engine)
    print(f"Serving {name} (template {template.name}) on "
          f"http://{server_name}:{server_port or 'first free port from 7860'}"
          f"{' with a login' if logins else ''}{' and a public share link' if share else ''}.", flush=True)
    demo.launch(server_name=str(server_name), server_port=int(server_port) if server_port else None, share=share,
                auth=logins)


if __name__ == "__main__":
    run_cli(main, aliases={"load_8bit": "use_8bit", "load_4bit": "use_4bit", "dtype": "precision"})
