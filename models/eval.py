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

It also writes multi-turn conversations for kvsim (conversations/NAME.txt + NAME.answer,
conversations/index.json): one document in four parts, each part a turn that ends with a
question ("\n\nNote: <city>[[generate]]"), asked about a fact of that part or of an earlier one;
the model's answer stays in the history and the next part follows (models/README.md).

Writing prompts and conversations needs only the standard library (corpus.py); PyTorch (and
train.py) is imported where a model is loaded: the scorer, and --write-prompts when the model is
there (it picks the default prompt).

    python3 models/eval.py --write-prompts          # writes heldout/ and traces/prompts/default.txt
    python3 models/eval.py --write-conversations    # writes conversations/ (no PyTorch)
    python3 models/eval.py --score                  # scores heldout/ with PyTorch
"""

import argparse
import json
import os
import random
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from corpus import Corpus, Tokenizer  # noqa: E402

# Conversations (--write-conversations): CONV_TURNS parts of about CONV_PART_TOKENS tokens with
# CONV_FACTS_PER_PART facts each, one question per turn; seeds CONV_SEED + i (held-out prompts
# use 777001 + 1000 * length + i, training other seeds).
CONV_N = 20
CONV_TURNS = 4
CONV_PART_TOKENS = 500
CONV_FACTS_PER_PART = 3
CONV_SEED = 888001

MARKER_RE = re.compile(r"\[\[(?:needle|/needle|decode|probe|generate)\]\]")


def torch_and_train():
    """PyTorch and train.py (the model), imported only where a model is loaded or run."""
    import torch
    import train
    return torch, train


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


def mark_needles(tok, ids, spans, start):
    """Text of ids[start:] with each span (a, b) (indices into ids, in order) wrapped by
    needle_text."""
    body = []
    pos = start
    for a, b in spans:
        body.append(tok.decode(ids[pos:a]))
        body.append(needle_text(tok, ids[a:b]))
        pos = b
    body.append(tok.decode(ids[pos:]))
    return "".join(body)


def make_prompt(tok, corpus, seed, length, n_facts):
    """(text with markers, plain text, answer, info). length: target tokens without BOS."""
    r = random.Random(seed)
    ids, ans, segs, keys, vals, asked = corpus.document(r, length + 1 + 8, n_facts, 1)
    a = ans[0]
    # the document, then a blank line, then "Note: <key>"; the answer token follows
    prompt_ids = ids[:a]
    marked = mark_needles(tok, prompt_ids, [(s[1], s[2]) for s in segs if s[0] == "fact"], 1)
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
    # The default prompt is picked with the model when it is there: that needs PyTorch, checked
    # before anything is written
    have_model = os.path.exists(os.path.join(d, "model.safetensors"))
    if have_model:
        try:
            T = torch_and_train()[1]
        except ImportError as e:
            sys.exit(f"eval.py: --write-prompts picks the default prompt with the model in {d}, "
                     f"which needs PyTorch ({e}); --write-conversations does not")
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
    model = T.load_exported(d)[0] if have_model else None
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


def conversation_parts(corpus, r):
    """CONV_TURNS document parts: (ids, facts) with ids the part's text (no BOS, no trailing
    newline) and facts [(start, end, key id, value id)] in document order, spans into ids. Each
    part is a document of its own (Corpus.document without questions), so it holds exactly
    CONV_FACTS_PER_PART facts and starts with the line-start form of its first word, as text
    after a paragraph break does; a part whose keys repeat an earlier part's is drawn again, so
    that every key is unique in the conversation."""
    tok = corpus.tok
    parts, used = [], set()
    while len(parts) < CONV_TURNS:
        ids, _, segs, keys, vals, _ = corpus.document(r, CONV_PART_TOKENS + 2,
                                                      CONV_FACTS_PER_PART, 0)
        if used & set(keys):
            continue
        used |= set(keys)
        assert ids[0] == tok.bos_id and ids[-2:] == [corpus.nl] * 2 and ids[-3] != corpus.nl
        facts = [(s[1] - 1, s[2] - 1, keys[s[3]], vals[s[3]]) for s in segs if s[0] == "fact"]
        parts.append((ids[1:-2], facts))
    return parts


def conversation_questions(r, i):
    """[(turn, part, fact index)]: turn k (1-based) asks about a fact of part k - d with
    d = (i + k) mod k, a fact not asked before, chosen at random among those of the part. Only
    part 1 can be asked at every turn (when i = 11 mod 12) and it has 3 facts: turn 4 then
    asks about part 2, the next later part with a fact left."""
    asked = [set() for _ in range(CONV_TURNS)]
    out = []
    for k in range(1, CONV_TURNS + 1):
        j = k - (i + k) % k
        while len(asked[j - 1]) == CONV_FACTS_PER_PART:
            j += 1  # part k is new at turn k: this ends there at the latest
        f = r.choice([f for f in range(CONV_FACTS_PER_PART) if f not in asked[j - 1]])
        asked[j - 1].add(f)
        out.append((k, j, f))
    return out


def make_conversation(tok, corpus, seed, i):
    """(marked text, answer lines, info) of conversation i. Turn k's text: "\n\n" for k > 1,
    document part k with its facts in needle markers, [[decode]], "\n\nNote: <key>", then
    [[generate]]. The [[decode]] marker feeds each question one token at a time through the
    policy's cache, after the turn's document part was prefilled (and, when the history is
    re-encoded, compressed), as kvpress asks a question of a compressed context: without it the
    question would be prefilled with the document, read with the full cache, and a one-token
    answer would come from the prefill, the same for every policy."""
    r = random.Random(seed)
    parts = conversation_parts(corpus, r)
    questions = conversation_questions(r, i)
    nl2 = [corpus.nl, corpus.nl]
    ids = []         # the input ids the model sees (no BOS; generated answers come in between)
    texts = []       # each turn's marked text
    fact_span = {}   # (part, fact index) -> token span in ids
    gen_at = []      # len(ids) at each [[generate]]
    decode_at = []   # len(ids) at each [[decode]]
    turn_tokens = []
    for k, (pids, facts) in enumerate(parts, 1):
        t0 = len(ids)
        lead = nl2 if k > 1 else []
        off = t0 + len(lead)
        for f, (a, b, _, _) in enumerate(facts):
            fact_span[(k, f)] = [off + a, off + b]
        _, j, f = questions[k - 1]
        qids = nl2 + corpus.question(parts[j - 1][1][f][2])
        ids += lead + pids
        decode_at.append(len(ids))
        ids += qids
        gen_at.append(len(ids))
        turn_tokens.append(len(ids) - t0)
        texts.append(tok.decode(lead) +
                     mark_needles(tok, pids, [(a, b) for a, b, _, _ in facts], 0) +
                     "[[decode]]" + tok.decode(qids) + "[[generate]]")
    marked = "".join(texts)
    # kvsim tokenizes the text between markers piece by piece: the pieces must give exactly
    # these ids, the needles the facts' spans and the generation points the questions' ends
    got, needles, gens, decodes = [], [], [], []
    pos = 0
    for m in MARKER_RE.finditer(marked):
        got += tok.encode(marked[pos:m.start()])
        if m.group() == "[[needle]]":
            needles.append([len(got)])
        elif m.group() == "[[/needle]]":
            needles[-1].append(len(got))
        elif m.group() == "[[generate]]":
            gens.append(len(got))
        elif m.group() == "[[decode]]":
            decodes.append(len(got))
        pos = m.end()
    assert pos == len(marked), "the conversation ends with [[generate]]"
    assert got == ids, "the conversation's pieces do not tokenize to the intended ids"
    assert needles == [fact_span[(k, f)] for k in range(1, CONV_TURNS + 1)
                       for f in range(CONV_FACTS_PER_PART)]
    assert gens == gen_at
    assert decodes == decode_at
    answers, qinfo = [], []
    for k, j, f in questions:
        a, b = fact_span[(j, f)]
        key, val = ids[a + 2], ids[a + 3]   # the fact: " Note", ":", key, value, "."
        assert ids[a + 2:a + 4] == list(parts[j - 1][1][f][2:])
        assert ids[gen_at[k - 1] - 1] == key
        answer = tok.decode([val]).strip()
        answers.append(f"{answer}\t{j}")
        qinfo.append({"turn": k, "key": tok.decode([key]).strip(), "answer": answer,
                      "fact_turn": j, "distance": k - j, "fact_tokens": [a, b]})
    info = {"seed": seed, "tokens": len(ids), "turn_tokens": turn_tokens, "questions": qinfo}
    return marked, answers, info


def write_conversations(d, tok, corpus):
    cd = os.path.join(d, "conversations")
    os.makedirs(cd, exist_ok=True)
    for f in os.listdir(cd):
        os.remove(os.path.join(cd, f))
    index = {}
    for i in range(CONV_N):
        name = f"conv_{i:02d}"
        marked, answers, info = make_conversation(tok, corpus, CONV_SEED + i, i)
        with open(os.path.join(cd, name + ".txt"), "w", encoding="utf-8") as f:
            f.write(marked)
        with open(os.path.join(cd, name + ".answer"), "w", encoding="utf-8") as f:
            f.write("".join(a + "\n" for a in answers))
        index[name] = info
    with open(os.path.join(cd, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    dist = {}
    for info in index.values():
        for q in info["questions"]:
            dist[q["distance"]] = dist.get(q["distance"], 0) + 1
    print(f"{len(index)} conversations in {cd}: "
          f"{min(v['tokens'] for v in index.values())}-{max(v['tokens'] for v in index.values())}"
          f" input tokens; questions by distance (turns back): "
          + ", ".join(f"{k}: {dist[k]}" for k in sorted(dist)))


def greedy_next(model, tok, ids):
    """The model's greedy next token after ids (the whole text prefilled), as stripped text."""
    torch = torch_and_train()[0]
    with torch.no_grad():
        logits = model(torch.tensor([ids]), fused=False)
    return tok.decode([int(logits[0, -1].argmax())]).strip()


def score(d):
    torch, T = torch_and_train()
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
    ap.add_argument("--write-conversations", action="store_true",
                    help="write DIR/conversations/ (needs no PyTorch)")
    ap.add_argument("--score", action="store_true")
    args = ap.parse_args()
    tok = Tokenizer()
    if args.write_prompts:
        write_prompts(args.dir, tok, Corpus(tok), args.n, args.default_prompt)
    if args.write_conversations:
        write_conversations(args.dir, tok, Corpus(tok))
    if args.score:
        score(args.dir)


if __name__ == "__main__":
    main()
