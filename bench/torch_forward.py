#!/usr/bin/env python3
"""Generator benchmark, PyTorch side.

  torch_forward.py write DIR     writes a random Llama-architecture checkpoint (config.json and
                                 an F32 model.safetensors, about 100M parameters, fixed seed)
  torch_forward.py run DIR       runs the same forward pass as kvsim's generator in PyTorch on
                                 the CPU (weights read from DIR's safetensors file): prefill of
                                 a 1024-token prompt, then 64 greedy decode steps with a KV
                                 cache; prints tokens/s and the first generated ids

The prompt ids are the ones bench_generator uses: (i * 7919 + 13) % vocab. Needs only torch and
numpy (Debian: python3-torch); the safetensors file is parsed here.
"""
import argparse
import json
import math
import os
import struct
import time

import numpy as np
import torch

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_act": "silu",
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def tensor_shapes(c):
    H, I, D = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * D, c["num_key_value_heads"] * D
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], H)}
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        shapes.update({
            p + "input_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (q, H),
            p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.v_proj.weight": (kv, H),
            p + "self_attn.o_proj.weight": (H, q),
            p + "post_attention_layernorm.weight": (H,),
            p + "mlp.gate_proj.weight": (I, H),
            p + "mlp.up_proj.weight": (I, H),
            p + "mlp.down_proj.weight": (H, I),
        })
    shapes["model.norm.weight"] = (H,)
    shapes["lm_head.weight"] = (c["vocab_size"], H)
    return shapes


def write_checkpoint(directory):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    rng = np.random.default_rng(1)
    header, blobs, offset = {}, [], 0
    for name, shape in tensor_shapes(CONFIG).items():
        if len(shape) == 1:
            data = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            data = rng.standard_normal(shape, dtype=np.float32) / math.sqrt(shape[1])
        raw = data.astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)
    params = sum(int(np.prod(s)) for s in tensor_shapes(CONFIG).values())
    print(f"wrote {directory}: {params / 1e6:.1f}M parameters")


def load(directory):
    with open(os.path.join(directory, "config.json")) as f:
        c = json.load(f)
    path = os.path.join(directory, "model.safetensors")
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    n = struct.unpack("<Q", raw[:8].tobytes())[0]
    header = json.loads(raw[8:8 + n].tobytes())
    start = 8 + n
    w = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if e["dtype"] != "F32":
            raise SystemExit(f"{path}: {name}: only F32 is supported here")
        b, end = e["data_offsets"]
        w[name] = torch.from_numpy(
            np.frombuffer(raw[start + b:start + end].tobytes(), dtype="<f4").reshape(e["shape"]).copy())
    return c, w


class Llama:
    """HF LlamaForCausalLM's math with a preallocated KV cache."""

    def __init__(self, c, w, max_tokens):
        self.c, self.w = c, w
        self.H = c["hidden_size"]
        self.Hq, self.Hkv = c["num_attention_heads"], c["num_key_value_heads"]
        self.D = self.H // self.Hq
        self.eps = c["rms_norm_eps"]
        L = c["num_hidden_layers"]
        self.k_cache = torch.zeros(L, self.Hkv, max_tokens, self.D)
        self.v_cache = torch.zeros(L, self.Hkv, max_tokens, self.D)
        inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(0, self.D, 2, dtype=torch.float64) / self.D))
        angles = torch.outer(torch.arange(max_tokens, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.cos, self.sin = angles.cos().float(), angles.sin().float()
        self.n = 0

    def rmsnorm(self, x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    @staticmethod
    def linear(x, weight):
        # One row: matrix-vector product. torch 1.13's x @ W.T with one row takes a path ~4x
        # slower than W @ x here; the decode comparison gives PyTorch its fast path.
        if x.shape[0] == 1:
            return (weight @ x[0]).unsqueeze(0)
        return x @ weight.T

    @staticmethod
    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)

    def forward(self, tokens):
        w, T0, n = self.w, self.n, len(tokens)
        pos = slice(T0, T0 + n)
        x = w["model.embed_tokens.weight"][tokens]
        mask = torch.full((n, T0 + n), float("-inf")).triu(T0 + 1)
        for l in range(self.c["num_hidden_layers"]):
            p = f"model.layers.{l}."
            h = self.rmsnorm(x, w[p + "input_layernorm.weight"])
            q = self.linear(h, w[p + "self_attn.q_proj.weight"]).view(n, self.Hq, self.D).transpose(0, 1)
            k = self.linear(h, w[p + "self_attn.k_proj.weight"]).view(n, self.Hkv, self.D).transpose(0, 1)
            v = self.linear(h, w[p + "self_attn.v_proj.weight"]).view(n, self.Hkv, self.D).transpose(0, 1)
            cos, sin = self.cos[pos], self.sin[pos]
            q = q * cos + self.rotate_half(q) * sin
            k = k * cos + self.rotate_half(k) * sin
            self.k_cache[l, :, pos] = k
            self.v_cache[l, :, pos] = v
            keys = self.k_cache[l, :, :T0 + n].repeat_interleave(self.Hq // self.Hkv, dim=0)
            values = self.v_cache[l, :, :T0 + n].repeat_interleave(self.Hq // self.Hkv, dim=0)
            scores = q @ keys.transpose(1, 2) / math.sqrt(self.D) + mask
            attn = torch.softmax(scores, dim=-1) @ values
            x = x + self.linear(attn.transpose(0, 1).reshape(n, -1), w[p + "self_attn.o_proj.weight"])
            h = self.rmsnorm(x, w[p + "post_attention_layernorm.weight"])
            gate = torch.nn.functional.silu(self.linear(h, w[p + "mlp.gate_proj.weight"]))
            x = x + self.linear(gate * self.linear(h, w[p + "mlp.up_proj.weight"]), w[p + "mlp.down_proj.weight"])
        self.n += n
        last = self.rmsnorm(x[-1], w["model.norm.weight"])
        return w["lm_head.weight"] @ last


def run(directory, n_prompt, n_decode, threads):
    torch.set_num_threads(threads)
    c, w = load(directory)
    prompt = [(i * 7919 + 13) % c["vocab_size"] for i in range(n_prompt)]
    model = Llama(c, w, n_prompt + n_decode)
    generated = []
    with torch.no_grad():
        start = time.perf_counter()
        logits = model.forward(torch.tensor(prompt))
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(n_decode):
            generated.append(int(torch.argmax(logits)))
            logits = model.forward(torch.tensor(generated[-1:]))
        decode = time.perf_counter() - start
    print(f"torch {torch.__version__}, {threads} threads")
    print(f"torch prefill: {n_prompt} tokens in {prefill:.3f} s = {n_prompt / prefill:.1f} tok/s")
    print(f"torch decode: {n_decode} tokens in {decode:.3f} s = {n_decode / decode:.1f} tok/s")
    print("torch first generated ids:", " ".join(map(str, generated[:8])))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["write", "run"])
    ap.add_argument("dir")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    if a.action == "write":
        write_checkpoint(a.dir)
    else:
        run(a.dir, a.prompt, a.decode, a.threads)


if __name__ == "__main__":
    main()
