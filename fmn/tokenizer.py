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
def _vocab_folder() -> str:
    bpe = resources.files("fmn") / "assets" / "clip_bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")[1:_N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(tempfile.mkdtemp(prefix="fmn-clip-tok-"))
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    return str(folder)


def clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77) -> CLIPTokenizer:
    """SD 1.x's tokenizer (pads with end-of-text); pad_token="!" gives SD 2.x's."""
    return CLIPTokenizer.from_pretrained(_vocab_folder(), pad_token=pad_token,
                                         model_max_length=model_max_length)
