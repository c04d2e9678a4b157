"""The base model and its tuned adapter answering one message side by side, decoded together by one engine."""
import queue
import threading

from utils.core.errors import UserError
from utils.serve.engine import Job, QueueFull
from utils.serve.generation import Stream, build_prompt, check_settings, context_length, stop_token_ids


class Compare:
    """Two answers to one message, decoded together by a utils.serve.engine.Engine (see stream_compare). Iterate it, in
    any thread, to wait for the next piece of either answer; .texts holds each answer's text handed over so far,
    .prompts each column's trimmed Prompt, .streams the Streams, .error the reason decoding failed, if it did."""

    def __init__(self, engine, jobs, stop_event):
        self.engine, self.jobs, self.stop_event, self.error = engine, jobs, stop_event, None
        self.streams, self.texts = [job.stream for job in jobs], ["" for _ in jobs]
        self.prompts = [stream.prompt for stream in self.streams]
        self._pieces = queue.SimpleQueue()  # (column, text piece), (column, None) when that answer has ended
        for i, job in enumerate(jobs):
            job.on_piece = lambda piece, i=i: self._pieces.put((i, piece))

    def __iter__(self):
        running = len(self.jobs)
        try:
            while running:
                i, piece = self._pieces.get()
                if piece is None:
                    running -= 1
                    continue
                self.texts[i] += piece
                yield piece
        finally:  # the reader went away (the page closed): free the rows before the next step
            self.stop()
        self.error = next((job.error for job in self.jobs if job.error), None)
        if self.error:
            raise UserError(f"decoding failed ({self.error}); the answers end here.")

    def stop(self):
        """End both answers before the next step (safe from any thread)."""
        for job in self.jobs:
            self.engine.cancel(job)


def stream_compare(engine, tokenizer, template, query, histories, system="", settings=None, seed=None,
                   stop_event=None, context_len=None):
    """Ask one message of the base model (the adapter off) and of the tuned model (the adapter on), each with its own
    history (histories: [base turns, tuned turns]); returns a Compare. The rows go to `engine` (a started
    utils.serve.engine.Engine over the PeftModel) together, so each step is one forward over both, and peft's per-row
    `adapter_names` switches the adapter off for the base's row only: one copy of the weights, and no shared state
    flipped (model.disable_adapter() would switch it off for every thread). Each row is prompted, trimmed, sampled
    (with `seed`) and stopped as stream_chat's, so each column equals that model's answer alone. Setting
    `stop_event` ends both.
    """
    settings = check_settings(**(settings or {}))
    stop_event = stop_event or threading.Event()
    model, context_len = engine.model, context_len or context_length(engine.model)
    stop_ids = stop_token_ids(tokenizer, model, template)
    jobs = []
    for history, adapter in zip(histories, ("__base__", model.active_adapter)):
        prompt = build_prompt(tokenizer, template, system, history, query, context_len, settings["max_new_tokens"])
        stream = Stream(tokenizer, stop_ids, template.stop_strings, stop_event)
        stream.prompt = prompt
        jobs.append(Job(prompt.ids, {**settings, "max_new_tokens": prompt.max_new_tokens}, stream,
                        adapter=adapter, seed=seed, cancelled=stop_event))
    run = Compare(engine, jobs, stop_event)
    try:
        with engine.lock:  # both rows in one prefill forward
            for job in jobs:
                engine.submit(job)
    except QueueFull as e:
        run.stop()
        raise UserError(f"too many answers are waiting ({e}); send the message again shortly.") from None
    return run
