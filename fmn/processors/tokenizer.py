"""The CLIP BPE tokenizer that Stable Diffusion uses, built offline from the shipped BPE merges.

`fmn/assets/clip_bpe_simple_vocab_16e6.txt.gz` is OpenAI CLIP's merges file (MIT licence, as
shipped by open_clip). The vocabulary is derived from it the way CLIP does (byte symbols, byte
symbols + "</w>", merges, then the two special tokens), which gives the same 49408 ids as the
hub's `openai/clip-vit-large-patch14` tokenizer: "<|endoftext|>" = 49407, "!" = 0.
"""
import gzip
import json
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer

_N_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode symbols."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _merges() -> tuple:
    bpe = resources.files("fmn") / "assets" / "clip_bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")[1:_N_MERGES + 1]
    return tuple(tuple(line.split()) for line in lines)


def _merges_used(words, merges) -> list:
    """The merges CLIP's BPE applies to `words` (lowercase, one pre-token each), in rank order.

    BPE merges the lowest-ranked adjacent pair first; keeping exactly the merges it used leaves
    those words' tokens unchanged, and any other word falls back to smaller pieces."""
    rank = {m: i for i, m in enumerate(merges)}
    byte_sym = _bytes_to_unicode()
    used = set()
    for word in words:
        syms = [byte_sym[b] for b in word.encode("utf-8")]
        parts = syms[:-1] + [syms[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(rank.get(p, len(rank)), i) for i, p in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            if best == len(rank):
                break
            used.add(best)
            parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return [merges[i] for i in sorted(used)]


@lru_cache(maxsize=4)
def _vocab_texts(words: tuple | None = None) -> tuple[str, str]:
    """(vocab.json, merges.txt) contents."""
    merges = list(_merges())
    if words is not None:
        merges = _merges_used(words, merges)
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return (json.dumps({t: i for i, t in enumerate(vocab)}),
            "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77, words=None) -> CLIPTokenizer:
    """SD 1.x's tokenizer (pads with end-of-text); pad_token="!" gives SD 2.x's.

    words: None for the full 49408-token vocabulary; or a list of words, for a small vocabulary
    (the 512 byte symbols, the merges those words need, the two special tokens) that splits those
    words exactly as the full one does and any other word into smaller pieces (the toy model's).
    """
    if words is not None:
        words = tuple(sorted({w.lower() for text in words for w in str(text).split()}))
        if not words:
            raise ValueError("words must name at least one word")
    vocab, merges = _vocab_texts(words)
    # the tokenizer reads its files once, at load: the folder is removed right after
    with tempfile.TemporaryDirectory(prefix="fmn-clip-tok-") as folder:
        (Path(folder) / "vocab.json").write_text(vocab, encoding="utf-8")
        (Path(folder) / "merges.txt").write_text(merges, encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, model_max_length=model_max_length)


# Text the small T5 tokenizer is trained on: every ASCII letter, digit and common punctuation
# mark, so that no character maps to <unk>, plus prompt-like words so that words get pieces.
_T5_CORPUS = (
    "a painting of a dog by Van Gogh", "a photo of a cat on a sofa", "starry night over the city",
    "a red circle and a blue square", "portrait of a woman, oil on canvas", "Mickey Mouse at the beach",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789",
    "( ) [ ] { } , . ; : ! ? ' \" - _ / \\ & % $ # @ * + = < > | ~ ` ^",
)


@lru_cache(maxsize=1)
def _t5_backend_json() -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=256, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      show_progress=False)
    tokenizer.train_from_iterator(list(_T5_CORPUS) * 8, trainer)
    # T5 appends end-of-sequence to every text (id 1), and pads with id 0.
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    return tokenizer.to_str()


def t5_tokenizer(model_max_length: int = 512):
    """A small T5TokenizerFast (SentencePiece-style Unigram with "▁" word markers, cased, <pad>=0,
    </s>=1, <unk>=2) trained offline on a fixed text: T5's tokenization behaviour at toy size,
    for tiny SD3/FLUX pipelines. Deterministic: the same text always gives the same ids."""
    from tokenizers import Tokenizer
    from transformers import T5TokenizerFast
    backend = Tokenizer.from_str(_t5_backend_json())
    return T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=model_max_length)
