"""Record the reference's captions (token ids and beam scores) for tests/test_generation.py.

Run once, in an environment with the reference's transformers (4.36.2) and torch, never in CI; see README.md
beside this file for the exact commands. The reference's own text decoder class (BertLMHeadModel of
xinyu1205/recognize-anything's ram/models/bert.py, loaded from the checkout given by --reference) is given the
weights of each small random checkpoint of tests/beam_cases.py, and its `generate` is called as
Tag2Text.generate calls it: batch 1, the tag-encoder states repeated num_beams times, encoder_attention_mask
None, eos_token_id=[SEP], pad_token_id=[PAD]. As a cross-check, the same search is also run by transformers
4.36.2's generate over OUR decoder (ram_model.bert) and must give the same ids.

    python make_beam_search_reference.py --reference <recognize-anything checkout> --out beam_search_4.36.2.json
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch
import transformers

from tests.beam_cases import DECODER, PAD, PROMPT, SEP, build_decoder, build_states, digest

CHECKPOINTS = range(4)
INPUTS = range(3)


def cases():
    """(checkpoint seed, input seed, eos_bias, num_beams, max_length, min_length, repetition_penalty)."""
    out = []
    for ckpt in CHECKPOINTS:
        for inp in INPUTS:
            for bias in (0.0, 6.0, 7.0, 8.0):          # 0: full-length captions; 6-8: most end at 11-14 tokens
                for max_length in (30, 50):             # Tag2Text.generate's default; inference_tag2text's
                    out.append((ckpt, inp, bias, 3, max_length, 10, 1.0))
            for bias in (0.0, 8.0):
                out.append((ckpt, inp, bias, 1, 30, 10, 1.0))   # greedy
            for bias in (0.0, 7.0):
                out.append((ckpt, inp, bias, 3, 30, 10, 1.1))   # a repetition penalty (a caller's option)
    return out


def load_reference_bert(checkout: Path):
    spec = importlib.util.spec_from_file_location("reference_bert", checkout / "ram" / "models" / "bert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_decoder(ref_bert, ours: torch.nn.Module):
    """The reference's BertLMHeadModel with our decoder's shape (med_config.json's fields) and weights."""
    cfg = transformers.BertConfig(vocab_size=DECODER["vocab_size"], hidden_size=DECODER["hidden_size"],
                                  num_hidden_layers=DECODER["num_layers"], num_attention_heads=DECODER["num_heads"],
                                  intermediate_size=DECODER["intermediate_size"],
                                  max_position_embeddings=DECODER["max_position_embeddings"], hidden_act="gelu",
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12,
                                  pad_token_id=PAD, type_vocab_size=2, add_cross_attention=True)
    cfg.encoder_width = DECODER["encoder_width"]
    ref = ref_bert.BertLMHeadModel(config=cfg).eval()
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return ref


def our_decoder_for_hf(ours: torch.nn.Module):
    """transformers 4.36.2's GenerationMixin over our decoder (no cache): HF's rules driven by our decoder."""
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    class Wrapped(PreTrainedModel):
        config_class = PretrainedConfig

        def __init__(self, config, decoder):
            super().__init__(config)
            self.decoder = decoder

        def forward(self, input_ids, encoder_hidden_states=None, **_):
            return CausalLMOutput(logits=self.decoder(input_ids, encoder_hidden_states=encoder_hidden_states))

        def prepare_inputs_for_generation(self, input_ids, encoder_hidden_states=None, **_):
            return {"input_ids": input_ids, "encoder_hidden_states": encoder_hidden_states}

    return Wrapped(PretrainedConfig(is_decoder=True, vocab_size=DECODER["vocab_size"]), ours).eval()


def generate(model, states, num_beams, max_length, min_length, repetition_penalty, repeat_states: bool):
    # Tag2Text.generate repeats the image embeddings num_beams times before the tag encoder, and transformers
    # 4.36.2 repeats every tensor argument num_beams times again; the reference's cross-attention keeps the
    # first rows (its "compatible with higher versions of transformers" slice), right at batch 1
    enc = states.repeat_interleave(num_beams, dim=0) if repeat_states else states
    out = model.generate(input_ids=torch.tensor([PROMPT]), max_length=max_length, min_length=min_length,
                         num_beams=num_beams, eos_token_id=SEP, pad_token_id=PAD,
                         repetition_penalty=repetition_penalty, encoder_hidden_states=enc,
                         encoder_attention_mask=None, output_scores=True, return_dict_in_generate=True)
    ids = out.sequences[0].tolist()
    score = out.sequences_scores[0].item() if num_beams > 1 else None
    return ids, score


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, required=True, help="a checkout of xinyu1205/recognize-anything")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ref_bert = load_reference_bert(args.reference)
    records, agree, logit_diff = [], 0, 0.0
    for ckpt, inp, bias, num_beams, max_length, min_length, rep in cases():
        ours = build_decoder(ckpt, bias)
        states = build_states(inp)
        ref = reference_decoder(ref_bert, ours)
        with torch.no_grad():
            prompt = torch.tensor([PROMPT])
            a = ours(prompt, encoder_hidden_states=states)
            b = ref(prompt, encoder_hidden_states=states, return_logits=True)
            logit_diff = max(logit_diff, (a[:, :-1] - b).abs().max().item())
            ids, score = generate(ref, states, num_beams, max_length, min_length, rep, repeat_states=True)
            hf_ids, hf_score = generate(our_decoder_for_hf(ours), states, num_beams, max_length, min_length, rep,
                                        repeat_states=False)
        agree += hf_ids == ids
        records.append(dict(checkpoint=ckpt, input=inp, eos_bias=bias, num_beams=num_beams, max_length=max_length,
                            min_length=min_length, repetition_penalty=rep, digest=digest(ours, states),
                            ids=ids, score=score))
        print(ckpt, inp, bias, num_beams, max_length, rep, len(ids), score, "hf-over-ours:", hf_ids == ids,
              file=sys.stderr)
    meta = dict(transformers=transformers.__version__, torch=torch.__version__, python=platform.python_version(),
                reference="xinyu1205/recognize-anything ram/models/bert.py BertLMHeadModel.generate",
                reference_commit=subprocess.run(["git", "-C", str(args.reference), "rev-parse", "HEAD"],
                                                capture_output=True, text=True).stdout.strip() or None,
                reference_bert_sha256=hashlib.sha256(
                    (args.reference / "ram" / "models" / "bert.py").read_bytes()).hexdigest(),
                decoder=DECODER, prompt=PROMPT, eos=SEP, pad=PAD,
                hf_over_our_decoder_agrees=f"{agree}/{len(records)}",
                max_prompt_logit_diff_ours_vs_reference=logit_diff)
    lines = ",\n".join(" " + json.dumps(r) for r in records)  # one case a line
    args.out.write_text(f'{{"meta": {json.dumps(meta, indent=1)},\n"cases": [\n{lines}\n]}}\n')
    print(f"{len(records)} cases; transformers {transformers.__version__}'s generate over our decoder gives the "
          f"reference's ids in {agree}; prompt logits differ by at most {logit_diff:.2e}", file=sys.stderr)


if __name__ == "__main__":
    main()
