"""--stage dpo: the preference data as the Trainer reads it, the reference log-probabilities, and the Trainer.

The reference costs no second copy of the base and no forward pass per step: its log-probabilities are computed
once, before training, for every training and validation pair (one forward pass over the data, without
gradients), and travel with each pair in the batch. They come from the model as it stands before the first
step: with a new adapter, with the adapter disabled (the base model); with --lora_model, the SFT adapter as it was
loaded, which is the reference the SFT-then-DPO recipe asks for. They are computed before trainer.train() loads a
checkpoint, so a resumed run has the same reference. ORPO and SimPO need none, and skip the pass.

KTO's KL term (utils/train/preference_loss.kto_loss) is estimated from mismatched sequences: each example's prompt with
the answer of the example before it in the data (the last one's for the first), fixed for the whole run as TRL's
KTOTrainer builds them, so that their reference log-probabilities can be computed once too.
"""
import contextlib

import numpy as np
import torch
from transformers import Trainer

from utils.data.encoding import IGNORE, Collator
from utils.data.preference import PairCollator, _with_index, prompt_length
from utils.train.preference_loss import REFERENCE_FREE, kto_loss, pair_loss, sequence_logps


class PreferenceData(torch.utils.data.Dataset):
    """The items the Trainer reads: pairs (a utils.data.preference.Pairs) or KTO examples (a TokenStore of a KTO
    encoder's examples), each with "reference" (its reference log-probs, once `reference` is set) and, for KTO,
    "kl" (its mismatched sequence). A subset of the data is a new PreferenceData (its own KL partners)."""

    def __init__(self, data, kto):
        self.data, self.kto, self.reference = data, kto, None

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        item = dict(self.data[i])
        if self.kto:
            before = self.data[(i - 1) % len(self.data)]
            n, m = prompt_length(item["labels"]), prompt_length(before["labels"])
            ids = np.asarray(item["input_ids"])[:n].tolist() + np.asarray(before["input_ids"])[m:].tolist()
            item["kl"] = {"input_ids": ids, "labels": [IGNORE] * n + ids[n:]}
        if self.reference is not None:
            item["reference"] = self.reference[i]
        return item

    def lengths(self):
        return self.data.lengths()


class PreferenceCollator:
    """Batches for PreferenceTrainer: PairCollator's sequences [chosen 1, rejected 1, ...] or, for KTO, the n
    examples then their n KL sequences (kto_label added); "reference_logps" in the same order of sequences when
    the items carry them."""

    def __init__(self, pad_token_id, packing=True, kto=False):
        self.pairs, self.collate, self.kto = PairCollator(pad_token_id, packing), Collator(pad_token_id, packing), kto

    def __call__(self, features):
        if self.kto:
            sequences = [{"input_ids": list(f["input_ids"]), "labels": list(f["labels"])} for f in features]
            batch = _with_index(self.collate, sequences + [f["kl"] for f in features])
            batch["kto_label"] = torch.tensor([bool(f["kto_label"]) for f in features])
        else:
            batch = self.pairs(features)
        if "reference" in features[0]:
            reference = torch.tensor(np.stack([f["reference"] for f in features]), dtype=torch.float32)
            batch["reference_logps"] = (reference.t() if self.kto else reference).flatten()
        return batch


def batch_logps(model, inputs, head=None):
    """(summed log-probs, token counts) per sequence of a PreferenceCollator batch, and the batch's other fields
    (reference_logps, kto_label), which never reach the model."""
    inputs = dict(inputs)
    extra = {k: inputs.pop(k, None) for k in ("sequence_index", "reference_logps", "kto_label")}
    labels = inputs.pop("labels")
    outputs = model(**inputs)
    sums, counts = sequence_logps(outputs["logits"], labels, extra.pop("sequence_index"), head)
    return sums, counts, extra


class PreferenceTrainer(Trainer):
    """transformers' Trainer with a preference loss (`pref`: loss, beta, gamma) on PreferenceData, logging the
    loss's metrics (rewards/margins, rewards/accuracies, logps/chosen, ...) with its loss, into log_history."""

    def __init__(self, *args, pref, head=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pref, self.head, self._metrics = pref, head, {"train": [], "eval": []}
        self.model_accepts_loss_kwargs = False  # the loss is a mean per batch: the Trainer divides it by accumulation

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sums, counts, extra = batch_logps(model, inputs, self.head)
        ref, loss_type, beta = extra["reference_logps"], self.pref["loss"], self.pref["beta"]
        if loss_type == "kto":
            n = len(extra["kto_label"])
            loss, metrics = kto_loss(sums[:n], ref[:n], extra["kto_label"], sums[n:], ref[n:], beta)
        else:
            ref = (None, None) if ref is None else (ref[0::2], ref[1::2])
            loss, metrics = pair_loss(loss_type, sums[0::2], sums[1::2], counts[0::2], counts[1::2], *ref, beta=beta,
                                      gamma=self.pref["gamma"], ftx=self.pref["ftx"] or 0.0)
        self._metrics["train" if model.training else "eval"].append(metrics)
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs, start_time=None):
        mode = "eval" if "eval_loss" in logs else "train"
        stored, self._metrics[mode] = self._metrics[mode], []
        means = {key: sum(values) / len(values) for key in dict.fromkeys(k for m in stored for k in m)
                 for values in [[m[key] for m in stored if key in m]]}
        if self.pref["loss"] == "kto" and {"rewards/chosen", "rewards/rejected"} <= set(means):
            # a KTO batch may hold answers of one kind only: the margin is that of the logged steps' means
            means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
        logs.update({("eval_" if mode == "eval" else "") + key: round(value, 4) for key, value in means.items()})
        super().log(logs, start_time)

    def compute_reference(self, adapter_off=True):
        """Set the reference log-probs of the training and validation data: the model as it is now (before
        training; `adapter_off`: with its adapter disabled), in evaluation mode and without gradients. Each
        rank computes them for the whole data (no collective before training starts)."""
        if self.pref["loss"] in REFERENCE_FREE:
            return
        import time

        from tqdm import tqdm

        started = time.perf_counter()

        model, size = self.model, self.args.per_device_train_batch_size
        was_training = model.training
        model.eval()
        off = model.disable_adapter() if adapter_off else contextlib.nullcontext()
        with torch.no_grad(), off, self.autocast_smart_context_manager():
            for data in (self.train_dataset, self.eval_dataset):
                if data is None:
                    continue
                data.reference, values = None, []
                for start in tqdm(range(0, len(data), size), desc="reference log-probs", delay=2):
                    batch = self._prepare_inputs(self.data_collator([data[i] for i in
                                                                      range(start, min(start + size, len(data)))]))
                    sums = batch_logps(model, batch, self.head)[0].float().cpu()
                    values.append(sums.view(2, -1).t() if data.kto else sums.view(-1, 2))
                data.reference = torch.cat(values).numpy()
        model.train(was_training)
        self.pref["reference_seconds"] = round(time.perf_counter() - started, 2)


def preference_trainer(settings, model, args, train, val, pad_token_id, packing, head, callbacks):
    """A PreferenceTrainer on `train` and `val` (Pairs, or a KTO TokenStore), its reference log-probs computed
    now. `settings`: (--pref_loss, --pref_beta, --simpo_gamma, --pref_ftx, the continued adapter's folder or None); the
    trainer's `pref` records them for run_config.json."""
    loss_type, beta, gamma, ftx, adapter = settings
    pref = {"loss": loss_type, "beta": beta, "gamma": gamma if loss_type == "simpo" else None, "ftx": ftx or None,
            "reference": ("none" if loss_type in REFERENCE_FREE else "the continued adapter as loaded" if adapter
                          else "the base model (adapter disabled)"), "lora_model": str(adapter) if adapter else None}
    kto = loss_type == "kto"
    train, val = PreferenceData(train, kto), val if val is None else PreferenceData(val, kto)
    trainer = PreferenceTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, pref=pref, head=head,
                                data_collator=PreferenceCollator(pad_token_id, packing, kto), callbacks=callbacks)
    trainer.compute_reference(adapter_off=not adapter)
    return trainer
