"""GRPO by hand: group sampling, group-normalised advantages, the clipped surrogate and k3 KL.

METHOD.md section 5. Rows of every tensor are laid out group after group: completions 0..G-1
of prompt 0, then those of prompt 1, and so on.
"""
from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """G sampled completions for each of B prompts (N = B*G rows, group after group)."""
    batch: dict                   # processor batch of the B prompts, one row per prompt
    completion_ids: torch.Tensor  # (N, T)
    mask: torch.Tensor            # (N, T) 1 up to and including the first end-of-turn token
    texts: list                   # decoded completions
    logps: torch.Tensor = None    # (N, T) log pi of each sampled token, as drawn (0 after the end)
    entropy: torch.Tensor = None  # (N, T) entropy of pi where each token was drawn (0 after the end)


def completion_mask(completion_ids, eos_ids):
    """1 on tokens up to and including the first end-of-turn token, 0 after (METHOD.md 5.4)."""
    is_eos = torch.isin(completion_ids, torch.as_tensor(eos_ids, device=completion_ids.device))
    eos_before = is_eos.long().cumsum(1) - is_eos.long()  # end-of-turn tokens strictly before t
    return (eos_before == 0).float()


@torch.no_grad()
def sample_groups(policy, images, prompts, group_size, temperature=0.9, max_new_tokens=64, greedy=False,
                  finished=torch.all):
    """Step 1 of METHOD.md section 5, by hand: G completions per prompt.

    Each prompt (image and text) is prefilled once and its KV cache copied G times; the B*G rows
    then decode together. Each token is drawn from pi = softmax(logits / T) without the vision
    tokens (`policy.policy_logprobs`, the distribution the loss scores): no top-k, top-p,
    repetition penalty or any other setting of the checkpoint's generation_config. A row stops at
    its first stop token and is padded after it; decoding ends when every row has stopped.
    `finished(done)` says whether decoding is over, given the rows' stop flags (N,). Under torchrun
    it asks every rank (dist.all_done): a sharded model's forwards need every rank, data parallel
    ranks wait for the slowest anyway, and so both draw the same numbers."""
    batch = policy.encode(images, prompts)
    was_training = policy.model.training
    policy.model.eval()  # no dropout while sampling (Qwen has none, but a fork might)
    state, logits = policy.prefill(batch, group_size, max_new_tokens)
    stops = torch.as_tensor(policy.eos_ids, device=logits.device)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    tokens, logps, entropies = [], [], []
    for _ in range(max_new_tokens):
        logp = policy.policy_logprobs(logits, temperature)
        probs = logp.exp()
        token = logp.argmax(-1) if greedy else draw(probs)
        token = token.masked_fill(done, policy.pad_id)
        tokens.append(token)
        logps.append(logp.gather(-1, token[:, None])[:, 0].masked_fill(done, 0.0))
        entropies.append(entropy(probs, logp).masked_fill(done, 0.0))
        done |= torch.isin(token, stops)
        if len(tokens) == max_new_tokens or finished(done):
            break
        logits = policy.decode_step(state, token)
    policy.model.train(was_training)
    ids = torch.stack(tokens, 1)
    return Rollout(batch, ids, completion_mask(ids, policy.eos_ids), policy.decode(ids), torch.stack(logps, 1),
                   torch.stack(entropies, 1))


def entropy(probs, logp):
    """H(pi) = -sum_v pi_v log pi_v of each row, from the distribution the sampler draws from: the
    logits it already holds, one decoding step at a time (never a vocabulary-sized tensor kept per
    token). Suppressed tokens (pi_v = 0, log pi_v = -inf) give 0 * -inf = NaN, which nansum leaves
    out: 4.3 ms per step for 32 rows of 151,936 tokens on one thread, against 23 ms masking them."""
    return -torch.nansum(probs * logp, -1)


def draw(probs):
    """One index per row, with probability `probs`, by inverting the cumulative distribution.

    torch.multinomial draws an exponential variate for every vocabulary entry: 73 ms per decoding
    step for 32 rows of a 151,936-token vocabulary on one CPU thread. The float64 cumulative sum
    keeps the tail's mass; right=True never picks a zero-probability entry (e.g. a vision token)."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=probs.shape[-1] - 1)


def group_advantages(rewards, group_size, scale="group", eps=1e-4):
    """A_i = (r_i - group mean) / (group std + eps), unbiased std; scale="none": Dr. GRPO (5.2)."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
                         f"got shape {tuple(rewards.shape)}")
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    if scale == "group":
        centred = centred / (groups.std(1, keepdim=True) + eps)
    elif scale != "none":
        raise ValueError(f"unknown advantage scale {scale!r}: expected 'group' or 'none'")
    return centred.reshape(-1)


def mean_group_std(rewards, group_size):
    """The mean over groups of the rewards' std within a group (unbiased, as group_advantages divides
    by): how far apart a group's rewards lie before "group" scaling makes every spread a unit one."""
    return rewards.view(-1, group_size).std(1).mean().item()


def frac_equal_groups(rewards, group_size):
    """Fraction of groups whose G rewards are all equal, i.e. give no gradient (METHOD.md 5.2)."""
    groups = rewards.view(-1, group_size)
    return (groups.max(1).values == groups.min(1).values).float().mean().item()


def token_loss(logp, old_logp, ref_logp, advantages, *, eps=0.2, eps_high=None, beta=0.04, loss_type="grpo",
               seq_ratio=None):
    """l_t, the loss of each token (METHOD.md 5.3): clipped surrogate + beta * k3 KL. All arguments
    have logp's shape (advantages broadcast); old_logp None means pi_old = pi (the first update).
    loss_type "cispo" (METHOD.md 5.7): the clipped ratio as a constant weight on log pi instead.
    seq_ratio (GSPO, METHOD.md 5.9): each token's sequence ratio s_i, a constant: the token's ratio
    is then s_i in value with the gradient s_i d log pi_t, that of s_i through its mean over tokens."""
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp from a reference model")
    eps_high = eps if eps_high is None else eps_high
    # the gradient flows through logp alone: old policy, reference and advantages are constants
    old_logp = (logp if old_logp is None else old_logp).detach()
    ratio = torch.exp(logp - old_logp)  # 1 in value when mu = 1, but carries the gradient
    if seq_ratio is not None:
        ratio = seq_ratio.detach() * torch.exp(logp - logp.detach())
    A = advantages.detach()
    if loss_type == "cispo":  # every token keeps its gradient, scaled by its clipped ratio
        per_token = -torch.clamp(ratio, 1 - eps, 1 + eps_high).detach() * A * logp
    else:
        per_token = -torch.min(ratio * A, torch.clamp(ratio, 1 - eps, 1 + eps_high) * A)
    if beta > 0:
        per_token = per_token + beta * k3(logp, ref_logp.detach())
    return per_token


def k3(logp, ref_logp):
    """The k3 estimate of KL(pi || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1 >= 0."""
    return torch.exp(ref_logp - logp) - (ref_logp - logp) - 1


def token_weights(mask, loss_type, max_new_tokens=None):
    """w_t with loss = sum_t w_t l_t (METHOD.md 5.4), 0 where mask is 0. grpo: the mean of sequence
    means, 1 / (N |o_i|); bnpo and cispo: the token mean, 1 / sum(mask); dr_grpo: 1 / (N T_max). Computed on
    the whole step's mask, they make micro-batches' and ranks' losses add up to the step's."""
    if loss_type == "grpo":
        return mask / (mask.sum(1, keepdim=True).clamp(min=1) * mask.shape[0])
    if loss_type in ("bnpo", "cispo"):
        return mask / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        if not max_new_tokens:
            raise ValueError("loss_type 'dr_grpo' needs max_new_tokens")
        return mask / (mask.shape[0] * max_new_tokens)
    raise ValueError(f"unknown loss_type {loss_type!r}: expected 'grpo', 'bnpo', 'dr_grpo' or 'cispo'")


def sequence_ratio(logp, old_logp, mask):
    """GSPO's s_i = exp(mean over completion i's tokens of log pi - log pi_old) (METHOD.md 5.9), (N,)."""
    return torch.exp(((logp - old_logp) * mask).sum(1) / mask.sum(1).clamp(min=1))


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, eps=0.2, eps_high=None, beta=0.04,
              loss_type="grpo", max_new_tokens=None, ratio="token"):
    """The GRPO loss of whole (N, T) log-probs, as METHOD.md 5.3-5.4 write it, and its statistics.
    The training step computes the same sum chunk by chunk inside the output layer (`objective`).
    ratio "sequence" (GSPO, 5.9): every token of completion i carries -min(s_i A_i, clip(s_i) A_i),
    the gradient flowing through s_i to all of its tokens."""
    per_token = token_loss(logp, old_logp, ref_logp, advantages[:, None], eps=eps, eps_high=eps_high, beta=beta,
                           loss_type=loss_type)
    seq = None
    if ratio == "sequence":  # the surrogate of s_i in place of the tokens' ratios; the KL as it is
        seq = sequence_ratio(logp, logp.detach() if old_logp is None else old_logp, mask)[:, None]
        A, high = advantages[:, None], 1 + (eps if eps_high is None else eps_high)
        per_token = -torch.min(seq * A, torch.clamp(seq, 1 - eps, high) * A).expand_as(logp)
        per_token = per_token + (beta * k3(logp, ref_logp.detach()) if beta > 0 else 0.0)
    loss = (per_token * token_weights(mask, loss_type, max_new_tokens)).sum()
    return loss, loss_stats(logp.detach(), old_logp, ref_logp, advantages, mask, eps, eps_high,
                            None if seq is None else seq.detach())


def objective(old_logp, ref_logp, advantages, weights, mask, seq_ratio=None, **loss_args):
    """The loss as a function of the scored tokens' log-probs, for the output layer to take its
    gradient chunk by chunk (VLM.completion_loss): f(logp, start, stop) = w_t l_t of the tokens
    start:stop among those where mask is 1, in row-major order. Arguments as in grpo_loss, with
    `weights` from token_weights; `seq_ratio` (N,): GSPO's s_i, computed before (sequence_ratios)."""
    m = mask.bool()
    pick = lambda x: None if x is None else x[m]  # noqa: E731
    old, ref, A, w = pick(old_logp), pick(ref_logp), advantages[:, None].expand(m.shape)[m], weights[m]
    seq = None if seq_ratio is None else seq_ratio[:, None].expand(m.shape)[m]

    def f(logp, start, stop):
        part = lambda x: None if x is None else x[start:stop]  # noqa: E731
        return w[start:stop] * token_loss(logp, part(old), part(ref), A[start:stop], seq_ratio=part(seq), **loss_args)
    return f


@torch.no_grad()
def sequence_ratios(policy, batch, completion_ids, mask, old_logp, temperature):
    """GSPO's s_i under the policy as it is now, before a forward that takes the loss's gradient
    token by token (METHOD.md 5.9): 1 at the first update (pi is pi_old), else from a scoring pass
    without gradient, since s_i needs all of completion i's tokens before any of them."""
    if old_logp is None:
        return torch.ones(completion_ids.shape[0], device=completion_ids.device)
    return sequence_ratio(policy.completion_logps(batch, completion_ids, temperature, mask), old_logp, mask)


def loss_stats(logp, old_logp, ref_logp, advantages, mask, eps=0.2, eps_high=None, seq_ratio=None):
    """Token means of the KL (k3), the clipped fraction and the ratio pi / pi_old (GSPO: s_i)."""
    eps_high = eps if eps_high is None else eps_high
    ratio = torch.ones_like(logp) if old_logp is None else torch.exp(logp - old_logp)
    if seq_ratio is not None:
        ratio = seq_ratio.reshape(-1, 1).expand_as(logp)
    kl = torch.zeros_like(logp) if ref_logp is None else k3(logp, ref_logp)
    A = advantages[:, None]
    was_clipped = ((ratio < 1 - eps) & (A < 0)) | ((ratio > 1 + eps_high) & (A > 0))
    n_tokens = mask.sum().clamp(min=1)
    return {"kl": ((kl * mask).sum() / n_tokens).item(),
            "clip_frac": ((was_clipped.float() * mask).sum() / n_tokens).item(),
            "ratio": ((ratio * mask).sum() / n_tokens).item()}
