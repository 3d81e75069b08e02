#!/usr/bin/env python3
"""Generator benchmark, PyTorch side.

  torch_forward.py write DIR [--arch llama|gemma2|gemma3]
                                 writes a random checkpoint of that architecture (config.json
                                 and an F32 model.safetensors, about 100M parameters, fixed seed)
  torch_forward.py run DIR       runs the same forward pass as kvsim's generator in PyTorch on
                                 the CPU (weights read from DIR's safetensors file): prefill of
                                 a 1024-token prompt, then 64 greedy decode steps with a KV
                                 cache; prints tokens/s and the first generated ids

The prompt ids are the ones bench_generator uses: (i * 7919 + 13) % vocab. Needs only torch and
numpy (Debian: python3-torch); the safetensors file is parsed here.

Gemma 2 and Gemma 3 follow transformers' modeling_gemma2.py / modeling_gemma3.py: RMSNorm
scaled by (1 + w), norms around the attention and MLP outputs, GeGLU (gelu tanh), embeddings
times sqrt(hidden), scale query_pre_attn_scalar^-1/2, sliding-window layers (Gemma 2: every
other from layer 0; Gemma 3: all but every sliding_window_pattern-th), attention-logit and
final-logit soft-capping (Gemma 2), q/k norms and the local RoPE base for sliding layers
(Gemma 3). The random checkpoints' windows (512) are shorter than the prompt, so the sliding
layers' masks matter.
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


GEMMA = {"hidden_activation": "gelu_pytorch_tanh", "head_dim": 64, "query_pre_attn_scalar": 64,
         "sliding_window": 512, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}
CONFIGS = {
    "llama": CONFIG,
    "gemma2": {**CONFIG, **GEMMA, "architectures": ["Gemma2ForCausalLM"],
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "gemma3": {**CONFIG, **GEMMA, "architectures": ["Gemma3ForCausalLM"], "rope_theta": 1e6,
               "rope_local_base_freq": 10000.0, "sliding_window_pattern": 6,
               "attn_logit_softcapping": None, "final_logit_softcapping": None},
}
for _c in CONFIGS.values():
    if "hidden_activation" in _c:
        _c.pop("hidden_act", None)


def is_gemma(c):
    return c["architectures"][0].startswith("Gemma")


def tensor_shapes(c):
    H, I = c["hidden_size"], c["intermediate_size"]
    D = c.get("head_dim") or H // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * D, c["num_key_value_heads"] * D
    gemma, gemma3 = is_gemma(c), c["architectures"][0].startswith("Gemma3")
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
        if gemma:
            shapes[p + "pre_feedforward_layernorm.weight"] = (H,)
            shapes[p + "post_feedforward_layernorm.weight"] = (H,)
        if gemma3:
            shapes[p + "self_attn.q_norm.weight"] = (D,)
            shapes[p + "self_attn.k_norm.weight"] = (D,)
    shapes["model.norm.weight"] = (H,)
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], H)
    return shapes


def write_checkpoint(directory, arch):
    config = CONFIGS[arch]
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    rng = np.random.default_rng(1)
    header, blobs, offset = {}, [], 0
    norm_mean = 0.0 if is_gemma(config) else 1.0  # Gemma stores w of a (1 + w) scale
    for name, shape in tensor_shapes(config).items():
        if len(shape) == 1:
            data = norm_mean + 0.1 * rng.standard_normal(shape, dtype=np.float32)
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
    params = sum(int(np.prod(s)) for s in tensor_shapes(config).values())
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
    """HF LlamaForCausalLM's math with a preallocated KV cache; with a Gemma config, HF's
    Gemma2ForCausalLM / Gemma3ForCausalLM (see the module's docstring)."""

    def __init__(self, c, w, max_tokens):
        self.c, self.w = c, w
        self.H = c["hidden_size"]
        self.Hq, self.Hkv = c["num_attention_heads"], c["num_key_value_heads"]
        self.D = c.get("head_dim") or self.H // self.Hq
        self.eps = c["rms_norm_eps"]
        L = c["num_hidden_layers"]
        arch = c["architectures"][0]
        self.gemma, self.gemma3 = is_gemma(c), arch.startswith("Gemma3")
        self.unit = 1.0 if self.gemma else 0.0  # RMSNorm: x * (unit + w)
        self.scale = c.get("query_pre_attn_scalar", self.D) ** -0.5 if self.gemma else self.D ** -0.5
        self.attn_cap = c.get("attn_logit_softcapping") if arch.startswith("Gemma2") else None
        self.final_cap = c.get("final_logit_softcapping") if self.gemma else None
        # Each layer's window (transformers' default layer_types), 0 = global.
        W = c.get("sliding_window") or 0
        if arch.startswith("Gemma2"):
            self.window = [W if (l + 1) % 2 else 0 for l in range(L)]
        elif self.gemma3:
            self.window = [W if (l + 1) % c.get("sliding_window_pattern", 6) else 0 for l in range(L)]
        else:
            self.window = [W] * L if arch == "MistralForCausalLM" else [0] * L
        self.k_cache = torch.zeros(L, self.Hkv, max_tokens, self.D)
        self.v_cache = torch.zeros(L, self.Hkv, max_tokens, self.D)
        self.tables = {}  # RoPE cos and sin per base
        for base in {c["rope_theta"], c.get("rope_local_base_freq", c["rope_theta"])}:
            inv_freq = 1.0 / (base ** (torch.arange(0, self.D, 2, dtype=torch.float64) / self.D))
            angles = torch.outer(torch.arange(max_tokens, dtype=torch.float64), inv_freq)
            angles = torch.cat([angles, angles], dim=-1)
            self.tables[base] = (angles.cos().float(), angles.sin().float())
        self.n = 0

    def rmsnorm(self, x, weight):
        return (self.unit + weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

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

    def mask(self, T0, n, window):
        """0 where query T0 + i may attend key j (j <= T0 + i, and T0 + i - j < window when
        window > 0), else -inf."""
        i = torch.arange(T0, T0 + n).unsqueeze(1)
        j = torch.arange(T0 + n).unsqueeze(0)
        allowed = (j <= i) & ((i - j < window) if window > 0 else True)
        return torch.zeros(n, T0 + n).masked_fill(~allowed, float("-inf"))

    def forward(self, tokens):
        w, T0, n, c = self.w, self.n, len(tokens), self.c
        pos = slice(T0, T0 + n)
        x = w["model.embed_tokens.weight"][tokens]
        if self.gemma:
            x = x * torch.tensor(self.H ** 0.5, dtype=x.dtype)
        masks = {W: self.mask(T0, n, W) for W in set(self.window)}
        for l in range(c["num_hidden_layers"]):
            p = f"model.layers.{l}."
            h = self.rmsnorm(x, w[p + "input_layernorm.weight"])
            q = self.linear(h, w[p + "self_attn.q_proj.weight"]).view(n, self.Hq, self.D).transpose(0, 1)
            k = self.linear(h, w[p + "self_attn.k_proj.weight"]).view(n, self.Hkv, self.D).transpose(0, 1)
            v = self.linear(h, w[p + "self_attn.v_proj.weight"]).view(n, self.Hkv, self.D).transpose(0, 1)
            if self.gemma3:
                q = self.rmsnorm(q, w[p + "self_attn.q_norm.weight"])
                k = self.rmsnorm(k, w[p + "self_attn.k_norm.weight"])
            local = self.window[l] > 0 and "rope_local_base_freq" in c
            cos, sin = self.tables[c["rope_local_base_freq"] if local else c["rope_theta"]]
            cos, sin = cos[pos], sin[pos]
            q = q * cos + self.rotate_half(q) * sin
            k = k * cos + self.rotate_half(k) * sin
            self.k_cache[l, :, pos] = k
            self.v_cache[l, :, pos] = v
            keys = self.k_cache[l, :, :T0 + n].repeat_interleave(self.Hq // self.Hkv, dim=0)
            values = self.v_cache[l, :, :T0 + n].repeat_interleave(self.Hq // self.Hkv, dim=0)
            scores = q @ keys.transpose(1, 2) * self.scale
            if self.attn_cap:
                scores = torch.tanh(scores / self.attn_cap) * self.attn_cap
            attn = torch.softmax(scores + masks[self.window[l]], dim=-1) @ values
            out = self.linear(attn.transpose(0, 1).reshape(n, -1), w[p + "self_attn.o_proj.weight"])
            if self.gemma:
                out = self.rmsnorm(out, w[p + "post_attention_layernorm.weight"])
                h = self.rmsnorm(x + out, w[p + "pre_feedforward_layernorm.weight"])
                act = torch.nn.functional.gelu(self.linear(h, w[p + "mlp.gate_proj.weight"]),
                                               approximate="tanh")
            else:
                h = self.rmsnorm(x + out, w[p + "post_attention_layernorm.weight"])
                act = torch.nn.functional.silu(self.linear(h, w[p + "mlp.gate_proj.weight"]))
            x = x + out
            mlp = self.linear(act * self.linear(h, w[p + "mlp.up_proj.weight"]), w[p + "mlp.down_proj.weight"])
            if self.gemma:
                mlp = self.rmsnorm(mlp, w[p + "post_feedforward_layernorm.weight"])
            x = x + mlp
        self.n += n
        last = self.rmsnorm(x[-1], w["model.norm.weight"])
        head = w["model.embed_tokens.weight"] if c["tie_word_embeddings"] else w["lm_head.weight"]
        logits = head @ last
        if self.final_cap:
            logits = torch.tanh(logits / self.final_cap) * self.final_cap
        return logits


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
    ap.add_argument("--arch", choices=sorted(CONFIGS), default="llama",
                    help="write: the architecture of the random checkpoint")
    a = ap.parse_args()
    if a.action == "write":
        write_checkpoint(a.dir, a.arch)
    else:
        run(a.dir, a.prompt, a.decode, a.threads)


if __name__ == "__main__":
    main()
