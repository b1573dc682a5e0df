"""Caption decoding for RAM's text decoder: greedy search and beam search, with the rules of transformers 4.36.2.

The reference (xinyu1205/recognize-anything, Tag2Text.generate) decodes by calling transformers'
`generate(num_beams=3, min_length=10, max_length=30 | 50, repetition_penalty=1.0, eos_token_id=[SEP],
pad_token_id=[PAD])` on its BERT decoder, with the version it pins: 4.36.2 (length_penalty 1.0 and
early_stopping False, the defaults). A RAM user expects the same captions from the same checkpoint, so the
loop below implements 4.36.2's rules exactly, and `tests/test_generation.py` checks it against outputs
recorded with 4.36.2 (tests/data/reference/README.md says how they were made).

Why our own loop and not transformers' `generate` over our decoder: the transformers installed beside this
project is 5.x, and 5.x's beam search decides differently from 4.36.2 where beams end early (it stops when
the worst finished beam beats the best *running* beam; 4.36.2 compares against the best candidate of the
step, end-of-sentence included, see `_Finished.is_done`), and 4.36.2 cannot be installed beside 5.x. Our
loop also keeps the decoder's key/value cache (one token per step).

The rules, per step of beam search (`cur_len` = the length of the sequences including the prompt):
1. scores = log_softmax(logits); then, on those log-probabilities and in this order, the logits
   processors: the repetition penalty (every token already in the sequence, prompt included: a negative
   score is multiplied by the penalty, a positive one divided) and the minimum length (end-of-sentence
   set to -inf while `cur_len < min_length`). Nothing is renormalised after them: masking EOS before the
   softmax instead raises the other tokens' log-probabilities and changes which beams win.
2. candidates = beam score + scores, the top 2·num_beams over all beams × vocabulary, best first.
3. Walking the candidates in rank order: an end-of-sentence candidate within the first num_beams ranks is
   offered to the finished set with score sum_logprobs / generated_len**length_penalty, where
   generated_len = cur_len + 1 − prompt length (the EOS counted, the prompt not); one at a later rank is
   dropped; any other candidate becomes a live beam until num_beams are live.
4. The finished set keeps the num_beams best (`_Finished.add`). An image is done when its set is full and
   its worst score ≥ (the best candidate score of the step, EOS included) / (cur_len + 1 − prompt length).
5. The loop ends when every image is done or the sequences reach max_length. Images not done then offer
   their live beams, scored by their length without the prompt. The best of the set is the caption;
   its score is returned with it.
Greedy search (num_beams=1) applies the same processors to the raw logits and takes the argmax, as 4.36.2.
"""
from __future__ import annotations

import torch

LENGTH_PENALTY = 1.0  # transformers' default, which the reference keeps


class _Finished:
    """The finished hypotheses of one image: transformers 4.36.2's BeamHypotheses with early_stopping=False,
    including its tie rules (a new score must beat the worst strictly; the best is the last of a stable
    ascending sort)."""

    def __init__(self, num_beams: int):
        self.num_beams = num_beams
        self.hyps: list[tuple[float, torch.Tensor]] = []
        self.worst = 1e9

    def add(self, hyp: torch.Tensor, sum_logprobs: float, generated_len: int) -> None:
        score = sum_logprobs / generated_len ** LENGTH_PENALTY
        if len(self.hyps) < self.num_beams or score > self.worst:
            self.hyps.append((score, hyp))
            if len(self.hyps) > self.num_beams:
                order = sorted((s, i) for i, (s, _) in enumerate(self.hyps))
                del self.hyps[order[0][1]]
                self.worst = order[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_logprobs: float, generated_len: int) -> bool:
        if len(self.hyps) < self.num_beams:
            return False
        return self.worst >= best_sum_logprobs / generated_len ** LENGTH_PENALTY

    def best(self) -> tuple[float, torch.Tensor]:
        return sorted(self.hyps, key=lambda h: h[0])[-1]


def _process(scores: torch.Tensor, seqs: torch.Tensor, eos: int, min_length: int,
             repetition_penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor then MinLengthLogitsProcessor (their order in 4.36.2)."""
    if repetition_penalty != 1.0:
        prev = scores.gather(1, seqs)
        scores = scores.scatter(1, seqs, torch.where(prev < 0, prev * repetition_penalty, prev / repetition_penalty))
    if seqs.shape[1] < min_length:
        scores = scores.clone()
        scores[:, eos] = float("-inf")
    return scores


def decode(decoder, enc_states: torch.Tensor, prompt: torch.Tensor, eos: int, pad: int, num_beams: int = 3,
           max_length: int = 30, min_length: int = 10,
           repetition_penalty: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode from `prompt` (1, P) for each row of `enc_states` (B, L, H), which `decoder` (a
    ram_model.bert.BertLMHeadModel) cross-attends without a mask (as the reference: padded tag tokens too).

    Returns (sequences (B, ≤ max_length), prompt included, ended by `eos` where a caption finished and padded
    with `pad`; scores (B,)): for beam search each caption's score as transformers reports it
    (`sequences_scores`: summed log-probabilities over the generated length, prompt excluded); for greedy
    search the same quantity of the chosen tokens. `max_length` / `min_length` count the prompt.
    """
    dev = enc_states.device
    B, K = enc_states.shape[0], max(1, num_beams)
    P = prompt.shape[1]
    enc = enc_states.repeat_interleave(K, dim=0)
    seqs = prompt.to(dev).expand(B * K, -1).clone()
    caches = [dict() for _ in decoder.bert.encoder.layer]
    logits = decoder(seqs, encoder_hidden_states=enc, caches=caches)[:, -1].float()
    if K == 1:
        return _greedy(decoder, enc, seqs, logits, caches, eos, pad, max_length, min_length, repetition_penalty)
    beam_scores = torch.zeros(B, K, device=dev)
    beam_scores[:, 1:] = -1e9  # one live beam per image at the start
    beam_scores = beam_scores.view(-1)
    finished = [_Finished(K) for _ in range(B)]
    done = [False] * B
    while True:
        cur = seqs.shape[1]
        scores = _process(logits.log_softmax(-1), seqs, eos, min_length, repetition_penalty)
        V = scores.shape[-1]
        top, idx = (beam_scores[:, None] + scores).view(B, K * V).topk(2 * K, dim=1)
        beam_src, token = idx // V, idx % V
        new_scores = torch.zeros(B, K, device=dev)
        new_src = torch.zeros(B, K, dtype=torch.long, device=dev)
        new_tok = torch.full((B, K), pad, dtype=torch.long, device=dev)
        top_l, src_l, tok_l = top.tolist(), beam_src.tolist(), token.tolist()
        for b in range(B):
            if done[b]:
                continue
            n = 0
            for rank, (s, src, t) in enumerate(zip(top_l[b], src_l[b], tok_l[b])):
                if t == eos:
                    if rank < K:
                        finished[b].add(torch.cat([seqs[b * K + src], seqs.new_tensor([eos])]), s, cur + 1 - P)
                else:
                    new_scores[b, n], new_src[b, n], new_tok[b, n] = s, src, t
                    n += 1
                    if n == K:
                        break
            done[b] = finished[b].is_done(top_l[b][0], cur + 1 - P)
        rows = (torch.arange(B, device=dev)[:, None] * K + new_src).view(-1)
        seqs = torch.cat([seqs[rows], new_tok.view(-1, 1)], 1)
        beam_scores = new_scores.view(-1)
        for cache in caches:
            for key in ("sk", "sv"):
                cache[key] = cache[key][rows]
        if all(done) or seqs.shape[1] >= max_length:
            break
        logits = decoder(new_tok.view(-1, 1), encoder_hidden_states=enc, caches=caches, past_length=cur)[:, -1].float()
    best = []
    for b in range(B):
        if not done[b]:  # out of length: the live beams join the finished ones
            for k in range(K):
                finished[b].add(seqs[b * K + k], beam_scores[b * K + k].item(), seqs.shape[1] - P)
        best.append(finished[b].best())
    out = torch.full((B, max(len(h) for _, h in best)), pad, dtype=torch.long, device=dev)
    for b, (_, h) in enumerate(best):
        out[b, :len(h)] = h
    return out, torch.tensor([s for s, _ in best], device=dev)


def _greedy(decoder, enc, seqs, logits, caches, eos, pad, max_length, min_length, repetition_penalty):
    done = torch.zeros(seqs.shape[0], dtype=torch.bool, device=seqs.device)
    total = torch.zeros(seqs.shape[0], device=seqs.device)
    length = torch.zeros(seqs.shape[0], device=seqs.device)
    while True:
        cur = seqs.shape[1]
        scores = _process(logits, seqs, eos, min_length, repetition_penalty)
        nxt = scores.argmax(-1)
        chosen = scores.log_softmax(-1).gather(1, nxt[:, None]).squeeze(1)
        total += torch.where(done, 0.0, chosen)
        length += (~done).float()
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        seqs = torch.cat([seqs, nxt[:, None]], 1)
        done |= nxt == eos
        if done.all() or seqs.shape[1] >= max_length:
            return seqs, total / length.clamp(min=1)
        logits = decoder(nxt[:, None], encoder_hidden_states=enc, caches=caches, past_length=cur)[:, -1].float()
