#!/usr/bin/env python3
"""Train kvsim's tiny retrieval model: a small Llama-architecture causal LM.

The model learns to answer questions about key->value facts planted at random depths in long
documents of filler prose. A fact puts the value right after the key ("Note: Lisbon 384.") and
a question repeats the fact's opening up to the key ("Note: Lisbon"), so the answer (" 384") is
the token that followed the same three tokens earlier in the context: induction (a
previous-token head feeding an induction/retrieval head). Training starts with copy sequences
and dense associative recall on short sequences, which make that circuit form within about a
thousand steps, and grows to ~4200-token documents.
The task makes the model grow the attention structure eviction policies care about: an
attention sink on the first token, local (previous-token) heads and long-range retrieval heads.

Everything is generated and built here: the corpus and a byte-level BPE tokenizer in which
every key, value and filler word is a single token (corpus.py, which needs no PyTorch), the
model (RMSNorm, RoPE in the rotate_half layout, grouped-query attention, SwiGLU, no biases, tied
or untied embeddings) and an exporter that writes a Hugging Face style directory (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json).

Needs only PyTorch (1.13 or newer; CPU is enough) and the Python standard library.

The shipped model (two stages, 33 minutes on one CPU core; models/README.md says why):

    python3 models/train.py --minutes 48 --lr 3e-3 --untie --eval-every 50 --threads 1 \
        --copy-kind mix --out stage1 --ckpt stage1.pt --stop-after p2048
    python3 models/train.py --init stage1.pt.p2048 --start-phase 3 --minutes 25 --lr 1e-3 \
        --warmup 20 --untie --eval-every 50 --threads 1 --copy-kind mix --stop-after p2048

    python3 models/train.py --smoke 2       # two steps per phase, to test the script
"""

import argparse
import contextlib
import json
import math
import os
import random
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from corpus import (  # noqa: E402,F401  (word lists, tokenizer and corpus: T.Tokenizer etc.)
    ADJECTIVES, ADVERBS, BOS_TOKEN, BYTE_DEC, BYTE_ENC, CITIES, EOS_TOKEN, FUNCTION_WORDS,
    NOUNS, PREPS, SPACE, SPLIT_RE, STARTERS, VALUES, VERBS_I, VERBS_T, Corpus, Tokenizer,
    bytes_to_unicode)


# --------------------------------------------------------------------------------------------
# Model: Llama architecture, matching Hugging Face's LlamaForCausalLM numerics.
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dt)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope_cos_sin(T, head_dim, theta, device, offset=0):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    pos = torch.arange(offset, offset + T, device=device).float()
    f = torch.outer(pos, inv)
    emb = torch.cat((f, f), dim=-1)
    return emb.cos(), emb.sin()


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.nh, self.nkv, self.hd = c["num_attention_heads"], c["num_key_value_heads"], \
            c["head_dim"]
        d = c["hidden_size"]
        self.q_proj = nn.Linear(d, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, d, bias=False)

    def forward(self, x, cos, sin, fused=True, want_probs=False):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.nh // self.nkv
        k = k.repeat_interleave(rep, dim=1)  # head h reads KV head h // rep (HF repeat_kv)
        v = v.repeat_interleave(rep, dim=1)
        probs = None
        if fused and not want_probs and hasattr(F, "scaled_dot_product_attention"):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.hd))
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            s = s.masked_fill(mask, float("-inf"))
            probs = torch.softmax(s.float(), dim=-1).to(q.dtype)
            y = probs @ v
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.hd)
        return self.o_proj(y), probs


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, i = c["hidden_size"], c["intermediate_size"]
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, fused=True, want_probs=False):
        a, p = self.self_attn(self.input_layernorm(x), cos, sin, fused, want_probs)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, p


class Inner(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList([Layer(c) for _ in range(c["num_hidden_layers"])])
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])


class LlamaLM(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.model = Inner(c)
        if not c["tie_word_embeddings"]:
            self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)

    def init_weights(self, seed):
        g = torch.Generator().manual_seed(seed)
        L = self.c["num_hidden_layers"]
        for name, p in self.named_parameters():
            if p.dim() == 1:
                continue
            std = 0.02
            if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                std = 0.02 / math.sqrt(2 * L)
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * std)

    def hidden(self, ids):
        """Final-norm hidden states (B, T, d)."""
        T = ids.shape[1]
        cos, sin = rope_cos_sin(T, self.c["head_dim"], self.c["rope_theta"], ids.device)
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x, _ = layer(x, cos, sin, False, False)
        return self.model.norm(x)

    def unembed(self, x):
        w = self.model.embed_tokens.weight if self.c["tie_word_embeddings"] else \
            self.lm_head.weight
        return x @ w.t()

    def forward(self, ids, fused=True, want_probs=False):
        T = ids.shape[1]
        cos, sin = rope_cos_sin(T, self.c["head_dim"], self.c["rope_theta"], ids.device)
        x = self.model.embed_tokens(ids)
        probs = []
        for layer in self.model.layers:
            x, p = layer(x, cos, sin, fused, want_probs)
            probs.append(p)
        x = self.model.norm(x)
        w = self.model.embed_tokens.weight if self.c["tie_word_embeddings"] else \
            self.lm_head.weight
        logits = x @ w.to(x.dtype).t()
        return (logits, probs) if want_probs else logits


def make_config(tok, args):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": float(args.rope_theta),
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "vocab_size": len(tok),
        "max_position_embeddings": args.max_pos,
        "tie_word_embeddings": not args.untie,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float16",
    }


# --------------------------------------------------------------------------------------------
# safetensors, written and read by hand.
# --------------------------------------------------------------------------------------------

ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
ST_BACK = {v: k for k, v in ST_DTYPES.items()}


def save_safetensors(path, tensors):
    header = {"__metadata__": {"format": "pt"}}
    blobs = []
    off = 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        # raw little-endian bytes; bf16 goes through int16 since numpy has no bfloat16
        raw = t.view(torch.int16).numpy().tobytes() if t.dtype in (torch.float16,
                                                                   torch.bfloat16) \
            else t.numpy().tobytes()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for raw in blobs:
            f.write(raw)


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        dt = ST_BACK[info["dtype"]]
        buf = bytearray(data[a:b])
        if dt == torch.float32:
            t = torch.frombuffer(buf, dtype=torch.float32)
        else:
            t = torch.frombuffer(buf, dtype=torch.int16).view(dt)
        out[name] = t.reshape(info["shape"]).clone()
    return out


def export(model, tok, out_dir, dtype=torch.float16):
    os.makedirs(out_dir, exist_ok=True)
    c = dict(model.c)
    c["torch_dtype"] = "float16" if dtype == torch.float16 else "bfloat16"
    tensors = {k: v.to(dtype) for k, v in model.state_dict().items()}
    save_safetensors(os.path.join(out_dir, "model.safetensors"), tensors)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    tok.save(out_dir)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                   "do_sample": False}, f, indent=2)


def load_exported(d, device="cpu"):
    """Loads config.json + model.safetensors (to float32) + tokenizer.json from d."""
    with open(os.path.join(d, "config.json")) as f:
        c = json.load(f)
    m = LlamaLM(c)
    sd = load_safetensors(os.path.join(d, "model.safetensors"))
    m.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    m.eval().to(device)
    return m, Tokenizer.load(d)


def copy_sequence(corpus, r, T, fact_runs):
    """A copy sequence of at most T + 1 ids and the indices of its answer tokens: BOS, a run,
    other material, the same run again. Every key or value of the repeat (after its first
    token) is an answer: it can only be predicted by finding the same context earlier and
    copying what followed (an induction head). Run length and gap vary, so that no fixed
    offset predicts the repeat.

    fact_runs=False: the run is random keys and values (every position an answer).
    fact_runs=True: the run is facts "Note: <key> <value>." with an occasional filler sentence,
    keys drawn without replacement: the tokens that every fact shares (" Note", ":", ".") occur
    all over the sequence, so the circuit must match on the key, as a question needs, rather
    than on whatever token happens to precede it."""
    if fact_runs:
        keys = r.sample(corpus.city, min(len(corpus.city), T // 4 + 2))

        def material(n):
            out = []
            while len(out) < n:
                if keys and (not out or r.random() < 0.85):
                    out += corpus.fact(keys.pop(), r.choice(corpus.value))
                else:
                    out += corpus.sentence(r)
            return out
    else:
        pool = corpus.city + corpus.value

        def material(n):
            return [r.choice(pool) for _ in range(n)]
    run = r.randint(6, max(6, min(T // 2 - 1, 48)))
    gap = r.randint(0, max(0, min(T - 2 * run, 4 * run)))
    seq = material(run)[:run]
    ids = [corpus.tok.bos_id] + seq + material(gap)[:gap] + seq
    start = 1 + run + gap
    targets = [i for i in range(start + 1, len(ids)) if not fact_runs or
               ids[i] in corpus.random_ids]
    return ids, targets


def make_batch(corpus, r, B, T, facts_lo, facts_hi, copy_frac=0.0, copy_kind="mix"):
    """B documents cropped/padded to exactly T tokens; masks mark answer targets and the other
    targets that carry LM loss (keys and values are random draws: no loss on them).

    The first round(B * copy_frac) rows are copy sequences instead of documents (see
    copy_sequence; copy_kind "runs", "facts" or "mix", alternating): the circuit a question
    needs, with an answer at almost every position instead of a handful per document. It makes
    the circuit form in about a thousand steps where documents alone leave the model on a
    plateau for thousands."""
    x = torch.zeros(B, T + 1, dtype=torch.long)
    is_ans = torch.zeros(B, T, dtype=torch.bool)
    valid = torch.zeros(B, T, dtype=torch.bool)
    n_copy = int(round(B * copy_frac))
    for b in range(n_copy):
        ids, targets = copy_sequence(corpus, r, T, fact_runs=(b % 2 == 1) if copy_kind == "mix"
                                     else copy_kind == "facts")
        ids = ids[:T + 1]
        x[b, :len(ids)] = torch.tensor(ids)
        for i in targets:
            if i <= T:
                is_ans[b, i - 1] = True
    for b in range(n_copy, B):
        nf = r.randint(facts_lo, facts_hi)
        ids, ans, _, _, _, _ = corpus.document(r, T + 1, nf, nf)
        ids = ids[:T + 1]
        n = len(ids)
        x[b, :n] = torch.tensor(ids)
        valid[b, :n - 1] = True
        for i in range(1, n):
            if ids[i] in corpus.random_ids:
                valid[b, i - 1] = False
        for a in ans:
            if a < n:
                is_ans[b, a - 1] = True
    return x[:, :-1], x[:, 1:], is_ans, valid


# --------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------

# Curriculum: (name, seq_len, batch, facts_lo, facts_hi, copy_frac, max_minutes, min_minutes,
# advance_acc). copy_frac: share of each batch that is copy sequences (see make_batch).
# A phase ends when the answer accuracy on its held-out batch reaches advance_acc (checked
# every --eval-every steps), after max_minutes, or when only the later phases' min_minutes
# are left of the time budget. The last phase runs to the end of the budget, with the learning
# rate decaying along a cosine (by time) to 10%.
PHASES = [
    ("p64", 64, 64, 4, 6, 0.5, 12.0, 0.0, 0.97),
    ("p192", 192, 32, 8, 14, 0.25, 8.0, 1.5, 0.95),
    ("p768", 768, 8, 10, 20, 0.0, 8.0, 3.0, 0.95),
    ("p2048", 2048, 2, 12, 24, 0.0, 10.0, 5.0, 0.95),
    ("p4200", 4200, 1, 12, 24, 0.0, 1e9, 8.0, None),
]


def evaluate(model, batch):
    x, y, is_ans, _ = batch
    model.eval()
    with torch.no_grad():
        logits = model(x, fused=False)
    model.train()
    n = is_ans.sum().clamp(min=1)
    return (((logits.argmax(-1) == y) & is_ans).sum() / n).item()


def train(args):
    names = [p[0] for p in PHASES]
    if args.stop_after and args.stop_after not in names:
        sys.exit(f"train.py: --stop-after {args.stop_after}: no such phase (phases: "
                 f"{', '.join(names)})")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tok = Tokenizer()
    corpus = Corpus(tok)
    c = make_config(tok, args)
    model = LlamaLM(c)
    model.init_weights(args.seed)
    if args.init:
        model.load_state_dict(torch.load(args.init)["model"])
    if args.group_init:
        # a shared direction for all keys and one for all values, of the size of a row: the
        # heads that must find "a key" or "a value" need not wait for 1170 rare rows to learn
        # it one by one
        g = torch.Generator().manual_seed(args.seed + 99)
        E = model.model.embed_tokens.weight
        with torch.no_grad():
            rn = E.norm(dim=1).mean()
            for group in (corpus.city, corpus.value):
                v = torch.randn(E.shape[1], generator=g)
                E[group] += v / v.norm() * rn * args.group_init
    nparams = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tok)}  params {nparams}  ({nparams * 2 / 1e6:.2f} MB as F16)", flush=True)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed_tokens" not in n else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    budget = args.minutes * 60.0
    t0 = time.time()
    step = 0
    phases = [list(p) for p in PHASES]
    for i, m in enumerate(args.phase_minutes or []):
        phases[i][6] = m
    phases = [tuple(p) for p in phases[args.start_phase:]]
    summary = []
    for pi, (name, T, B, flo, fhi, copy_frac, max_min, _, adv) in enumerate(phases):
        is_final = pi == len(phases) - 1
        reserve = sum(p[7] for p in phases[pi + 1:]) * 60.0
        tp = time.time()
        er = random.Random(args.seed * 7919 + 17 + args.start_phase + pi)
        n_eval = max(2, 64 // B) if T <= 1024 else 2
        evb = make_batch(corpus, er, n_eval * B if T <= 1024 else n_eval, T, flo, fhi)
        r = random.Random(args.seed * 1000003 + args.start_phase + pi)
        ps = 0
        la_sum = ll_sum = acc_sum = 0.0
        k = 0
        ev = 0.0
        final_t0 = time.time()
        while True:
            now = time.time()
            if is_final:
                p = min(1.0, (now - final_t0) / max(1.0, budget - (final_t0 - t0)))
                lr = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
            else:
                lr = args.lr * min(1.0, (step + 1) / args.warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y, is_ans, valid = make_batch(corpus, r, B, T, flo, fhi, copy_frac,
                                             args.copy_kind)
            # logits only where a loss is taken: every answer, and a random share
            # (--lm-sample) of the other tokens (the output layer dominates the step time)
            other = valid & ~is_ans & (torch.rand(B, T) < args.lm_sample)
            h = model.hidden(x)
            la_ = model.unembed(h[is_ans])
            l_ans = F.cross_entropy(la_, y[is_ans])
            l_lm = F.cross_entropy(model.unembed(h[other]), y[other]) if other.any() else \
                torch.zeros(())
            loss = l_ans + args.lm_weight * l_lm
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                acc_sum += (la_.argmax(-1) == y[is_ans]).float().mean().item()
            la_sum += l_ans.item()
            ll_sum += l_lm.item()
            k += 1
            step += 1
            ps += 1
            elapsed = time.time() - t0
            stop = elapsed >= budget or (args.smoke and ps >= args.smoke)
            if not is_final and (time.time() - tp >= max_min * 60 or
                                 elapsed >= budget - reserve):
                stop = True
            if ps % args.eval_every == 0 or stop:
                ev = evaluate(model, evb)
                print(f"step {step:5d} {name} {ps:5d} T={T} B={B} lr {lr:.2e} "
                      f"ans_loss {la_sum / k:.3f} lm_loss {ll_sum / k:.3f} "
                      f"train_acc {acc_sum / k:.3f} heldout_acc {ev:.3f}  "
                      f"{(time.time() - tp) / ps:.2f}s/step  {elapsed:.0f}s", flush=True)
                la_sum = ll_sum = acc_sum = 0.0
                k = 0
                if adv is not None and ev >= adv:
                    print(f"phase {name}: held-out answer accuracy {ev:.3f} >= {adv}, "
                          f"advancing", flush=True)
                    stop = True
            if is_final and args.save_every and ps % args.save_every == 0:
                save(model, tok, args, step)
            if stop:
                break
        summary.append((name, T, B, ps, round(time.time() - tp), round(ev, 3)))
        print(f"phase {name} done: {ps} steps in {time.time() - tp:.0f}s", flush=True)
        save(model, tok, args, step, phase=name)
        if time.time() - t0 >= budget or name == args.stop_after:
            break
    print(f"training took {time.time() - t0:.0f}s ({step} steps)")
    print("phases (name, T, batch, steps, seconds, held-out answer accuracy):")
    for srow in summary:
        print("  ", srow)
    return model, tok


def save(model, tok, args, step, phase=None):
    """Exports to --out; with --ckpt, also a float32 checkpoint there, and at the end of a
    phase a copy named after it (CKPT.p2048) that later exports do not overwrite."""
    if args.ckpt:
        ck = {"model": model.state_dict(), "step": step, "config": model.c}
        torch.save(ck, args.ckpt)
        if phase:
            torch.save(ck, f"{args.ckpt}.{phase}")
    export(model, tok, args.out)
    print(f"step {step}: exported to {args.out}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "tiny-retrieval"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--rope-theta", type=float, default=100000.0)
    ap.add_argument("--max-pos", type=int, default=4608)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--lm-weight", type=float, default=0.1,
                    help="weight of the mean loss on non-answer tokens (answers weigh 1)")
    ap.add_argument("--minutes", type=float, default=48.0, help="training time budget")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--save-every", type=int, default=200,
                    help="export every this many steps of the last phase")
    ap.add_argument("--start-phase", type=int, default=0)
    ap.add_argument("--phase-minutes", type=float, nargs="*", default=None,
                    help="override the max_minutes of the first phases")
    ap.add_argument("--untie", action="store_true", help="separate lm_head (untied embeddings)")
    ap.add_argument("--lm-sample", type=float, default=0.25,
                    help="share of the non-answer tokens that carry LM loss in a step")
    ap.add_argument("--group-init", type=float, default=0.0,
                    help="add a shared direction of this relative size to the embeddings of "
                         "all keys and of all values (0: off)")
    ap.add_argument("--copy-kind", choices=("runs", "facts", "mix"), default="mix",
                    help="copy sequences of random keys and values, of facts, or both "
                         "(alternating)")
    ap.add_argument("--stop-after", default=None, metavar="PHASE",
                    help="end training after this phase (e.g. p2048) instead of running on")
    ap.add_argument("--init", default=None, help="start from this --ckpt file")
    ap.add_argument("--smoke", type=int, default=0, help="run only this many steps per phase")
    ap.add_argument("--ckpt", default=None, help="also save a float32 checkpoint here")
    args = ap.parse_args()
    train(args)


if __name__ == "__main__":
    main()
