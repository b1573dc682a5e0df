"""Caption fidelity: RAM.generate against the reference's captions recorded with transformers 4.36.2
(tests/data/reference/beam_search_4.36.2.json, 144 cases; README.md beside it says how they were made).

Prints, per kind of case and in all, how many captions have the reference's token ids, and the largest
difference of beam score where `ram_model.generation.decode` exists. `--code DIR` measures the `ram_model`
package found in DIR instead of this checkout's, e.g. the code before a change:

    python benchmarks/beam_reference.py
    git archive <commit> ram_model | tar -x -C /tmp/old && python benchmarks/beam_reference.py --code /tmp/old
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def kind(case: dict) -> str:
    if case["num_beams"] == 1:
        return "greedy"
    if case["repetition_penalty"] != 1.0:
        return "beam, repetition penalty"
    return "beam, no EOS bias" if case["eos_bias"] == 0 else "beam, EOS bias raised"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", type=Path, help="a folder holding the ram_model package to measure")
    args = ap.parse_args()
    # this checkout (for tests.beam_cases, and ram_model unless --code) ahead of any installed copy
    sys.path[:0] = ([str(args.code)] if args.code else []) + [str(ROOT)]
    import torch

    import ram_model
    from ram_model.ram import RAM, RAMConfig
    from tests.beam_cases import DECODER, PAD, PROMPT, SEP, PromptTokenizer, build_decoder, build_states, digest
    try:
        from ram_model.generation import decode
    except ImportError:
        decode = None
    torch.set_num_threads(1)
    cases = json.loads((ROOT / "tests/data/reference/beam_search_4.36.2.json").read_text())["cases"]
    ram = RAM(RAMConfig.tiny(vocab_size=DECODER["vocab_size"]), tokenizer=PromptTokenizer()).eval()
    cut = lambda ids: ids[: ids.index(SEP) + 1] if SEP in ids else [t for t in ids if t != PAD]  # noqa: E731
    same, total, worst = Counter(), Counter(), 0.0
    with torch.inference_mode():
        for c in cases:
            ram.text_decoder = build_decoder(c["checkpoint"], c["eos_bias"])
            states = build_states(c["input"])
            assert digest(ram.text_decoder, states) == c["digest"], "decoder or input differs from the recording"
            ids = ram.generate(states, c["num_beams"], c["max_length"], c["min_length"], c["repetition_penalty"])
            ok = cut(ids[0].tolist()) == cut(c["ids"])
            total[kind(c)] += 1
            same[kind(c)] += ok
            if ok and decode is not None and c["score"] is not None:
                _, score = decode(ram.text_decoder, states, torch.tensor([PROMPT]), SEP, PAD, c["num_beams"],
                                  c["max_length"], c["min_length"], c["repetition_penalty"])
                worst = max(worst, abs(score.item() - c["score"]))
    print(f"ram_model from {Path(ram_model.__file__).parent}")
    for k in sorted(total):
        print(f"  {k:28s} {same[k]:3d} / {total[k]}")
    print(f"reference's token ids: {sum(same.values())} / {sum(total.values())} cases; max beam-score difference "
          + (f"{worst:.1e}" if decode is not None else "n/a (no ram_model.generation.decode)"))


if __name__ == "__main__":
    main()
