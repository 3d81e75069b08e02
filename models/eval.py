#!/usr/bin/env python3
"""Held-out prompts and evaluation for kvsim's tiny retrieval model.

Writes held-out prompts for `kvsim eval` (heldout/NAME.txt + NAME.answer, heldout/index.json)
and the default demo prompt (traces/prompts/default.txt, which `make run` traces), and scores
the exported checkpoint with this directory's PyTorch code (greedy first answer token).

A prompt is a document of filler prose with facts "Note: <city> <ddd>." planted at random
depths, each fact wrapped in [[needle]]...[[/needle]] (the space before "Note" inside the
markers, so that tokenizing the pieces between markers separately, as kvsim does, gives exactly
the ids of the unmarked text the model was trained on), then a blank line
and the question "Note: <city>" (no trailing newline), after a [[decode]] marker so that
kvsim feeds the question through each policy's compressed cache. The expected answer is the code,
e.g. "384"; the model's greedy continuation is " 384".

    python3 models/eval.py --write-prompts          # writes heldout/ and traces/prompts/default.txt
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


def strip_markup(text):
    for m in ("[[needle]]", "[[/needle]]", "[[decode]]", "[[probe]]"):
        text = text.replace(m, "")
    return text


def make_prompt(tok, corpus, seed, length, n_facts):
    """(text with markers, plain text, answer, info). length: target tokens without BOS."""
    r = random.Random(seed)
    ids, ans, segs, keys, vals, asked = corpus.document(r, length + 1 + 8, n_facts, 1)
    a = ans[0]
    q = [s for s in segs if s[0] == "question"][0]
    # the document, then a blank line, then "Note: <key>"; the answer token follows
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
    # the question is fed through the policy's cache as decode steps (kvsim's [[decode]]), so
    # that it is answered from what the policy kept, not from the full-cache prefill
    cut = marked.rindex("\n\nNote:")
    marked = marked[:cut] + "[[decode]]" + marked[cut:]
    plain = strip_markup(marked)
    assert tok.encode(plain) == prompt_ids[1:], "prompt does not re-encode to its ids"
    before, after = plain[:plain.rindex("\n\nNote:")], plain[plain.rindex("\n\nNote:"):]
    assert tok.encode(before) + tok.encode(after) == prompt_ids[1:], \
        "the prompt does not split into the same ids at [[decode]]"
    assert plain.endswith("\n\nNote: " + tok.decode([keys[asked[0]]]).strip())
    fact = [s for s in segs if s[0] == "fact" and s[3] == asked[0]][0]
    answer = tok.decode([vals[asked[0]]]).strip()
    info = {"tokens": len(prompt_ids) - 1, "facts": n_facts,
            "question": plain[plain.rindex("Note:"):], "answer": answer,
            "fact_tokens": [fact[1] - 1, fact[2] - 1]}  # span in tokens without BOS
    return marked, plain, answer, info, prompt_ids


def write_prompts(d, tok, corpus, n_per_len, default_prompt):
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
    # The demo: the first seed from 424242 whose asked fact lies in the first third of the
    # document and, when the model is there, that the model answers with the full cache (so
    # that what a policy evicts decides the answer; accuracy is measured on heldout/, not here).
    model = T.load_exported(d)[0] if os.path.exists(os.path.join(d, "model.safetensors")) \
        else None
    seed = 424242
    while True:
        marked, _, answer, info, ids = make_prompt(tok, corpus, seed, 4200, 10)
        if info["fact_tokens"][0] < 1400 and (model is None or
                                              greedy_next(model, tok, ids) == answer):
            break
        seed += 1
    info["seed"] = seed
    os.makedirs(os.path.dirname(default_prompt), exist_ok=True)
    with open(default_prompt, "w", encoding="utf-8") as f:
        # needle survival is measured where the question's key is read: the probe
        f.write(marked + "[[probe]]")
    with open(os.path.splitext(default_prompt)[0] + ".answer", "w", encoding="utf-8") as f:
        f.write(answer + "\n")
    print("default prompt:", json.dumps(info))


def greedy_next(model, tok, ids):
    """The model's greedy next token after ids (the whole text prefilled), as stripped text."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), fused=False)
    return tok.decode([int(logits[0, -1].argmax())]).strip()


def score(d):
    model, tok = T.load_exported(d)
    torch.set_num_threads(2)
    hd = os.path.join(d, "heldout")
    res = {}
    for name in sorted(f[:-4] for f in os.listdir(hd) if f.endswith(".txt")):
        text = open(os.path.join(hd, name + ".txt"), encoding="utf-8").read()
        text = strip_markup(text)
        answer = open(os.path.join(hd, name + ".answer")).read().strip()
        ids = [tok.bos_id] + tok.encode(text)
        got = greedy_next(model, tok, ids)
        key = name.split("_")[0]
        res.setdefault(key, []).append(got == answer)
        print(name, len(ids) - 1, answer, got, flush=True)
    for k, v in res.items():
        print(f"{k}: {sum(v)}/{len(v)} = {sum(v) / len(v):.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.path.join(HERE, "tiny-retrieval"))
    ap.add_argument("--default-prompt",
                    default=os.path.join(os.path.dirname(HERE), "traces", "prompts", "default.txt"),
                    help="where the default demo prompt goes (make run traces it)")
    ap.add_argument("--n", type=int, default=20, help="held-out prompts per length")
    ap.add_argument("--write-prompts", action="store_true")
    ap.add_argument("--score", action="store_true")
    args = ap.parse_args()
    tok = T.Tokenizer()
    if args.write_prompts:
        write_prompts(args.dir, tok, T.Corpus(tok), args.n, args.default_prompt)
    if args.score:
        score(args.dir)


if __name__ == "__main__":
    main()
