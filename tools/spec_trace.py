"""Trace the depth controller's decisions round by round (speculative decoding with prompt lookup on the edit
task of benchmarks/speculative.py), to see why it drafts what it drafts on a given machine.

    python tools/spec_trace.py MODEL.gguf [--n-gpu-layers 99] [--max-tokens 256] [--out trace.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import llmplace
from llmplace import speculative

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from speculative import EDIT_PROMPT  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--n-gpu-layers", type=int, default=-1)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    trace: list[dict] = []
    choose, update = speculative.DepthController.choose, speculative.DepthController.update

    def traced_choose(self, limit, pending=0):
        k = choose(self, limit, pending)
        trace.append({"limit": limit, "k": k, "acceptance": round(self.acceptance, 3), "debt_ms": self.debt * 1e3,
                      "allowance_ms": self._allowance(self.SLACK * self.verify_cost(1)) * 1e3 if 1 in self.samples
                      else None, "backoff": self.backoff, "episode": self.episode,
                      "depth": self.depth,
                      "curve_ms": {n: round(self.verify_cost(n) * 1e3, 3) for n in range(1, 7)} if 1 in self.samples
                      else None})
        return k

    def traced_update(self, drafted, accepted, t_draft, t_verify, **kw):
        update(self, drafted, accepted, t_draft, t_verify, **kw)
        trace.append({"drafted": drafted, "accepted": accepted, "t_verify_ms": round(t_verify * 1e3, 3),
                      "episode": self.episode, "since_draft": self.since_draft})

    speculative.DepthController.choose, speculative.DepthController.update = traced_choose, traced_update
    with llmplace.load(args.model, n_gpu_layers=args.n_gpu_layers, progress=False) as model:
        eog = {t: -1e9 for t in (model.vocab.eos, model.vocab.eot) if t is not None}
        for rep in range(2):
            trace.append({"rep": rep})
            with llmplace.Context(model, n_ctx=1024) as ctx:
                result = llmplace.generate(model, EDIT_PROMPT, max_tokens=args.max_tokens, temperature=0,
                                           context=ctx, lookup=True, logit_bias=eog)
            trace.append({"rep_done": rep, "tps": result.generation_tps, "drafted": result.speculative.drafted,
                          "accepted": result.speculative.accepted})
    lines = "\n".join(json.dumps(t) for t in trace)
    if args.out:
        args.out.write_text(lines + "\n")
    print(lines[-6000:])


if __name__ == "__main__":
    main()
