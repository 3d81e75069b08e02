#!/usr/bin/env python3
"""The corpus and the tokenizer of kvsim's tiny retrieval model, without PyTorch.

Word lists, a byte-level BPE tokenizer in which every key, value and filler word is a single
token (Tokenizer, which also writes tokenizer.json and tokenizer_config.json), and the document
generator (Corpus: filler prose with facts "Note: <city> <ddd>." planted at random depths, then
questions "Note: <city>" answered by the code). train.py trains on these documents; eval.py
writes held-out prompts and conversations from them, which needs only the standard library.
"""

import json
import os
import re


# --------------------------------------------------------------------------------------------
# Word lists. Every word is a single token of the tokenizer built below.
# --------------------------------------------------------------------------------------------

CITIES = """
Lisbon Porto Madrid Seville Valencia Bilbao Malaga Granada Toledo Cadiz Paris Lyon Marseille
Nice Toulouse Bordeaux Nantes Lille Rennes Dijon Grenoble Reims Brest Rome Milan Naples Turin
Florence Venice Genoa Bologna Verona Palermo Bari Pisa Parma Siena Trieste Berlin Munich
Hamburg Cologne Dresden Leipzig Bremen Hanover Stuttgart Frankfurt Bonn Kiel Mainz Vienna Graz
Salzburg Linz Zurich Geneva Basel Bern Lausanne Lucerne Brussels Antwerp Ghent Bruges Liege
Amsterdam Rotterdam Utrecht Leiden Delft Groningen London Leeds Bristol York Oxford Cambridge
Glasgow Edinburgh Dublin Cork Galway Belfast Cardiff Swansea Oslo Bergen Stockholm Uppsala Malmo
Copenhagen Aarhus Helsinki Turku Tampere Reykjavik Warsaw Krakow Gdansk Poznan Prague Brno Bratislava
Budapest Szeged Bucharest Sofia Varna Athens Patras Belgrade Zagreb Split Sarajevo Skopje Tirana
Riga Vilnius Tallinn Tartu Minsk Kiev Odessa Lviv Moscow Kazan Samara Omsk Tomsk Irkutsk Istanbul
Ankara Izmir Bursa Antalya Cairo Alexandria Tunis Algiers Rabat Casablanca Tangier Dakar Lagos
Accra Nairobi Mombasa Kampala Kigali Lusaka Harare Durban Windhoek Luanda Khartoum Tehran
Isfahan Tabriz Shiraz Baghdad Basra Damascus Beirut Amman Riyadh Jeddah Doha Muscat Kabul
Karachi Lahore Delhi Mumbai Chennai Kolkata Pune Jaipur Agra Colombo Kathmandu Dhaka Yangon
Bangkok Hanoi Manila Jakarta Surabaya Bandung Singapore Penang Beijing Shanghai Tianjin Wuhan
Chengdu Nanjing Xiamen Harbin Seoul Busan Incheon Tokyo Osaka Kyoto Nagoya Sapporo Kobe Sendai
Sydney Melbourne Brisbane Perth Adelaide Hobart Darwin Auckland Wellington Christchurch Toronto
Montreal Ottawa Calgary Edmonton Winnipeg Halifax Quebec Vancouver Victoria Boston Chicago
Denver Dallas Houston Austin Phoenix Seattle Portland Atlanta Miami Detroit Memphis Nashville
Omaha Tulsa Tucson Fresno Sacramento Honolulu Anchorage Havana Kingston Lima Quito Bogota
Caracas Santiago Valparaiso Montevideo Asuncion Rosario Cordoba Mendoza Recife Salvador
Fortaleza Manaus Belem Curitiba Natal
""".split()

ADJECTIVES = """
old new small large quiet busy green blue grey bright dark warm cold long short narrow wide
gentle calm soft heavy light early late simple plain ancient modern distant nearby hidden open
empty full steady slow quick careful patient rough smooth silent golden wooden stone broken
tired young humble proud rural lonely crowded pale sharp dull deep shallow dusty sunny windy
""".split()

NOUNS = """
river valley village garden market window road bridge forest field meadow hill mountain lake
harbor island tower castle church school library station train boat ship wagon cart horse dog
cat bird farmer baker teacher student traveler merchant sailor painter writer doctor child
woman man family neighbor friend stranger letter book story song poem map lamp candle table
chair door wall roof kitchen room house street corner square fountain well stream shore beach
cliff path trail wind rain snow cloud storm morning evening night winter summer autumn spring
season year week day hour bread soup tea apple orchard vineyard barn mill bell clock coat
basket blanket fire smoke stone shadow light voice crowd festival journey
""".split()

VERBS_T = """
crossed painted carried watched followed visited repaired opened closed found lost built cleaned
noticed passed reached admired described remembered gathered collected shared sold
bought fixed moved lifted pulled pushed guarded measured studied counted mended washed
""".split()

VERBS_I = """
slept waited rested walked wandered arrived departed returned smiled laughed listened worked
stayed lingered paused vanished appeared settled drifted faded glowed shimmered rustled
""".split()

ADVERBS = """
quietly slowly softly gently calmly briefly rarely often always sometimes carefully happily
patiently silently steadily suddenly finally again together alone nearby outside inside
""".split()

PREPS = """
near beside behind under over across along through past toward around between beyond above
""".split()

# Sentence starters (capitalised; they also get a line-start form without the leading space).
STARTERS = ["The", "A", "In", "Every", "Some", "After", "Near", "Each", "Later", "Then",
            "This", "Meanwhile", "What", "Note"]

FUNCTION_WORDS = ["the", "a", "and", "of", "to", "in", "on", "with", "some", "every", "while",
                  "was", "were", "is", "code", "for", "what", "that", "by", "at", "it", "its",
                  "their", "her", "his", "from", "as", "once", "does", "have"]

VALUES = [str(v) for v in range(100, 1000)]  # three-digit codes, one token each

# --------------------------------------------------------------------------------------------
# Byte-level BPE tokenizer (GPT-2 byte mapping and split regex, as Hugging Face's ByteLevel).
# --------------------------------------------------------------------------------------------


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


BYTE_ENC = bytes_to_unicode()
BYTE_DEC = {v: k for k, v in BYTE_ENC.items()}
SPACE = BYTE_ENC[ord(" ")]  # 'Ġ'

try:  # the exact GPT-2 pattern when the third-party 'regex' module is present
    import regex as _re
    SPLIT_RE = _re.compile(
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
except ImportError:  # the same classes spelled with the standard library (identical on ASCII)
    SPLIT_RE = re.compile(
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"


class Tokenizer:
    """Byte-level BPE. Vocabulary: the 256 byte symbols, then one token per merge, then the
    special tokens. Merges build every word of the lists above left to right (each prefix is a
    token); all merges of space-prefixed words rank before those of line-start words, so a word
    of the lists always encodes to exactly one token whatever the other merges are."""

    def __init__(self):
        words_sp = []  # words that follow a space
        for w in CITIES + ADJECTIVES + NOUNS + VERBS_T + VERBS_I + ADVERBS + PREPS + \
                STARTERS + FUNCTION_WORDS + VALUES:
            words_sp.append(" " + w)
        words_ls = list(STARTERS)  # line-start forms
        self.vocab = {}
        for b in range(256):
            self.vocab[BYTE_ENC[b]] = b
        self.merges = []
        for group in (words_sp, words_ls):
            for w in group:
                u = "".join(BYTE_ENC[b] for b in w.encode("utf-8"))
                for i in range(2, len(u) + 1):
                    if u[:i] not in self.vocab:
                        self.vocab[u[:i]] = len(self.vocab)
                        self.merges.append((u[:i - 1], u[i - 1]))
        self.bos_id = len(self.vocab)
        self.vocab[BOS_TOKEN] = self.bos_id
        self.eos_id = len(self.vocab)
        self.vocab[EOS_TOKEN] = self.eos_id
        self.id_to_tok = {i: t for t, i in self.vocab.items()}
        self.ranks = {m: i for i, m in enumerate(self.merges)}
        self.cache = {}
        self.special = {BOS_TOKEN: self.bos_id, EOS_TOKEN: self.eos_id}
        self.special_re = re.compile("(" + "|".join(re.escape(s) for s in self.special) + ")")

    def __len__(self):
        return len(self.vocab)

    def _bpe(self, piece):
        if piece in self.cache:
            return self.cache[piece]
        syms = list(piece)
        while len(syms) > 1:
            best, best_i = None, -1
            for i in range(len(syms) - 1):
                r = self.ranks.get((syms[i], syms[i + 1]))
                if r is not None and (best is None or r < best):
                    best, best_i = r, i
            if best is None:
                break
            syms[best_i:best_i + 2] = [syms[best_i] + syms[best_i + 1]]
        ids = [self.vocab[s] for s in syms]
        self.cache[piece] = ids
        return ids

    def encode(self, text):
        ids = []
        for part in self.special_re.split(text):
            if not part:
                continue
            if part in self.special:
                ids.append(self.special[part])
                continue
            for m in SPLIT_RE.findall(part):
                ids.extend(self._bpe("".join(BYTE_ENC[b] for b in m.encode("utf-8"))))
        return ids

    def decode(self, ids):
        out = bytearray()
        for i in ids:
            t = self.id_to_tok[int(i)]
            if t in self.special:
                out += t.encode("utf-8")
            else:
                out += bytes(BYTE_DEC[c] for c in t)
        return out.decode("utf-8", errors="replace")

    def tok(self, word):
        """Id of a single-token word (e.g. ' Lisbon')."""
        ids = self.encode(word)
        assert len(ids) == 1, (word, ids)
        return ids[0]

    def save(self, d):
        added = []
        for s in (BOS_TOKEN, EOS_TOKEN):
            added.append({"id": self.vocab[s], "content": s, "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False,
                          "special": True})
        tj = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                              "trim_offsets": True, "use_regex": True},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                        "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": self.vocab,
                      "merges": [a + " " + b for a, b in self.merges]},
        }
        with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(tj, f, ensure_ascii=False, indent=1)
        tc = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "add_bos_token": True,
              "add_eos_token": False, "model_max_length": None,
              "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(tc, f, indent=1)

    @staticmethod
    def load(d):
        """Loads tokenizer.json (as written by save) into this class's encoder."""
        with open(os.path.join(d, "tokenizer.json"), encoding="utf-8") as f:
            tj = json.load(f)
        t = Tokenizer.__new__(Tokenizer)
        t.vocab = dict(tj["model"]["vocab"])
        for a in tj["added_tokens"]:
            t.vocab[a["content"]] = a["id"]
        t.merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                    for m in tj["model"]["merges"]]
        t.id_to_tok = {i: s for s, i in t.vocab.items()}
        t.ranks = {m: i for i, m in enumerate(t.merges)}
        t.cache = {}
        t.special = {a["content"]: a["id"] for a in tj["added_tokens"]}
        t.special_re = re.compile("(" + "|".join(re.escape(s) for s in t.special) + ")")
        t.bos_id = t.special[BOS_TOKEN]
        t.eos_id = t.special[EOS_TOKEN]
        return t


# --------------------------------------------------------------------------------------------
# Synthetic corpus, built directly as token ids (every word is one token).
# --------------------------------------------------------------------------------------------


class Corpus:
    """Documents: filler prose with facts "Note: <city> <ddd>." planted at random depths, then a
    blank line and a block of questions, one per line: "Note: <city> <ddd>" (the code is the
    answer). Key and value are adjacent in the fact, and the question is the fact's opening up
    to the key, so the answer is the token that followed the same tokens earlier: an induction
    pattern. (With a question worded differently from the fact, "Question: <city>", the
    induction heads this training grows match on the two or three tokens before the answer,
    find no earlier "Question: <city>" and fail: held-out accuracy stayed at 0.01-0.03 while
    copy sequences were solved.)"""

    def __init__(self, tok):
        self.tok = tok
        t = tok.tok
        self.adj = [self.sp(w) for w in ADJECTIVES]
        self.noun = [self.sp(w) for w in NOUNS]
        self.vt = [self.sp(w) for w in VERBS_T]
        self.vi = [self.sp(w) for w in VERBS_I]
        self.adv = [self.sp(w) for w in ADVERBS]
        self.prep = [self.sp(w) for w in PREPS]
        self.city = [self.sp(w) for w in CITIES]
        self.value = [self.sp(w) for w in VALUES]
        self.start_sp = {w: self.sp(w) for w in STARTERS}
        self.start_ls = {self.sp(w): t(w) for w in STARTERS}  # space form -> line-start form
        s = self.sp
        self.w = {w: s(w) for w in FUNCTION_WORDS}
        self.dot, self.comma, self.colon = t("."), t(","), t(":")
        self.nl = t("\n")
        self.random_ids = set(self.value) | set(self.city)

    def sp(self, w):
        return self.tok.tok(" " + w)

    def sentence(self, r):
        """One filler sentence (list of ids, first token in its space-prefixed form)."""
        W, st = self.w, self.start_sp
        ch = r.choice
        k = r.randrange(8)

        def np_():  # noun phrase
            out = [W["the"]] if r.random() < 0.7 else [W["a"]]
            if r.random() < 0.5:
                out.append(ch(self.adj))
            out.append(ch(self.noun))
            return out
        if k == 0:
            s = [st["The"], ch(self.adj), ch(self.noun), ch(self.vt)] + np_() + \
                [ch(self.prep)] + np_()
        elif k == 1:
            s = [st["A"], ch(self.noun), ch(self.vi), ch(self.adv)]
        elif k == 2:
            s = [st["In"], W["the"], ch(self.noun), self.comma] + np_() + [ch(self.vi),
                                                                          ch(self.adv)]
        elif k == 3:
            s = [st["Every"], ch(self.noun), ch(self.vt), W["some"], ch(self.adj),
                 ch(self.noun)]
        elif k == 4:
            s = [st[ch(["After", "Later", "Then", "Meanwhile"])], self.comma] + np_() + \
                [ch(self.vt)] + np_() + [W["and"], ch(self.vi), ch(self.adv)]
        elif k == 5:
            s = [st["Near"], W["the"], ch(self.adj), ch(self.noun), self.comma] + np_() + \
                [ch(self.vi), W["while"]] + np_() + [ch(self.vi)]
        elif k == 6:
            s = [st["This"], ch(self.noun), W["was"], ch(self.adj), W["and"], ch(self.adj)]
        else:
            s = [st[ch(["Some", "Each"])], ch(self.noun), ch(self.vt)] + np_() + \
                [ch(self.prep)] + np_()
        return s + [self.dot]

    def fact(self, key, val):
        """' Note: <key> <val>.' (first token in its space-prefixed form)."""
        return [self.start_sp["Note"], self.colon, key, val, self.dot]

    def question(self, key):
        """'Note: <key>' (line-start form): the fact's own opening, so that the question
        matches the fact on three tokens; the answer token follows."""
        return [self.start_ls[self.start_sp["Note"]], self.colon, key]

    def document(self, r, n_tokens, n_facts, n_questions, para_p=0.04):
        """Returns (ids, answer_pos, segments, keys, vals, asked).
        ids: BOS + document, about n_tokens long in all (the filler is sized so that the
        document ends near n_tokens; the caller crops or pads).
        answer_pos: indices i such that ids[i] is an answer token (predicted at i - 1).
        segments: list of (kind, start, end) spans: 'fact', 'question', 'answer'.
        The question block ends with a newline after the last answer."""
        keys = r.sample(self.city, n_facts)
        vals = [r.choice(self.value) for _ in keys]
        asked = r.sample(range(n_facts), n_questions)
        qblock_len = 1 + 5 * n_questions
        budget = max(0, n_tokens - 1 - qblock_len - 5 * n_facts)
        sents = []
        total = 0
        breaks = []  # paragraph break before sentence i (two newlines)
        while total < budget:
            s = self.sentence(r)
            br = bool(sents) and r.random() < para_p
            if total + len(s) + 2 * br > budget + 4:
                break
            sents.append(s)
            breaks.append(br)
            total += len(s) + 2 * br
        # fact i goes before sentence slot[i]; slots are random depths, in document order
        slots = sorted(r.randrange(len(sents) + 1) for _ in range(n_facts))
        order = list(range(n_facts))
        r.shuffle(order)
        ids = [self.tok.bos_id]
        segs = []
        fi = 0
        line_start = True
        for si in range(len(sents) + 1):
            while fi < n_facts and slots[fi] == si:
                f = self.fact(keys[order[fi]], vals[order[fi]])
                if line_start:
                    f = [self.start_ls[f[0]]] + f[1:]
                segs.append(("fact", len(ids), len(ids) + len(f), order[fi]))
                ids += f
                fi += 1
                line_start = False
            if si < len(sents):
                s = sents[si]
                if not line_start and breaks[si]:
                    ids += [self.nl, self.nl]
                    line_start = True
                if line_start:
                    s = [self.start_ls[s[0]]] + s[1:]
                ids += s
                line_start = False
        ids += [self.nl]
        ans = []
        for q in asked:
            ql = [self.nl] + self.question(keys[q])
            segs.append(("question", len(ids), len(ids) + len(ql), q))
            ids += ql
            ans.append(len(ids))
            segs.append(("answer", len(ids), len(ids) + 1, q))
            ids += [vals[q]]
        ids += [self.nl]
        return ids, ans, segs, keys, vals, asked
