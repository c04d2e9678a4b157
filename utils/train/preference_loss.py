"""Preference losses (DPO, IPO, ORPO, SimPO, KTO) from per-sequence log-probabilities, and those log-probabilities
from a batch of utils/data/preference.py's collators.

The formulas are TRL's published ones (DPOTrainer's sigmoid and ipo losses, ORPOTrainer's odds ratio, CPOTrainer's
simpo, KTOTrainer's kto); tests/test_preference_loss.py checks each against a plain-Python implementation:
- dpo:   -log sigmoid(beta * ((c - rc) - (r - rr))), with c, r the summed log-probs of the chosen and rejected
         answers under the policy and rc, rr under the reference; rewards beta * (c - rc), beta * (r - rr).
- ipo:   ((c - rc) / |c| - (r - rr) / |r| - 1 / (2 beta))^2, the log-ratios averaged per answer token (TRL's
         reading of the IPO paper, confirmed by its authors); rewards as dpo's.
- orpo:  NLL of the chosen answers (per token) - beta * log sigmoid(log odds(c) - log odds(r)), with c, r
         averaged per token and log odds(p) = p - log(1 - exp(p)); no reference; rewards beta * c, beta * r.
         Our NLL covers the answer only: the prompt stays masked, as in SFT.
- simpo: -log sigmoid(beta * (c - r) - gamma), c, r averaged per token; no reference; rewards beta * c, beta * r.
- ftx:   dpo, ipo and simpo may add ftx * (NLL of each chosen answer, per token), LLaMA-Factory's pref_ftx (TRL's
         rpo_alpha): it keeps the chosen answers' own likelihood from falling while the margin grows.
- kto:   desirable answers 1 - sigmoid(beta * ((y - ry) - z)), undesirable ones 1 - sigmoid(beta * (z - (y - ry))),
         the mean over all; z, the KL estimate, is the batch mean of (policy - reference) log-probs of mismatched
         prompt/answer pairs, clamped at 0 and without gradient; rewards beta * (y - ry).
The metrics are TRL's names: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies (paired losses),
logps/chosen, logps/rejected (summed log-probs; per-token means for orpo and simpo, as their trainers log), and
kl for kto.
"""
import torch
import torch.nn.functional as F

from utils.data.encoding import IGNORE
from utils.data.preference import PREF_LOSSES
from utils.train.fast.loss import _LinearCrossEntropy

__all__ = ["PREF_LOSSES", "REFERENCE_FREE", "kto_loss", "pair_loss", "sequence_logps"]
REFERENCE_FREE = ("orpo", "simpo")  # no reference pass at all


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -log 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def pair_loss(loss_type, chosen, rejected, chosen_tokens, rejected_tokens, ref_chosen=None, ref_rejected=None,
              beta=0.1, gamma=0.5, ftx=0.0):
    """(loss, metrics) of a batch of pairs: `chosen`/`rejected` the policy's summed log-probs of each answer (n,),
    `*_tokens` their token counts, `ref_*` the reference's (dpo, ipo). `ftx` (dpo, ipo, simpo): the weight of an
    added NLL of each chosen answer per token (LLaMA-Factory's pref_ftx). Metrics are floats."""
    chosen, rejected = chosen.float(), rejected.float()
    chosen_tokens, rejected_tokens = chosen_tokens.float().clamp(min=1), rejected_tokens.float().clamp(min=1)
    if loss_type in ("dpo", "ipo"):
        chosen_ratio, rejected_ratio = chosen - ref_chosen.float(), rejected - ref_rejected.float()
        if loss_type == "dpo":
            losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
        else:
            losses = (chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens - 1 / (2 * beta)) ** 2
        chosen_reward, rejected_reward = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
        logged = chosen, rejected
    elif loss_type in ("orpo", "simpo"):
        chosen_mean, rejected_mean = chosen / chosen_tokens, rejected / rejected_tokens
        if loss_type == "orpo":
            log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
            nll = -chosen.sum() / chosen_tokens.sum()
            losses = nll - beta * F.logsigmoid(log_odds)
        else:
            losses = -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma)
        chosen_reward, rejected_reward = beta * chosen_mean.detach(), beta * rejected_mean.detach()
        logged = chosen_mean, rejected_mean
    else:
        raise ValueError(f"unknown pair loss {loss_type!r}; one of dpo, ipo, orpo, simpo")
    if ftx:
        if loss_type == "orpo":
            raise ValueError("orpo has its own NLL term; ftx is for dpo, ipo and simpo")
        losses = losses + ftx * -(chosen / chosen_tokens)
    metrics = {"rewards/chosen": chosen_reward.mean().item(), "rewards/rejected": rejected_reward.mean().item(),
               "rewards/margins": (chosen_reward - rejected_reward).mean().item(),
               "rewards/accuracies": (chosen_reward > rejected_reward).float().mean().item(),
               "logps/chosen": logged[0].detach().mean().item(), "logps/rejected": logged[1].detach().mean().item()}
    return losses.mean(), metrics


def kto_loss(logps, ref_logps, desirable, kl_logps, ref_kl_logps, beta=0.1):
    """(loss, metrics) of KTO: `logps`/`ref_logps` the summed log-probs of each answer (n,), `desirable` a bool per
    answer, `kl_*` those of the mismatched prompt/answer sequences that estimate the KL term."""
    kl = (kl_logps.float() - ref_kl_logps.float()).mean().detach().clamp(min=0)
    ratio = logps.float() - ref_logps.float()
    losses = torch.where(desirable, 1 - torch.sigmoid(beta * (ratio - kl)), 1 - torch.sigmoid(beta * (kl - ratio)))
    rewards = beta * ratio.detach()
    metrics = {"kl": kl.item()}
    for name, picked in (("chosen", desirable), ("rejected", ~desirable)):
        if picked.any():
            metrics[f"rewards/{name}"] = rewards[picked].mean().item()
            metrics[f"logps/{name}"] = logps[picked].detach().float().mean().item()
    if desirable.any() and (~desirable).any():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses.mean(), metrics


def sequence_logps(logits, labels, sequence_index=None, head=None):
    """(summed log-probs, token counts) of every sequence of a batch, each over its labelled tokens.

    `labels` (rows, tokens) with IGNORE where nothing is predicted; `logits` the model's output: every position
    (rows, tokens, vocab), or only those whose next token is labelled, in order (utils.data.encoding.Collator's
    logits_to_keep). With `head` (utils.train.fast.project_in_loss) they are final hidden states, projected here
    without a (tokens x vocabulary) tensor. `sequence_index` (1, tokens): the sequence of each token of a packed
    row (utils.data.preference.PairCollator); without it each row is one sequence.
    """
    targets_at = labels[:, 1:] != IGNORE
    if logits.shape[1] == labels.shape[1]:
        rows = logits[:, :-1][targets_at.to(logits.device)]
    else:
        rows = logits.flatten(0, 1)
    targets = labels[:, 1:][targets_at].to(rows.device)
    if sequence_index is None:
        sequence_index = torch.arange(labels.shape[0])[:, None].expand(labels.shape)
    sequence = sequence_index[:, 1:][targets_at].to(rows.device)
    count = int(sequence_index[:, -1].max()) + 1 if sequence_index.numel() else 0
    if head is not None:
        token_logps = _LinearCrossEntropy.apply(rows, head.weight, targets, None, True)
    else:
        token_logps = torch.log_softmax(rows.float(), -1).gather(1, targets[:, None])[:, 0]
    sums = torch.zeros(count, dtype=token_logps.dtype, device=rows.device).index_add(0, sequence, token_logps)
    return sums, torch.bincount(sequence, minlength=count)

