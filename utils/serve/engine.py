"""Batched decoding for the API server: every running answer advances by one token in one forward per step.

New answers (`Job`s) are prefilled together, left-padded, a few hundred prompt tokens per forward, and each sends
its first token at once; one prompt alone is prefilled exactly as utils.serve.generation.decode does it. Their KV caches
then join the batch's cache as more rows, left-padded to the longest row. Each step feeds every row's newest
token with its own position id and an attention mask that hides the padding, and requests that arrived join
between two steps. A row that ends (stop token, stop string, length, or a client that went away) leaves before
the next step, and the padding no longer needed goes with it. Per row, the logits pass through the same
processors and the same seeded sampling as decode, so an answer equals the one cli_demo.py gives for the same
settings (tests/test_api_server.py checks it in fp32, for 16 answers decoded together). Over a PeftModel every
row names its adapter (peft's `adapter_names`, "__base__" for none), so requests for different adapters share one
forward over one copy of the base.

Why a loop of our own: transformers' continuous batching (generate_batch, ContinuousBatchingManager; 5.23) runs
on a CPU, but it packs all sequences into one row, so peft cannot give each its own adapter; it drops the
repetition penalty our chat stages use by default (and no_repeat_ngram), so answers would differ from
cli_demo.py's; and it has no per-request seeded sampling. One left-padded DynamicCache, grown in place by the
model, costs one copy of the cache per step, as decode's does; restacking a cache per sequence at every step
would copy it once more. Models whose cache is not plain DynamicLayers (sliding windows, remote code) decode one
answer at a time through the same loop.
"""
import collections
import dataclasses
import threading

import torch
import torch.nn.functional as F

from utils.serve.generation import Stream, keep_last_logits, logits_processors


class QueueFull(Exception):
    """More requests wait than the server takes (--max_queue)."""


@dataclasses.dataclass(eq=False)
class Job:
    """One answer. `on_piece` is called from the decoding thread with each new text piece, then with None at the end;
    afterwards .stream.text/.stream.reason, .completion_tokens and .error tell how it went."""
    prompt_ids: list
    settings: dict  # utils.serve.generation.check_settings' dict; max_new_tokens is the answer's limit
    stream: Stream
    adapter: str = None  # the peft adapter's name; None: the base model
    seed: int = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    on_piece: object = None
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    completion_tokens: int = 0
    error: str = None
    ids: torch.Tensor = None  # prompt and answer so far, as decode's `ids`
    cached: int = 0  # tokens of this row in the KV cache
    last: int = None  # the newest token, fed at the next step
    done: bool = False
    generator: torch.Generator = None
    processors: object = None


class Engine:
    """A decoding thread over one model. submit() queues a Job (QueueFull past max_queue waiting ones); cancel()
    ends one before the next step; at most max_batch answers run together."""

    def __init__(self, model, max_batch=16, max_queue=64, prefill_tokens=256):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        self.model, self.max_queue, self.prefill_tokens = model, max_queue, prefill_tokens
        self.peft = hasattr(model, "peft_config")
        self.device = model.get_input_embeddings().weight.device
        base = model.get_base_model() if self.peft else model
        self.keep_one = keep_last_logits(model)
        # Rows are aligned by left-padding: a sliding-window layer keeps only its window, and a model's own code may
        # keep another cache; such models run one answer at a time.
        plain = all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)
        self.max_batch = max_batch if plain and type(base).__module__.startswith("transformers.") else 1
        self.waiting, self.admitting, self.rows, self.cache, self.width = collections.deque(), [], [], None, 0
        self.lock, self.closed = threading.Condition(), False
        self.stats = {"steps": 0, "tokens": 0, "most_rows": 0, "mixed_steps": 0}
        self.thread = threading.Thread(target=self._run, name="decoding", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def close(self):
        with self.lock:
            self.closed = True
            self.lock.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout=30)

    def submit(self, job):
        with self.lock:
            if self.closed:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(job)
            self.lock.notify_all()

    def cancel(self, job):
        """End a job before the next step (a no-op once it has ended); safe from any thread."""
        if job.done:
            return
        job.cancelled.set()
        with self.lock:
            if job in self.waiting:
                self.waiting.remove(job)
                self._end(job, "stopped")
            self.lock.notify_all()

    def load(self):
        """(answers running, answers waiting)."""
        return len(self.rows) + len(self.admitting), len(self.waiting)

    def _run(self):
        while True:
            with self.lock:
                while not self.closed and not self.waiting and not self.rows:
                    self.lock.wait()
                if self.closed:
                    break
                new = [self.waiting.popleft() for _ in range(min(len(self.waiting), self.max_batch - len(self.rows)))]
                self.admitting = new
            try:
                for group in self._groups(new):
                    self._prefill(group)
                self.admitting = []
                self._leave()
                if self.rows:
                    self._step()
                    self._leave()
            except Exception as e:  # a failed forward (out of memory): end every answer with the reason
                for job in [*new, *self.rows]:
                    job.error = job.error or f"{type(e).__name__}: {e}"
                    self._end(job, "stopped")
                self.admitting, self.rows, self.cache, self.width = [], [], None, 0
        for job in [*self.rows, *self.waiting]:
            self._end(job, "stopped")

    def _groups(self, jobs):
        """The new jobs in arrival order, in prefill forwards of at most prefill_tokens (padded) tokens each: one
        forward over several prompts reads the weights once, and the first answers start before the last prompts
        are read (16 prompts in one forward made every client wait for all of them)."""
        group, width = [], 0
        for job in jobs:
            if group and (len(group) + 1) * max(width, len(job.prompt_ids)) > self.prefill_tokens:
                yield group
                group, width = [], 0
            group.append(job)
            width = max(width, len(job.prompt_ids))
        if group:
            yield group

    def _adapters(self, jobs):
        return {"adapter_names": [job.adapter or "__base__" for job in jobs]} if self.peft else {}

    def _prefill(self, jobs):
        """One forward over the new jobs' prompts, left-padded to the longest; each takes its first token and its
        cache rows join the batch."""
        for job in jobs:
            if job.cancelled.is_set():
                self._end(job, "stopped")
        jobs = [job for job in jobs if not job.done]
        if not jobs:
            return
        width = max(len(job.prompt_ids) for job in jobs)
        lengths = torch.tensor([len(job.prompt_ids) for job in jobs], device=self.device)
        ids = torch.tensor([[0] * (width - len(job.prompt_ids)) + list(job.prompt_ids) for job in jobs],
                           device=self.device)
        mask = position_ids = None  # without padding (one prompt alone): decode's forward, bit for bit
        if bool((lengths < width).any()):
            mask = (torch.arange(width, device=self.device)[None, :] >= (width - lengths)[:, None]).long()
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                             **self.keep_one, **self._adapters(jobs))
        for i, job in enumerate(jobs):
            job.ids, job.cached = ids[i:i + 1, width - len(job.prompt_ids):], len(job.prompt_ids)
            job.processors = logits_processors(job.settings)
        going = [i for i, job in enumerate(jobs) if self._take(job, out.logits[i:i + 1, -1, :])]
        if going:
            self._join([jobs[i] for i in going], out.past_key_values, going if len(going) < len(jobs) else None, width)

    def _join(self, jobs, cache, index, width):
        """Add the prefilled `cache` (`width` wide; only its rows `index` when given) to the batch, left-padding the
        shorter side."""
        if index is not None:
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
        if not self.rows:
            self.rows, self.cache, self.width = list(jobs), cache, width
            return
        total = max(self.width, width)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            for name in ("keys", "values"):
                ours, new = getattr(mine, name), getattr(theirs, name)
                setattr(mine, name, torch.cat([F.pad(ours, (0, 0, total - self.width, 0)),
                                               F.pad(new, (0, 0, total - width, 0))]))
        self.rows += jobs
        self.width = total

    def _step(self):
        rows, width = self.rows, self.width
        cached = torch.tensor([job.cached for job in rows], device=self.device)
        mask = position_ids = None  # without padding, no mask and no position ids: decode's forward, bit for bit
        if bool((cached < width).any()):
            mask = (torch.arange(width + 1, device=self.device)[None, :] >= (width - cached)[:, None]).long()
            position_ids = cached[:, None]
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([[job.last] for job in rows], device=self.device),
                             attention_mask=mask, position_ids=position_ids,
                             past_key_values=self.cache, use_cache=True, **self._adapters(rows))
        self.width += 1
        self.stats["steps"] += 1
        self.stats["most_rows"] = max(self.stats["most_rows"], len(rows))
        self.stats["mixed_steps"] += len({job.adapter for job in rows}) > 1
        logits = out.logits[:, -1, :]
        for i, job in enumerate(rows):
            job.cached += 1
            if not job.done:
                self._take(job, logits[i:i + 1])

    def _take(self, job, logits):
        """Pick the next token as decode does, hand its text to the job; False once the job has ended."""
        scores = logits.to(dtype=torch.float32, device=job.ids.device)
        if job.presence_penalty or job.frequency_penalty:  # OpenAI's penalties, on the answer's tokens only
            counts = torch.bincount(job.ids[0, len(job.prompt_ids):], minlength=scores.shape[-1])[:scores.shape[-1]]
            scores = scores - job.frequency_penalty * counts - job.presence_penalty * (counts > 0)
        scores = job.processors(job.ids, scores)
        if job.settings["do_sample"]:
            if job.generator is None and job.seed is not None:
                job.generator = torch.Generator(scores.device).manual_seed(int(job.seed))
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=job.generator)
        else:
            token = scores.argmax(dim=-1, keepdim=True)
        job.ids, job.last = torch.cat([job.ids, token], dim=1), token.item()
        job.completion_tokens += 1
        self.stats["tokens"] += 1
        self._send(job, job.stream.add(job.last))
        if job.stream.finished:
            return self._end(job, job.stream.reason)
        if job.cancelled.is_set():
            return self._end(job, "stopped")
        if job.completion_tokens >= job.settings["max_new_tokens"]:
            return self._end(job, "length")
        return True

    def _send(self, job, piece):
        if job.on_piece is not None and piece:
            try:
                job.on_piece(piece)
            except RuntimeError:  # the server's event loop has closed
                job.cancelled.set()

    def _end(self, job, reason):
        if job.done:
            return False
        job.done = True
        self._send(job, job.stream.finish(reason))
        if job.on_piece is not None:
            try:
                job.on_piece(None)
            except RuntimeError:
                pass
        return False

    def _leave(self):
        """Drop the rows that ended or were cancelled, and the padding columns no remaining row needs."""
        for job in self.rows:
            if job.cancelled.is_set():
                self._end(job, "stopped")
        keep = [i for i, job in enumerate(self.rows) if not job.done]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.width = None, 0
            return
        width = max(job.cached for job in self.rows)
        index = torch.tensor(keep, device=self.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, self.width - width:]
            layer.values = layer.values[index, :, self.width - width:]
        self.width = width

