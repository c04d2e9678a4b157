"""The OpenAI-compatible HTTP API over a utils.serve.engine.Engine: routes, request checks, responses and streaming.

Follows the OpenAI API reference: POST /v1/chat/completions and POST /v1/completions, whole or streamed as
server-sent events (`data: {...}` chunks, then `data: [DONE]`), GET /v1/models, and GET /health. A chat request is
turned into the prompt by utils.data.encoding.encode_prompt with the template of the model it names (its adapter's run
config), the code that built the training examples; /v1/completions continues its prompt as given. Every bad
request gets a 4xx JSON body in OpenAI's error shape ({"error": {"message", "type", "param", "code"}}): malformed
JSON, an unknown model, a value out of range, a prompt longer than the context, a missing or wrong API key (401),
a full queue (429); never a 500 or a traceback.

Request fields beyond OpenAI's, as vLLM takes them: `top_k`, `repetition_penalty` and `ignore_eos`. Their
defaults, and those of temperature, top_p and max_tokens, are the server's flags (cli_demo.py's defaults), so a
request with temperature 0 gets the answer `cli_demo.py --prompt=... --temperature=0` prints. presence_penalty
and frequency_penalty are OpenAI's (subtracted from the logits per answer token seen); logprobs, tools,
logit_bias, n > 1 and structured output are refused with 400.
"""
import asyncio
import copy
import dataclasses
import hmac
import json
import time
import uuid

from utils.core.errors import UserError
from utils.data.encoding import encode_prompt
from utils.serve.engine import Job, QueueFull
from utils.serve.generation import Stream, check_settings

MAX_BODY = 8 * 1024 * 1024
REASONS = {"stop token": "stop", "stop string": "stop", "length": "length"}


@dataclasses.dataclass
class Served:
    """A model name the API answers to: the base (adapter None) or one adapter, with its own template."""
    name: str
    adapter: str  # peft's adapter name; None: the base model
    template: object
    stop_ids: set
    parent: str = None


class ApiError(Exception):
    def __init__(self, status, message, param=None, code="invalid_value", kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message, param=None, code=None, kind="invalid_request_error"):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def number(body, name, low, high, default=None, kind=(int, float)):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "an integer" if kind is int else "a number"
        raise ApiError(400, f"'{name}' must be {what} from {low} to {high}, got {value!r}.", name)
    return value


def boolean(body, name):
    value = body.get(name, False)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {value!r}.", name)
    return bool(value)


def text_of(content, param):
    """A message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) for part in content):
        return "".join(part["text"] for part in content)
    raise ApiError(400, f"'{param}' must be a string or a list of text parts; only text is supported.", param)


def conversation(messages):
    """OpenAI messages to (system, [(user, assistant), ...], question): leading system messages, then turns that
    alternate from the user's and end with one (consecutive messages of one role are joined)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects.", "messages")
    system, turns = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"'messages[{i}]' must be an object with role and content.", f"messages[{i}]")
        role, content = message.get("role"), text_of(message.get("content"), f"messages[{i}].content")
        if role in ("system", "developer"):
            if turns:
                raise ApiError(400, f"'messages[{i}]': a system message must come before the conversation.",
                               f"messages[{i}]")
            system.append(content)
        elif role in ("user", "assistant"):
            if not turns and role == "assistant":
                raise ApiError(400, "the conversation must start with a user message.", f"messages[{i}]")
            if turns and turns[-1][0] == role:
                turns[-1][1] += "\n\n" + content
            else:
                turns.append([role, content])
        else:
            raise ApiError(400, f"'messages[{i}].role' {role!r} is not supported; use system, user or assistant.",
                           f"messages[{i}].role")
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the last message must be the user's.", "messages")
    history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    return "\n\n".join(system), history, turns[-1][1]


def refuse_unsupported(body, chat):
    if body.get("n") not in (None, 1):
        raise ApiError(400, "'n' must be 1: this server writes one answer per request.", "n")
    if chat and (body.get("logprobs") or body.get("top_logprobs") is not None):
        raise ApiError(400, "logprobs are not supported by this server.", "logprobs")
    if not chat and (body.get("logprobs") is not None or body.get("echo") or body.get("suffix")
                     or body.get("best_of") not in (None, 1)):
        raise ApiError(400, "logprobs, echo, suffix and best_of are not supported by this server.", "logprobs")
    for name in ("tools", "functions", "logit_bias"):
        if body.get(name):
            raise ApiError(400, f"'{name}' is not supported by this server.", name)
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise ApiError(400, "'response_format' must be {\"type\": \"text\"}: structured output is not supported.",
                       "response_format")


def chat_prompt(body, tokenizer, template):
    """The prompt ids of a chat request, built as training built its examples."""
    system, history, query = conversation(body.get("messages"))
    try:
        return encode_prompt(tokenizer, template, system, history, query)
    except UserError as e:  # a system prompt for a template without a system role
        raise ApiError(400, str(e), "messages") from None


def completion_prompt(body, tokenizer):
    """The prompt ids of a completions request: its text as it is, or its token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    if isinstance(prompt, list) and all(type(t) is int and 0 <= t < len(tokenizer) for t in prompt):
        return list(prompt)
    raise ApiError(400, "'prompt' must be one string or one list of token ids (one prompt per request).", "prompt")


def stops(body):
    value = body.get("stop")
    value = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(value, list) or len(value) > 4 or not all(isinstance(s, str) and s for s in value):
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them.", "stop")
    return value


def settings_for(body, defaults, prompt_len, context_len):
    """A request's generation settings: its fields over the server's defaults, checked and fitted to the context."""
    settings = dict(defaults)
    temperature = number(body, "temperature", 0, 2)
    if temperature is not None:
        settings.update(temperature=temperature, do_sample=temperature > 0)
    settings["top_p"] = number(body, "top_p", 0, 1, settings["top_p"])
    top_k = number(body, "top_k", -1, 1_000_000, settings["top_k"], kind=int)
    settings["top_k"] = max(top_k, 0)  # vLLM's -1 means no limit, as our 0
    settings["repetition_penalty"] = number(body, "repetition_penalty", 0.01, 10, settings["repetition_penalty"])
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    wanted = number(body, field, 1, 1 << 30, kind=int)
    room = context_len - prompt_len
    if room < 1 or (wanted is not None and wanted > room):
        raise ApiError(400, f"this model's context is {context_len} tokens, but the prompt has {prompt_len}"
                       + (f" and {field} asks for {wanted} more" if wanted is not None and room >= 1 else "")
                       + "; shorten the messages or lower max_tokens.", "messages", "context_length_exceeded")
    settings["max_new_tokens"] = wanted if wanted is not None else min(defaults["max_new_tokens"], room)
    return check_settings(**settings)


def sse(data):
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def chat_choice(text, finish=None):
    return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None, "finish_reason": finish}


def text_choice(text, finish=None):
    return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}


def usage_of(job):
    prompt, answer = len(job.prompt_ids), job.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer}


def build_app(engine, served, tokenizer, context_len, defaults, api_keys=(), base_name=None):
    """The FastAPI app. served: the Served models (the first answers a request without `model`); defaults: the
    server's generation settings (utils.serve.generation.check_settings); api_keys: keys a /v1 request must bear."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="lora-kit", docs_url=None, redoc_url=None, openapi_url=None)
    by_name, started = {model.name: model for model in served}, int(time.time())
    # The decoding thread turns tokens into text with a tokenizer of its own: a fast tokenizer used from two threads
    # at once can fail with "Already borrowed" (tokenizers#537).
    decoder = copy.deepcopy(tokenizer)

    @app.exception_handler(ApiError)
    async def api_error(request, e):
        return JSONResponse(error_body(e.message, e.param, e.code, e.kind), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):  # an unknown route (404), a wrong method (405)
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}"), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, e):  # a bug or a failed forward: no traceback leaves the server
        return JSONResponse(error_body(f"the server failed ({type(e).__name__}); see its log.", kind="server_error"),
                            status_code=500)

    def authorize(request):
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if api_keys and (scheme.lower() != "bearer"
                         or not any(hmac.compare_digest(key.strip().encode(), k.encode()) for k in api_keys)):
            raise ApiError(401, "a valid API key is required: send the header 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    def model_named(name):
        if not isinstance(name, str) or name not in by_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server has {', '.join(by_name)}.", "model",
                           "model_not_found")
        return by_name[name]

    async def read(request, chat):
        """The checked body of a completions request: (body, model, stream, include_usage)."""
        authorize(request)
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"the request body is larger than {MAX_BODY >> 20} MiB.", code="request_too_large")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e}).", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object.", code="invalid_json")
        model = model_named(body.get("model") or served[0].name)
        refuse_unsupported(body, chat)
        stream, options = boolean(body, "stream"), body.get("stream_options")
        if options is not None and (not stream or not isinstance(options, dict)):
            raise ApiError(400, "'stream_options' is only allowed with stream: true, as an object.", "stream_options")
        return body, model, stream, bool((options or {}).get("include_usage"))

    def start(body, model, prompt_ids):
        """Check the rest of the request and queue its job; its text pieces arrive on an asyncio queue, then None."""
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty.", "prompt")
        settings = settings_for(body, defaults, len(prompt_ids), context_len)
        stop_ids = set() if boolean(body, "ignore_eos") else model.stop_ids  # vLLM's field, for benchmarks
        job = Job(prompt_ids, settings, Stream(decoder, stop_ids, [*model.template.stop_strings, *stops(body)]),
                  adapter=model.adapter, seed=number(body, "seed", -(1 << 63), (1 << 64) - 1, kind=int),
                  presence_penalty=number(body, "presence_penalty", -2, 2, 0.0),
                  frequency_penalty=number(body, "frequency_penalty", -2, 2, 0.0))
        pieces, loop = asyncio.Queue(), asyncio.get_running_loop()
        job.on_piece = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)
        try:
            engine.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e}); retry shortly.", code="rate_limit_exceeded",
                           kind="requests") from None
        return job, pieces

    async def whole(request, job, pieces):
        """The answer's text once the job has ended; a client that hangs up cancels it."""
        try:
            while True:
                try:
                    piece = await asyncio.wait_for(pieces.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return ""
                    continue
                if piece is None:
                    if job.error:
                        raise RuntimeError(job.error)
                    return job.stream.text
        finally:
            engine.cancel(job)

    async def streamed(job, pieces, head, choice, include_usage, first):
        """SSE: the `first` choice (chat's role), a chunk per text piece, the finish chunk, the usage, [DONE].
        Starlette cancels this when the client hangs up; the job then leaves before the next step."""
        try:
            if first:
                yield sse({**head, "choices": [first], "usage": None})
            begun = not first  # a chat answer loses its leading whitespace, as in cli_demo.py
            while (piece := await pieces.get()) is not None:
                piece = piece if begun else piece.lstrip()
                if piece:
                    begun = True
                    yield sse({**head, "choices": [choice(piece)], "usage": None})
            if job.error:
                yield sse(error_body(job.error, kind="server_error"))
            else:
                usage = usage_of(job)
                yield sse({**head, "choices": [choice(None, REASONS.get(job.stream.reason, "stop"))],
                           "usage": None if include_usage else usage})
                if include_usage:
                    yield sse({**head, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        finally:
            engine.cancel(job)

    async def answer(request, chat):
        body, model, stream, include_usage = await read(request, chat)
        prompt_ids = chat_prompt(body, tokenizer, model.template) if chat else completion_prompt(body, tokenizer)
        job, pieces = start(body, model, prompt_ids)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": model.name, "system_fingerprint": None}
        if stream:
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            lines = streamed(job, pieces, {**head, "object": "chat.completion.chunk"} if chat else head,
                             chat_choice if chat else text_choice, include_usage, first if chat else None)
            return StreamingResponse(lines, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, reason = await whole(request, job, pieces), REASONS.get(job.stream.reason, "stop")
        choice = text_choice(text, reason) if not chat else {
            "index": 0, "message": {"role": "assistant", "content": text.lstrip(), "refusal": None}, "logprobs": None,
            "finish_reason": reason}
        return JSONResponse({**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                             "usage": usage_of(job)})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, chat=False)

    def card(model):
        return {"id": model.name, "object": "model", "created": started, "owned_by": "lora-kit",
                "root": base_name or model.name, "parent": model.parent}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [card(model) for model in served]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str, request: Request):
        authorize(request)
        return card(model_named(name))

    @app.get("/health")
    async def health():
        running, waiting = engine.load()
        return {"status": "ok", "models": list(by_name), "running": running, "waiting": waiting}

    return app
