"""Preference losses against a plain-Python reading of TRL's published formulas, and per-sequence log-probs of a
packed pair row against each sequence run alone."""
import math

import pytest
import torch

from utils.data.encoding import IGNORE
from utils.data.preference import PairCollator, UnpairedCollator
from utils.train.preference_loss import kto_loss, pair_loss, sequence_logps

# a fixed batch of 3 pairs: summed log-probs, token counts, reference log-probs
CHOSEN, REJECTED = [-12.5, -30.0, -4.25], [-15.0, -22.0, -9.5]
CHOSEN_N, REJECTED_N = [5, 12, 3], [6, 9, 4]
REF_CHOSEN, REF_REJECTED = [-13.0, -28.5, -5.0], [-14.0, -23.0, -8.0]
BETA, GAMMA = 0.3, 0.7


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def mean(values):
    return sum(values) / len(values)


def expected_pairs(loss_type):
    """(loss, chosen rewards, rejected rewards), one pair at a time in floats."""
    losses, chosen_rewards, rejected_rewards = [], [], []
    nll = -sum(CHOSEN) / sum(CHOSEN_N)
    for c, r, nc, nr, rc, rr in zip(CHOSEN, REJECTED, CHOSEN_N, REJECTED_N, REF_CHOSEN, REF_REJECTED):
        if loss_type == "dpo":
            losses.append(-log_sigmoid(BETA * ((c - rc) - (r - rr))))
            chosen_rewards.append(BETA * (c - rc))
            rejected_rewards.append(BETA * (r - rr))
        elif loss_type == "ipo":
            losses.append(((c - rc) / nc - (r - rr) / nr - 1 / (2 * BETA)) ** 2)
            chosen_rewards.append(BETA * (c - rc))
            rejected_rewards.append(BETA * (r - rr))
        elif loss_type == "orpo":
            pc, pr = c / nc, r / nr
            odds = (pc - math.log(1 - math.exp(pc))) - (pr - math.log(1 - math.exp(pr)))
            losses.append(nll - BETA * log_sigmoid(odds))
            chosen_rewards.append(BETA * pc)
            rejected_rewards.append(BETA * pr)
        else:  # simpo
            losses.append(-log_sigmoid(BETA * (c / nc) - BETA * (r / nr) - GAMMA))
            chosen_rewards.append(BETA * c / nc)
            rejected_rewards.append(BETA * r / nr)
    return mean(losses), chosen_rewards, rejected_rewards


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "orpo", "simpo"])
def test_pair_losses_equal_the_published_formulas(loss_type):
    t = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    loss, metrics = pair_loss(loss_type, t(CHOSEN), t(REJECTED), t(CHOSEN_N), t(REJECTED_N), t(REF_CHOSEN),
                              t(REF_REJECTED), beta=BETA, gamma=GAMMA)
    expected, chosen_rewards, rejected_rewards = expected_pairs(loss_type)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(mean(chosen_rewards), rel=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx(mean(rejected_rewards), rel=1e-6)
    margins = [c - r for c, r in zip(chosen_rewards, rejected_rewards)]
    assert metrics["rewards/margins"] == pytest.approx(mean(margins), rel=1e-6)
    assert metrics["rewards/accuracies"] == pytest.approx(mean([m > 0 for m in margins]))
    per_token = loss_type in ("orpo", "simpo")
    logged = [c / n for c, n in zip(CHOSEN, CHOSEN_N)] if per_token else CHOSEN
    assert metrics["logps/chosen"] == pytest.approx(mean(logged), rel=1e-6)


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "simpo"])
def test_pref_ftx_adds_the_chosen_answers_nll_per_token(loss_type):
    """LLaMA-Factory's pref_ftx (TRL's rpo_alpha): each pair's loss gains ftx times its chosen answer's NLL per
    token; the rewards are unchanged. ORPO, which has an NLL of its own, refuses it."""
    t = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    batch = t(CHOSEN), t(REJECTED), t(CHOSEN_N), t(REJECTED_N), t(REF_CHOSEN), t(REF_REJECTED)
    loss, metrics = pair_loss(loss_type, *batch, beta=BETA, gamma=GAMMA, ftx=0.5)
    expected, chosen_rewards, _ = expected_pairs(loss_type)
    assert loss.item() == pytest.approx(expected + 0.5 * mean([-c / n for c, n in zip(CHOSEN, CHOSEN_N)]), rel=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(mean(chosen_rewards), rel=1e-6)
    with pytest.raises(ValueError, match="orpo has its own NLL"):
        pair_loss("orpo", *batch, beta=BETA, ftx=0.5)


def test_pair_loss_gradient_only_flows_to_the_policy():
    chosen = torch.tensor(CHOSEN, requires_grad=True)
    ref = torch.tensor(REF_CHOSEN, requires_grad=True)
    loss, _ = pair_loss("dpo", chosen, torch.tensor(REJECTED), torch.tensor(CHOSEN_N), torch.tensor(REJECTED_N),
                        ref, torch.tensor(REF_REJECTED), beta=BETA)
    loss.backward()
    # d/dc -log sigmoid(beta * x) / n = -beta * (1 - sigmoid(beta * x)) / n
    for g, c, r, rc, rr in zip(chosen.grad, CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED):
        x = BETA * ((c - rc) - (r - rr))
        assert g.item() == pytest.approx(-BETA * (1 - 1 / (1 + math.exp(-x))) / 3, rel=1e-5)


@pytest.mark.parametrize("kl_policy", [[-10.0, -20.0, -7.0, -3.0], [-12.0, -19.0, -9.0, -4.0]])
def test_kto_loss_equals_the_published_formula(kl_policy):
    logps, ref = [-12.5, -30.0, -4.25, -8.0], [-13.0, -28.5, -5.0, -7.5]
    desirable = [True, False, True, False]
    ref_kl = [-11.0, -19.5, -8.0, -3.5]
    loss, metrics = kto_loss(torch.tensor(logps), torch.tensor(ref), torch.tensor(desirable), torch.tensor(kl_policy),
                             torch.tensor(ref_kl), beta=BETA)
    kl = max(0.0, mean([p - r for p, r in zip(kl_policy, ref_kl)]))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    losses = [1 - sig(BETA * ((y - ry) - kl)) if good else 1 - sig(BETA * (kl - (y - ry)))
              for y, ry, good in zip(logps, ref, desirable)]
    assert loss.item() == pytest.approx(mean(losses), rel=1e-5)
    assert metrics["kl"] == pytest.approx(kl, abs=1e-6)
    chosen = mean([BETA * (y - ry) for y, ry, good in zip(logps, ref, desirable) if good])
    rejected = mean([BETA * (y - ry) for y, ry, good in zip(logps, ref, desirable) if not good])
    assert metrics["rewards/chosen"] == pytest.approx(chosen, rel=1e-5)
    assert metrics["rewards/rejected"] == pytest.approx(rejected, rel=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(chosen - rejected, rel=1e-5)


@pytest.fixture(scope="module")
def tiny_model():
    """A tiny fp32 LLaMA with our packed attention (each packed sequence attends to itself only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from utils.train.fast import PACKED_ATTENTION, register_packed_attention

    register_packed_attention()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config._attn_implementation = PACKED_ATTENTION
    return LlamaForCausalLM(config).eval()


PAIRS = [{"prompt_ids": [1, 5, 6, 7], "chosen_ids": [10, 11, 2], "rejected_ids": [12, 2]},
         {"prompt_ids": [1, 8, 9], "chosen_ids": [13, 14, 15, 16, 2], "rejected_ids": [17, 18, 19, 2]}]


def alone(model, ids, answer_start):
    """Summed log-prob of ids[answer_start:] given what precedes it, the sequence run alone."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    log_probs = torch.log_softmax(logits, -1)
    return sum(log_probs[t - 1, ids[t]].item() for t in range(answer_start, len(ids)))


@pytest.mark.parametrize("packing", [True, False])
def test_packed_pair_logps_equal_each_sequence_alone(tiny_model, packing):
    batch = PairCollator(0, packing)(PAIRS)
    index, labels = batch.pop("sequence_index", None), batch.pop("labels")
    with torch.no_grad():
        logits = tiny_model(**batch).logits
    sums, counts = sequence_logps(logits, labels, index)
    expected = [alone(tiny_model, p["prompt_ids"] + p[k], len(p["prompt_ids"]))
                for p in PAIRS for k in ("chosen_ids", "rejected_ids")]
    assert sums.tolist() == pytest.approx(expected, abs=1e-4)
    assert counts.tolist() == [len(p[k]) for p in PAIRS for k in ("chosen_ids", "rejected_ids")]
    if packing:  # only the supervised positions were projected
        assert logits.shape[1] == sum(counts.tolist())


def test_logps_without_logits_equal_the_logits_path_and_their_gradient(tiny_model):
    """With the head projected in the loss (utils.train.fast.project_in_loss), values and gradients are the same."""
    batch = PairCollator(0, True)(PAIRS)
    index, labels = batch.pop("sequence_index"), batch.pop("labels")
    hidden = tiny_model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
    keep = hidden[:, batch["logits_to_keep"]].detach()
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    results = []
    for head in (None, tiny_model.lm_head):
        rows = keep.clone().requires_grad_()
        sums, _ = sequence_logps(tiny_model.lm_head(rows) if head is None else rows, labels, index, head)
        (sums * weights).sum().backward()
        results.append((sums.detach(), rows.grad))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-4)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)


def test_kto_batch_logps_with_its_kl_rows(tiny_model):
    examples = [{"input_ids": [1, 5, 6, 10, 2], "labels": [IGNORE] * 3 + [10, 2], "kto_label": True},
                {"input_ids": [1, 8, 12, 13, 2], "labels": [IGNORE] * 2 + [12, 13, 2], "kto_label": False}]
    batch = UnpairedCollator(0, True, kl=True)(examples)
    index, labels = batch.pop("sequence_index"), batch.pop("labels")
    batch.pop("kto_label")
    with torch.no_grad():
        sums, counts = sequence_logps(tiny_model(**batch).logits, labels, index)
    assert counts.tolist() == [2, 3, 3, 2]  # the two answers, then each prompt with the other's answer
    assert sums[2].item() == pytest.approx(alone(tiny_model, [1, 5, 6, 12, 13, 2], 3), abs=1e-4)
