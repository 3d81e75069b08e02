#!/usr/bin/env python3
"""Generator benchmark, PyTorch side.

  torch_forward.py write DIR [--arch llama|gemma2|gemma3|qwen3moe|mixtral] [--longrope]
                                 writes a random checkpoint of that architecture (config.json
                                 and an F32 model.safetensors, about 100M parameters, fixed
                                 seed): Llama by default; Gemma 2 or Gemma 3 (below); Qwen3-MoE
                                 (q/k norms, 8 experts of 512, top 2, norm_topk_prob, layer 0
                                 dense through mlp_only_layers) or Mixtral (8 experts, top 2);
                                 --longrope adds LongRoPE scaling (original context 512, so the
                                 1024-token prompt runs on the long factors)
  torch_forward.py run DIR       runs the same forward pass as kvsim's generator in PyTorch on
                                 the CPU (weights read from DIR's safetensors file, F32, F16
                                 or BF16, computed in float32): prefill of
                                 a 1024-token prompt, then 64 greedy decode steps with a KV
                                 cache; prints tokens/s and the first generated ids

The prompt ids are the ones bench_generator uses: (i * 7919 + 13) % vocab. Needs only torch and
numpy (Debian: python3-torch); the safetensors file is parsed here. The math follows
transformers' modeling code: models/llama/modeling_llama.py, models/qwen3_moe/modeling_qwen3_moe.py
(Qwen3MoeSparseMoeBlock), models/mixtral/modeling_mixtral.py (MixtralSparseMoeBlock),
models/gemma2/modeling_gemma2.py, models/gemma3/modeling_gemma3.py and modeling_rope_utils.py
(_compute_longrope_parameters).

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
    # CONFIG turned into a Qwen3-MoE or Mixtral config of about the same size.
    "qwen3moe": {**CONFIG, "architectures": ["Qwen3MoeForCausalLM"], "head_dim": 64,
                 "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 512,
                 "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [0]},
    "mixtral": {**CONFIG, "architectures": ["MixtralForCausalLM"], "intermediate_size": 512,
                "num_local_experts": 8, "num_experts_per_tok": 2},
}
for _c in CONFIGS.values():
    if "hidden_activation" in _c:
        _c.pop("hidden_act", None)


def is_gemma(c):
    return c["architectures"][0].startswith("Gemma")


def add_longrope(c):
    """LongRoPE as Phi-3 configures it: the factor lists in rope_scaling, the pretrained context
    at the top level (factor = max_position_embeddings / original_max_position_embeddings)."""
    half = head_dim(c) // 2
    c["original_max_position_embeddings"] = 512
    c["rope_scaling"] = {"type": "longrope",
                         "short_factor": [1.0 + 0.05 * f for f in range(half)],
                         "long_factor": [1.0 + 0.5 * f for f in range(half)]}


def head_dim(c):
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def arch_of(c):
    return {"MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3moe"}.get(
        c["architectures"][0], "llama")


def is_moe_layer(c, l):
    """HF's rule: Mixtral's every layer; Qwen3MoeDecoderLayer's test."""
    arch = arch_of(c)
    if arch == "mixtral":
        return True
    return (arch == "qwen3moe" and l not in c.get("mlp_only_layers", []) and c["num_experts"] > 0
            and (l + 1) % c.get("decoder_sparse_step", 1) == 0)


def expert_names(c, l):
    """(router, [(gate, up, down) per expert], expert intermediate size) of a MoE layer."""
    p = f"model.layers.{l}."
    if arch_of(c) == "mixtral":
        pre, names, I = p + "block_sparse_moe.", ("w1", "w3", "w2"), c["intermediate_size"]
        n = c["num_local_experts"]
    else:
        pre, names, I = p + "mlp.", ("gate_proj", "up_proj", "down_proj"), c["moe_intermediate_size"]
        n = c["num_experts"]
    experts = [tuple(f"{pre}experts.{e}.{name}.weight" for name in names) for e in range(n)]
    return pre + "gate.weight", experts, I


def tensor_shapes(c):
    H, I, D = c["hidden_size"], c["intermediate_size"], head_dim(c)
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
        })
        if arch_of(c) == "qwen3moe":
            shapes.update({p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)})
        shapes[p + "post_attention_layernorm.weight"] = (H,)
        if is_moe_layer(c, l):
            router, experts, EI = expert_names(c, l)
            shapes[router] = (len(experts), H)
            for gate, up, down in experts:
                shapes.update({gate: (EI, H), up: (EI, H), down: (H, EI)})
            continue
        shapes.update({
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


def write_checkpoint(directory, arch="llama", longrope=False):
    config = json.loads(json.dumps(CONFIGS[arch]))  # a copy: add_longrope edits it
    os.makedirs(directory, exist_ok=True)
    if longrope:
        add_longrope(config)
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
        b, end = e["data_offsets"]
        data = raw[start + b:start + end].tobytes()
        if e["dtype"] == "F32":
            t = torch.from_numpy(np.frombuffer(data, dtype="<f4").copy())
        elif e["dtype"] == "F16":
            t = torch.from_numpy(np.frombuffer(data, dtype="<f2").astype(np.float32))
        elif e["dtype"] == "BF16":  # the upper half of a float32
            t = torch.from_numpy((np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32))
        else:
            raise SystemExit(f"{path}: {name}: dtype {e['dtype']} is not supported here")
        w[name] = t.reshape(e["shape"])
    return c, w


def rope_inv_freq(c, D, max_tokens):
    """inv_freq and attention_scaling as modeling_rope_utils.py computes them for the default
    type and longrope (_compute_longrope_parameters; the long factors when the sequence is longer
    than the original context, as kvsim decides for the whole run)."""
    base = c["rope_theta"]
    exponents = torch.arange(0, D, 2, dtype=torch.int64).double() / D
    scaling = c.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return 1.0 / (base ** exponents), 1.0
    if kind != "longrope":
        raise SystemExit(f"rope_scaling type {kind} is not supported here")
    factor = scaling.get("factor")
    original = c.get("original_max_position_embeddings")
    if original:
        factor = c["max_position_embeddings"] / original
    else:
        original = c["max_position_embeddings"]
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = torch.tensor(scaling["long_factor"] if max_tokens > original else scaling["short_factor"],
                       dtype=torch.float64)
    return 1.0 / (ext * base ** exponents), attention


class Llama:
    """HF's decoder math with a preallocated KV cache: LlamaForCausalLM, Qwen3-MoE's q/k norms
    and Qwen3-MoE's and Mixtral's experts; with a Gemma config, HF's Gemma2ForCausalLM /
    Gemma3ForCausalLM (see the module's docstring)."""

    def __init__(self, c, w, max_tokens):
        self.c, self.w = c, w
        self.H = c["hidden_size"]
        self.Hq, self.Hkv = c["num_attention_heads"], c["num_key_value_heads"]
        self.D = head_dim(c)
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
            self.window = [W] * L if arch in ("MistralForCausalLM", "MixtralForCausalLM") else [0] * L
        self.k_cache = torch.zeros(L, self.Hkv, max_tokens, self.D)
        self.v_cache = torch.zeros(L, self.Hkv, max_tokens, self.D)
        # RoPE cos and sin: the global layers' (with the config's scaling; HF multiplies cos and
        # sin by the attention scaling, longrope's attention factor), and Gemma 3's sliding
        # layers' from rope_local_base_freq, unscaled.
        inv_freq, attention_scaling = rope_inv_freq(c, self.D, max_tokens)
        self.tables = {"global": self.rope_table(inv_freq, attention_scaling, max_tokens)}
        if "rope_local_base_freq" in c:
            local = 1.0 / (c["rope_local_base_freq"] **
                           (torch.arange(0, self.D, 2, dtype=torch.int64).double() / self.D))
            self.tables["local"] = self.rope_table(local, 1.0, max_tokens)
        self.n = 0

    @staticmethod
    def rope_table(inv_freq, attention_scaling, max_tokens):
        angles = torch.outer(torch.arange(max_tokens, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        return (angles.cos() * attention_scaling).float(), (angles.sin() * attention_scaling).float()

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

    def mlp(self, h, l):
        w, p = self.w, f"model.layers.{l}."
        if not is_moe_layer(self.c, l):
            gate = self.linear(h, w[p + "mlp.gate_proj.weight"])
            # Gemma: GeGLU with the tanh GELU; else SwiGLU.
            gate = (torch.nn.functional.gelu(gate, approximate="tanh") if self.gemma
                    else torch.nn.functional.silu(gate))
            return self.linear(gate * self.linear(h, w[p + "mlp.up_proj.weight"]), w[p + "mlp.down_proj.weight"])
        # Qwen3MoeSparseMoeBlock / MixtralSparseMoeBlock: softmax in float32, top-k, renormalized
        # (Mixtral always, Qwen3-MoE when norm_topk_prob), experts added in ascending order.
        router, experts, _ = expert_names(self.c, l)
        probs = torch.softmax(self.linear(h, w[router]), dim=-1, dtype=torch.float)
        weights, selected = torch.topk(probs, self.c["num_experts_per_tok"], dim=-1)
        if arch_of(self.c) == "mixtral" or self.c.get("norm_topk_prob", False):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(h)
        for e, (gate, up, down) in enumerate(experts):
            rows, slots = torch.where(selected == e)
            if len(rows) == 0:
                continue
            x = h[rows]
            y = self.linear(torch.nn.functional.silu(self.linear(x, w[gate])) * self.linear(x, w[up]), w[down])
            out.index_add_(0, rows, y * weights[rows, slots, None])
        return out

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
            if p + "self_attn.q_norm.weight" in w:  # Qwen3, Gemma 3: RMSNorm over each head before RoPE
                q = self.rmsnorm(q, w[p + "self_attn.q_norm.weight"])
                k = self.rmsnorm(k, w[p + "self_attn.k_norm.weight"])
            v = self.linear(h, w[p + "self_attn.v_proj.weight"]).view(n, self.Hkv, self.D).transpose(0, 1)
            local = self.window[l] > 0 and "local" in self.tables
            cos, sin = self.tables["local" if local else "global"]
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
            x = x + out
            h = self.rmsnorm(x, w[p + ("pre_feedforward_layernorm.weight" if self.gemma
                                       else "post_attention_layernorm.weight")])
            mlp = self.mlp(h, l)
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
    ap.add_argument("--longrope", action="store_true",
                    help="write: add LongRoPE scaling (original context 512)")
    a = ap.parse_args()
    if a.action == "write":
        write_checkpoint(a.dir, a.arch, a.longrope)
    else:
        run(a.dir, a.prompt, a.decode, a.threads)


if __name__ == "__main__":
    main()
