"""The project's own byte-level tokenizer, used by the embedded default model.

It has exactly one token per byte, and a byte's id is its value (0-255; the symbols are
GPT-2's ByteLevel alphabet, in a BPE model with no merges), so any Unicode text encodes and
``decode(encode(text)) == text`` (GSM8K text with ``$1,000`` and ``####`` included). Two
special tokens follow:

- ``<|pad|>`` (id 256): padding; padding is on the left so batched generation lines prompts up
  at their last token.
- ``<|endoftext|>`` (id 257): end of sequence; also used as the bos token, but never added
  automatically (there is no post-processor: ``encode`` adds nothing).

Built with the ``tokenizers`` library and wrapped as a ``PreTrainedTokenizerFast``, so it
saves with ``save_pretrained`` and loads back with ``AutoTokenizer.from_pretrained(dir)``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode map: the printable symbol ByteLevel uses for each byte 0-255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    symbols, extra = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 256 byte tokens (ids 0-255), then ``<|pad|>``, ``<|endoftext|>``."""
    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    if set(vocab) != set(pre_tokenizers.ByteLevel.alphabet()):  # pragma: no cover
        raise RuntimeError("the tokenizers ByteLevel alphabet is not GPT-2's byte-to-unicode map")
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([PAD_TOKEN, EOS_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )
