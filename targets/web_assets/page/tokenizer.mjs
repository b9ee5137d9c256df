// CLIP byte-level BPE, read from the tokenizers JSON the export ships (tokenizer/tokenizer.json):
// NFC, whitespace runs to one space, lowercase; CLIP's split pattern; bytes to unicode; BPE with "</w>".
const SPLIT = /<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+/gu;

function bytesToUnicode() {
  // GPT-2's table: printable bytes map to themselves, the rest to code points from 256 up.
  const printable = [];
  for (let b = 33; b <= 126; b++) printable.push(b);
  for (let b = 161; b <= 172; b++) printable.push(b);
  for (let b = 174; b <= 255; b++) printable.push(b);
  const table = new Array(256);
  let extra = 0;
  for (let b = 0; b < 256; b++) {
    table[b] = String.fromCodePoint(printable.includes(b) ? b : 256 + extra++);
  }
  return table;
}

export class ClipTokenizer {
  constructor(json, config) {
    const model = json.model;
    if (!model || model.type !== "BPE") throw new Error("tokenizer.json is not a BPE model");
    this.vocab = new Map(Object.entries(model.vocab));
    this.ranks = new Map();
    model.merges.forEach((m, i) => this.ranks.set(Array.isArray(m) ? m.join(" ") : m, i));
    this.suffix = model.end_of_word_suffix || "";
    this.special = new Map((json.added_tokens || []).map((t) => [t.content, t.id]));
    const id = (name) => {
      const token = config[name];
      const text = typeof token === "string" ? token : token && token.content;
      if (!this.special.has(text) && !this.vocab.has(text)) throw new Error(`tokenizer has no ${name} '${text}'`);
      return this.special.has(text) ? this.special.get(text) : this.vocab.get(text);
    };
    this.bos = id("bos_token");
    this.eos = id("eos_token");
    this.pad = id("pad_token");
    this.unk = config.unk_token ? id("unk_token") : this.eos;
    this.maxLength = config.model_max_length;
    this.byteTable = bytesToUnicode();
    this.cache = new Map();
  }

  bpe(piece) {
    if (this.cache.has(piece)) return this.cache.get(piece);
    let word = Array.from(piece);
    word[word.length - 1] += this.suffix;
    while (word.length > 1) {
      let best = -1, bestRank = Infinity;
      for (let i = 0; i < word.length - 1; i++) {
        const rank = this.ranks.get(word[i] + " " + word[i + 1]);
        if (rank !== undefined && rank < bestRank) { bestRank = rank; best = i; }
      }
      if (best < 0) break;
      const [first, second] = [word[best], word[best + 1]];
      const merged = [];
      for (let i = 0; i < word.length; i++) {  // merge every occurrence of the best pair, left to right
        if (i < word.length - 1 && word[i] === first && word[i + 1] === second) {
          merged.push(first + second); i++;
        } else merged.push(word[i]);
      }
      word = merged;
    }
    const ids = word.map((t) => (this.vocab.has(t) ? this.vocab.get(t) : this.unk));
    this.cache.set(piece, ids);
    return ids;
  }

  // Token ids without the special tokens.
  tokenize(text) {
    const normal = text.normalize("NFC").replace(/\s+/gu, " ").toLowerCase();
    const ids = [];
    const utf8 = new TextEncoder();
    for (const match of normal.matchAll(SPLIT)) {
      const piece = match[0];
      if (this.special.has(piece)) { ids.push(this.special.get(piece)); continue; }
      const mapped = Array.from(utf8.encode(piece), (b) => this.byteTable[b]).join("");
      ids.push(...this.bpe(mapped));
    }
    return ids;
  }

  // What diffusers asks for: padding="max_length", truncation=True, bos/eos around the prompt.
  encode(text, maxLength = this.maxLength) {
    const body = this.tokenize(text).slice(0, maxLength - 2);
    const ids = [this.bos, ...body, this.eos];
    while (ids.length < maxLength) ids.push(this.pad);
    return ids;
  }
}
