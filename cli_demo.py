"""Chat with a model in the terminal, in the prompt format it was trained with.

    python cli_demo.py                                  # the built-in model
    python cli_demo.py --lora_model=output/             # a finetune.py output folder (base + adapter)
    python cli_demo.py --model_path=models/merged --num_gpus=2 --input_pattern=prompt --load_8bit=False
    python cli_demo.py --lora_model=output/ --prompt="who are you?"   # one answer, then exit
    echo "who are you?" | python cli_demo.py --lora_model=output/ --seed=0

Type a question and press Enter. `clear` forgets the conversation, `exit`, `quit` or Ctrl-D leaves,
Ctrl-C during an answer stops that answer and returns to the prompt.
"""
import sys

from utils.core.cli import run_cli
from utils.core.errors import UserError
from utils.core.flags import Checks

COMMANDS_HELP = "Commands: clear (forget the conversation), exit or quit (or Ctrl-D). Ctrl-C stops an answer."


def answer(ask, query, history, stream_output):
    """Run one answer; Ctrl-C stops it and keeps what was written. Returns the Stream."""
    stream = ask(query, history)
    stopped, shown = False, 0
    while True:
        try:
            for piece in stream:
                if stream_output:
                    piece = piece if shown else piece.lstrip()  # the answer's leading space, after "Assistant: "
                    shown += len(piece)
                    print(piece, end="", flush=True)
            break
        except KeyboardInterrupt:  # stop the model, then read what it already wrote
            stream.stop()
            stopped = True
    if not stream_output:
        print(stream.text.lstrip(), end="")
    print(" [stopped]" if stopped else "", flush=True)
    if stream.prompt.dropped_turns:
        print(f"(the {stream.prompt.dropped_turns} oldest turn(s) no longer fit the context and were left out)",
              file=sys.stderr)
    if stream.prompt.query_trimmed:
        print("(the question was longer than the context; only its end was sent)", file=sys.stderr)
    return stream


def main(model_path: str = None, lora_model: str = None, base_model: str = None, template: str = "auto",
         input_pattern: str = None, num_gpus: int = 1, use_8bit: bool = False, use_4bit: bool = False,
         precision: str = "auto", local_files_only: bool = False, trust_remote_code: bool = None,
         # conversation
         prompt: str = None, system: str = "", no_stream: bool = False, seed: int = None,
         # generation
         max_new_tokens: int = 512, temperature: float = 0.7, top_p: float = 0.9, top_k: int = 40,
         repetition_penalty: float = 1.1, no_repeat_ngram_size: int = 0, do_sample: bool = True,
         max_context: int = None):
    """Chat with a merged model, a LoRA adapter on its base, or the built-in model.

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
        prompt: Ask this one question, print the answer and exit. Stdin that is not a terminal does the same.
        system: A system prompt (the template's default when empty).
        no_stream: Print each answer whole instead of token by token.
        seed: Make sampling reproducible: the same seed and question give the same answer.
        max_new_tokens: The longest answer, in tokens (at most half the context).
        temperature: Sampling temperature; 0 means greedy decoding.
        top_p: Nucleus sampling: keep the smallest set of tokens with this total probability.
        top_k: Sample among the k most likely tokens (0: no limit).
        repetition_penalty: Above 1 discourages repeating earlier tokens.
        no_repeat_ngram_size: Forbid any repeated n-gram of this size (0: off).
        do_sample: Sample (True) or decode greedily (False).
        max_context: Tokens of prompt plus answer; default the model's context length. Older turns are
            left out when the conversation grows past it.
    """
    from utils.serve import generation

    c = Checks()
    load, max_context = generation.chat_model_flags(c, model_path, lora_model, base_model, template, input_pattern,
                                                    num_gpus, use_8bit, use_4bit, precision, local_files_only,
                                                    max_context, trust_remote_code)
    no_stream, seed = c.boolean("no_stream", no_stream), c.integer("seed", seed, 0, none=True)
    system = c.text("system", system) or ""
    settings = generation.check_settings(max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                                         no_repeat_ngram_size, do_sample, checks=c)
    c.done()
    if prompt is None and sys.stdin is None:  # started with standard input closed
        raise UserError("standard input is closed; pass the question with --prompt=\"...\", pipe it on stdin, "
                        "or run in a terminal.")
    one_shot = prompt is not None or not sys.stdin.isatty()
    query = str(prompt) if prompt is not None else (sys.stdin.read() if one_shot else None)
    if one_shot and not query.strip():
        raise UserError("the question is empty; pass --prompt=\"...\" or pipe a question on stdin.")

    from utils.model.loading import load_for_inference

    model, tokenizer, template, _ = load_for_inference(**load)
    context = max_context or generation.context_length(model)

    def ask(question, history):
        return generation.stream_chat(model, tokenizer, template, question, history, system, settings,
                                      None if seed is None else int(seed), context_len=context)

    if one_shot:
        answer(ask, query.strip(), [], not no_stream)
        return
    try:
        import readline  # noqa: F401  line editing and arrow-key history for input()
    except ImportError:
        pass
    print(f"Chatting with {lora_model or model_path or 'the built-in model'} (template {template.name}). "
          f"{COMMANDS_HELP}", flush=True)
    history = []
    while True:
        try:
            query = input("\nUser: ")
        except EOFError:
            print()
            break
        except KeyboardInterrupt:
            print("\n(type exit or press Ctrl-D to leave)")
            continue
        if not query.strip():
            continue
        if query.strip().lower() in ("exit", "quit"):
            break
        if query.strip().lower() == "clear":
            history = []
            print("(conversation cleared)")
            continue
        print("Assistant: ", end="", flush=True)
        stream = answer(ask, query, history, not no_stream)
        history = stream.prompt.history + ([(stream.prompt.query, stream.text)] if stream.text else [])
    print("Bye.")


if __name__ == "__main__":
    run_cli(main, aliases={"load_8bit": "use_8bit", "load_4bit": "use_4bit", "dtype": "precision"})
