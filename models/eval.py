#!/usr/bin/env python3
"""Held-out prompts and evaluation for kvsim's tiny retrieval model.

Writes held-out prompts for `kvsim eval` (heldout/NAME.txt + NAME.answer, heldout/index.json)
and the default demo prompt (default_prompt.txt), and scores the exported checkpoint with this
directory's PyTorch code (greedy first answer token).

A prompt is a document of filler prose with facts "Note: <city> <ddd>." planted at random
depths, each fact wrapped in [[needle]]...[[/needle]] (the space before "Note" inside the
markers, so that tokenizing the pieces between markers separately, as kvsim does, gives exactly
the ids of the unmarked text the model was trained on), then a blank line
and the question "Question: <city>" (no trailing newline). The expected answer is the code,
e.g. "384"; the model's greedy continuation is " 384".

    python3 models/eval.py --write-prompts          # writes heldout/ and default_prompt.txt
    python3 models/eval.py --score                  # scores heldout/ with PyTorch
"""

import argparse
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train as T  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def needle_text(tok, ids):
    """Text of a fact's ids wrapped in needle markers. The opening marker goes before the
    space that starts the fact (kvsim tokenizes the text between markers piece by piece, and
    ' Note' is one token), after a line break."""
    s = tok.decode(ids)
    return "[[needle]]" + s + "[[/needle]]"


def make_prompt(tok, corpus, seed, length, n_facts):
    """(text with markers, plain text, answer, info). length: target tokens without BOS."""
    r = random.Random(seed)
    ids, ans, segs, keys, vals, asked = corpus.document(r, length + 1 + 8, n_facts, 1)
    a = ans[0]
    q = [s for s in segs if s[0] == "question"][0]
    # the document, then a blank line, then "Question: <key>"; the answer token follows
    prompt_ids = ids[:a]
    body = []
    pos = 1
    for s in segs:
        if s[0] != "fact":
            continue
        body.append(tok.decode(prompt_ids[pos:s[1]]))
        body.append(needle_text(tok, prompt_ids[s[1]:s[2]]))
        pos = s[2]
    body.append(tok.decode(prompt_ids[pos:]))
    marked = "".join(body)
    plain = marked.replace("[[needle]]", "").replace("[[/needle]]", "")
    assert tok.encode(plain) == prompt_ids[1:], "prompt does not re-encode to its ids"
    assert plain.endswith("\n\nQuestion: " + tok.decode([keys[asked[0]]]).strip())
    fact = [s for s in segs if s[0] == "fact" and s[3] == asked[0]][0]
    answer = tok.decode([vals[asked[0]]]).strip()
    info = {"tokens": len(prompt_ids) - 1, "facts": n_facts,
            "question": plain[plain.rindex("Question:"):], "answer": answer,
            "fact_tokens": [fact[1] - 1, fact[2] - 1]}  # span in tokens without BOS
    return marked, plain, answer, info, prompt_ids


def write_prompts(d, tok, corpus, n_per_len):
    hd = os.path.join(d, "heldout")
    os.makedirs(hd, exist_ok=True)
    for f in os.listdir(hd):
        os.remove(os.path.join(hd, f))
    index = {}
    for length, nf in ((2048, 12), (4096, 16)):
        for i in range(n_per_len):
            name = f"len{length}_{i:02d}"
            marked, _, answer, info, _ = make_prompt(tok, corpus, 777001 + length * 1000 + i,
                                                     length, nf)
            with open(os.path.join(hd, name + ".txt"), "w", encoding="utf-8") as f:
                f.write(marked)
            with open(os.path.join(hd, name + ".answer"), "w", encoding="utf-8") as f:
                f.write(answer + "\n")
            index[name] = info
    with open(os.path.join(hd, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    seed = 424242
    while True:  # the asked fact in the first third of the document
        marked, _, answer, info, _ = make_prompt(tok, corpus, seed, 4200, 10)
        if info["fact_tokens"][0] < 1400:
            break
        seed += 1
    with open(os.path.join(d, "default_prompt.txt"), "w", encoding="utf-8") as f:
        f.write(marked)
    print("default prompt:", json.dumps(info))


def score(d):
    model, tok = T.load_exported(d)
    torch.set_num_threads(2)
    hd = os.path.join(d, "heldout")
    res = {}
    for name in sorted(f[:-4] for f in os.listdir(hd) if f.endswith(".txt")):
        text = open(os.path.join(hd, name + ".txt"), encoding="utf-8").read()
        text = text.replace("[[needle]]", "").replace("[[/needle]]", "")
        answer = open(os.path.join(hd, name + ".answer")).read().strip()
        ids = [tok.bos_id] + tok.encode(text)
        with torch.no_grad():
            logits = model(torch.tensor([ids]), fused=False)
        got = tok.decode([int(logits[0, -1].argmax())]).strip()
        key = name.split("_")[0]
        res.setdefault(key, []).append(got == answer)
        print(name, len(ids) - 1, answer, got, flush=True)
    for k, v in res.items():
        print(f"{k}: {sum(v)}/{len(v)} = {sum(v) / len(v):.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.path.join(HERE, "tiny-retrieval"))
    ap.add_argument("--n", type=int, default=20, help="held-out prompts per length")
    ap.add_argument("--write-prompts", action="store_true")
    ap.add_argument("--score", action="store_true")
    args = ap.parse_args()
    tok = T.Tokenizer()
    if args.write_prompts:
        write_prompts(args.dir, tok, T.Corpus(tok), args.n)
    if args.score:
        score(args.dir)


if __name__ == "__main__":
    main()
