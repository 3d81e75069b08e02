#!/usr/bin/env python3
"""Evaluate the exported tiny retrieval model and write its held-out prompts.

Loads config.json + model.safetensors + tokenizer.json with train.py's own code (no Hugging Face
libraries), generates held-out documents from a seed the training never uses, and measures
exact-answer accuracy of greedy decoding with the full context:

    python3 models/eval.py --n 100 --lengths 2048 4096

Each document holds several planted facts and ends with a block of questions; every question is
scored: the prompt is the document up to and including that question's "?", and the answer is
right when greedy decoding produces exactly the planted code (one token) followed by the end of
the line. One forward pass over the whole document gives the greedy choice at every question
(the earlier questions are in the prompt with their true answers); for the last question of each
document the answer is also decoded token by token as a check.

    python3 models/eval.py --write-prompts      # heldout/ prompts and default_prompt.txt
    python3 models/eval.py --hf-check           # compare with transformers / tokenizers
"""

import argparse
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import Corpus, load_exported  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
NEEDLE_OPEN, NEEDLE_CLOSE = "[[needle]]", "[[/needle]]"


def forward_logits(model, ids, device):
    x = torch.tensor([ids], dtype=torch.long, device=device)
    with torch.no_grad():
        return model(x)[0].float()


def greedy(model, ids, device, stop_id, max_new=4):
    out = []
    cur = list(ids)
    for _ in range(max_new):
        nxt = int(forward_logits(model, cur, device)[-1].argmax())
        out.append(nxt)
        cur.append(nxt)
        if nxt == stop_id:
            break
    return out


def heldout_docs(corpus, seed, n, length, facts=(8, 16), questions=4):
    r = random.Random(seed)
    for _ in range(n):
        nf = r.randint(*facts)
        yield corpus.document(r, length + 1, nf, min(questions, nf))


def evaluate(model, tok, corpus, args, device):
    results = {}
    for L in args.lengths:
        right = total = gen_right = gen_total = 0
        t0 = time.time()
        lens = []
        for di, (ids, ans, segs, keys, vals, asked) in enumerate(
                heldout_docs(corpus, args.seed + L, args.n, L)):
            # go through text and the exported tokenizer, as a user of the files would
            text = tok.decode(ids[1:])
            enc = [tok.bos_id] + tok.encode(text)
            assert enc == ids, "tokenizer round trip failed"
            lens.append(ans[0] - 1)
            logits = forward_logits(model, ids, device)
            pred = logits.argmax(-1).tolist()
            for a in ans:
                ok = pred[a - 1] == ids[a] and pred[a] == corpus.nl
                right += ok
                total += 1
            if args.generate:
                a = ans[-1]
                out = greedy(model, ids[:a], device, corpus.nl)
                want = tok.decode([ids[a]]) + "\n"
                gen_right += tok.decode(out) == want
                gen_total += 1
        res = {"documents": args.n, "questions": total, "accuracy": right / total,
               "tokens_before_first_question_mean": sum(lens) / len(lens),
               "tokens_before_first_question_min": min(lens),
               "seconds": round(time.time() - t0, 1)}
        if gen_total:
            res["token_by_token_last_question_accuracy"] = gen_right / gen_total
        results[str(L)] = res
        print(f"length {L}: {right}/{total} = {right / total:.4f}  {json.dumps(res)}",
              flush=True)
    return results


def render(tok, ids, segs, upto, markers):
    """Text of ids[1:upto] with fact sentences wrapped in needle markers (after the space)."""
    facts = [(s, e) for k, s, e in segs if k == "fact" and e <= upto]
    out = []
    pos = 1
    for s, e in facts:
        out.append(tok.decode(ids[pos:s]))
        ft = tok.decode(ids[s:e])
        lead = ft[:len(ft) - len(ft.lstrip(" "))]
        out.append(lead + (NEEDLE_OPEN + ft.lstrip(" ") + NEEDLE_CLOSE if markers else
                           ft.lstrip(" ")))
        pos = e
    out.append(tok.decode(ids[pos:upto]))
    return "".join(out)


def write_prompts(model, tok, corpus, args, device):
    hd = os.path.join(args.model, "heldout")
    os.makedirs(hd, exist_ok=True)
    index = {}

    def make(seed, length, nfacts, depth_max, tries=200):
        """A document ending with one question; the asked fact lies within the first
        depth_max of the document and the model must answer it right."""
        r = random.Random(seed)
        for _ in range(tries):
            ids, ans, segs, keys, vals, asked = corpus.document(r, length + 1, nfacts, 1)
            a = ans[0]
            key = keys[asked[0]]
            fact = [(s, e) for k, s, e in segs if k == "fact" and key in ids[s:e]][0]
            if fact[0] / a > depth_max:
                continue
            out = greedy(model, ids[:a], device, corpus.nl)
            if tok.decode(out) != tok.decode([ids[a]]) + "\n":
                continue
            text = render(tok, ids, segs, a, True)
            plain = render(tok, ids, segs, a, False)
            assert [tok.bos_id] + tok.encode(plain) == ids[:a]
            return text, plain, ids, a, fact
        raise RuntimeError("no suitable document")

    specs = [("default", 4096, 10, 0.3)] + \
        [(f"heldout_{L}_{i}", L, 8 + 2 * i, 0.5 if i == 0 else 1.0)
         for L in (2048, 4096) for i in range(2)]
    for j, (name, L, nf, dm) in enumerate(specs):
        text, plain, ids, a, fact = make(args.seed + 100 + j, L, nf, dm)
        n_tok = len(tok.encode(plain))
        info = {"tokens_without_bos": n_tok, "answer": tok.decode([ids[a]]).strip(),
                "question": plain[plain.rfind("\n") + 1:],
                "needles": text.count(NEEDLE_OPEN),
                "asked_fact_token_span": [fact[0] - 1, fact[1] - 1]}
        path = os.path.join(args.model, "default_prompt.txt") if name == "default" else \
            os.path.join(hd, name + ".txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        index[os.path.relpath(path, args.model)] = info
        print(name, json.dumps(info), flush=True)
    with open(os.path.join(hd, "index.json"), "w") as f:
        json.dump(index, f, indent=2)


def hf_check(model, tok, corpus, args):
    from tokenizers import Tokenizer as HFTok
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32,
                                          attn_implementation="eager").eval()
    hft = HFTok.from_file(os.path.join(args.model, "tokenizer.json"))
    ids, ans, segs, *_ = next(heldout_docs(corpus, args.seed + 7, 1, 2048))
    text = tok.decode(ids[1:])
    sample = text + " Other text: héllo, wörld! 12345 don't  stop\n\n  x"
    ours = tok.encode(sample)
    theirs = hft.encode(sample, add_special_tokens=False).ids
    x = torch.tensor([ids])
    with torch.no_grad():
        a = model(x).float()
        b = hf(x).logits.float()
    diff = (a - b).abs().max().item()
    same_argmax = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    res = {"tokens": len(ids), "max_abs_logit_diff": diff,
           "logit_scale_max_abs": a.abs().max().item(),
           "argmax_agreement": same_argmax,
           "tokenizer_sample_chars": len(sample), "tokenizer_sample_tokens": len(ours),
           "tokenizer_ids_equal": ours == theirs,
           "hf_decode_roundtrip": hft.decode(theirs, skip_special_tokens=False) == sample}
    print("hf_check", json.dumps(res), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(HERE, "tiny-retrieval"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=777001, help="held-out seed (training: 1234)")
    ap.add_argument("--n", type=int, default=100, help="documents per length")
    ap.add_argument("--lengths", type=int, nargs="*", default=[2048, 4096])
    ap.add_argument("--no-generate", dest="generate", action="store_false")
    ap.add_argument("--write-prompts", action="store_true")
    ap.add_argument("--hf-check", action="store_true")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    model, tok = load_exported(args.model, args.device)
    corpus = Corpus(tok)
    out = {}
    if args.lengths and args.n > 0:
        out["accuracy"] = evaluate(model, tok, corpus, args, args.device)
    if args.write_prompts:
        write_prompts(model, tok, corpus, args, args.device)
    if args.hf_check:
        out["hf_check"] = hf_check(model.cpu(), tok, corpus, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
