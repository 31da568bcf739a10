"""Offline tokenizers for the families' tiny random pipelines (``ModelFamily.tiny_pipeline``): built from the
``tokenizers`` library without downloads, saved and loaded like a real repository's ``tokenizer/`` folder."""

from __future__ import annotations


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode map (the 256 base symbols of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _byte_level_bpe(specials: list[str], first: bool, words: tuple[str, ...] = ()):
    """A ``tokenizers`` byte-level BPE: the 256 byte symbols and ``specials`` (before the bytes where ``first``, else
    after them), then ``words`` as one token each (merges growing each word left to right)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte = _bytes_to_unicode()
    symbols = [c for _, c in sorted(byte.items())]
    vocab = {s: i for i, s in enumerate(specials + symbols if first else symbols + specials)}
    merges = []
    for word in words:
        w = "".join(byte[b] for b in word.encode())
        for i in range(2, len(w) + 1):
            if w[:i] not in vocab:
                vocab[w[:i]] = len(vocab)
                merges.append((w[: i - 1], w[i - 1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return tok


def chat_tokenizer(words: tuple[str, ...] = ()):
    """A ``Qwen2TokenizerFast`` built without downloads, for the Qwen-encoded families (Z-Image, FLUX.2-Klein,
    Qwen-Image): byte-level BPE over the 256 byte symbols, the specials ``<|endoftext|>`` (256, also the pad),
    ``<|im_start|>`` (257), ``<|im_end|>`` (258), and Qwen3's chat template for a user turn (with the generation
    prompt, and the empty think block where ``enable_thinking`` is False). ``words`` (as the pre-tokenizer splits
    them: a leading space included) become one token each, by merges that grow each word left to right (ids from
    259): what makes a fixed prompt prefix as many tokens as the real tokenizer makes it (Qwen-Image drops 34)."""
    from transformers import Qwen2TokenizerFast

    tok = _byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], first=False, words=words)
    template = (
        "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
        "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
        "{%- endif %}{%- endif %}"
    )
    return Qwen2TokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None,
        chat_template=template, model_max_length=131072,
    )  # fmt: skip


def gemma_tokenizer():
    """A ``GemmaTokenizer`` built without downloads, for SANA's Gemma-2 encoder, in Gemma's own form (BPE with byte
    fallback, spaces as ``▁``, ``<bos>`` prepended): ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, ``<mask>`` 4,
    the 256 byte tokens ``<0x00>``... (5-260), then ``▁`` and the printable ASCII characters, no merges."""
    import string

    from transformers import GemmaTokenizer

    vocab = {s: i for i, s in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    vocab.update({f"<0x{b:02X}>": 5 + b for b in range(256)})
    for c in ["\u2581", *(c for c in string.printable if not c.isspace())]:
        vocab[c] = len(vocab)
    return GemmaTokenizer(vocab=vocab, merges=[], model_max_length=8192, add_bos_token=True)


def mistral_tokenizer():
    """A ``PreTrainedTokenizerFast`` built without downloads for FLUX.2-dev's Mistral-3 encoder, standing in for the
    pipeline's ``PixtralProcessor`` (which needs torchvision): byte-level BPE with no merges, the specials ``<pad>``
    0, ``<s>`` 1, ``</s>`` 2, ``[INST]``, ``[/INST]``, ``[SYSTEM_PROMPT]``, ``[/SYSTEM_PROMPT]`` (3-6), the 256 byte
    symbols from 7, and Mistral's chat template over text content parts (a system turn, then user turns)."""
    from transformers import PreTrainedTokenizerFast

    tok = _byte_level_bpe(
        ["<pad>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"], first=True
    )
    template = (
        "{{- bos_token }}{%- for message in messages %}{%- set text = message['content'][0]['text'] %}"
        "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
        "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}{%- endif %}{%- endfor %}"
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=template,
        model_max_length=131072,
    )  # fmt: skip
