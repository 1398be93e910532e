"""The demo's character-level tokenizer, its chat template and the prompt encoding.

Owns the vocabulary (one token per character, one special token per role marker) and the
one way a prompt becomes ids: ``encode_prompt`` is ``buffers.formatting.encode`` of the
value the Parquet row holds in its prompt column, with the format the demo configs resolve
to (chat template on, no system prompt, no prompt template). The teachers and the student
are therefore trained and measured on exactly the ids the pipeline gives them at run time.
Saved with the models, so transformers and vLLM load, render and decode it identically.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from buffers.formatting import PromptFormat, encode
from demo.tasks import DEFAULT_DOMAINS, prompt_value


PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
# Role markers of the chat template, one token each.
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
ROLE_TOKENS: tuple[str, ...] = (SYSTEM, USER, ASSISTANT, END)
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, UNK, *ROLE_TOKENS)
# Every character the math and reverse prompts and responses use, plus a space
# (harmless, and it lets free-form text round-trip). Anything else maps to <unk>.
VOCAB_CHARS = string.digits + string.ascii_lowercase + "+=:\\{} "
# Added only when the code domain is prepared, so the default vocabulary stays at 50.
CODE_CHARS = '()*-"\n'

# The chat template, in the tokenizer's ``chat_template`` (saved with it, so
# ``AutoTokenizer.from_pretrained(dir).apply_chat_template`` and vLLM use it). A user turn
# is ``<|user|>{content}<|end|>`` and the generation prompt ``<|assistant|>``, so
# "123+456=" becomes 3 + 8 tokens. Why this compact: the tiny models have 64 positions
# (the longest code prompt + response + EOS is 54 tokens with it) and every token costs
# training and sampling time on 2 cores, so each role marker is one special token and
# nothing else (no BOS, no newlines) is added. A past assistant turn ends with EOS, the
# token that ends every response, so a conversation renders the way the model generates.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "<|assistant|>{{ m['content'] }}{{ eos_token }}"
    "{%- elif m['role'] == 'user' or m['role'] == 'system' -%}"
    "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{%- else -%}"
    "{{ raise_exception('unknown role ' + m['role'] + ': use system, user or assistant') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
# The prompt format the demo configs resolve to: data.chat_template null with a tokenizer
# that has one (so true), no chat_template_kwargs, no system_prompt, no prompt_template.
PROMPT_FORMAT = PromptFormat(chat_template=True)


def vocab_chars(domains: Sequence[str] = DEFAULT_DOMAINS) -> str:
    """The tokenizer's characters: ``VOCAB_CHARS``, plus ``CODE_CHARS`` with the code domain."""
    return VOCAB_CHARS + (CODE_CHARS if "code" in domains else "")


def build_tokenizer(domains: Sequence[str] = DEFAULT_DOMAINS) -> PreTrainedTokenizerFast:
    """Character-level tokenizer with a chat template: one token per character, decoded
    with no separators, and one special token per role marker.

    WordLevel over single characters with a pre-tokenizer that isolates every character;
    ``decoders.Fuse`` joins tokens with nothing in between, so ``decode(encode(s)) == s``
    for any string over ``vocab_chars(domains)``. The role markers (``ROLE_TOKENS``) are
    special tokens, so they are matched whole in rendered text and dropped by
    ``skip_special_tokens``. No post-processor: nothing is added to encoded text, and the
    chat template (``CHAT_TEMPLATE``) adds no BOS, so transformers and vLLM give the same
    ids. EOS ends every response (and doubles as BOS for code that wants one).
    """
    chars = vocab_chars(domains)
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *chars])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Oniguruma's "." skips newlines (so "\n\n" would be one <unk> piece); "[\s\S]" does
    # not. The default vocabulary has no newline and keeps ".".
    split = Regex("[\\s\\S]" if "\n" in chars else ".")
    core.pre_tokenizer = pre_tokenizers.Split(split, behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        # Right padding for training; evaluation groups prompts by length and never pads.
        padding_side="right",
        model_max_length=64,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Any) -> list[int]:
    """The ids the pipeline gives the models for a dataset prompt: ``buffers.formatting.encode``
    of the value of the row's prompt column (a question string, a messages list, a code stub)
    with the demo configs' format (``PROMPT_FORMAT``)."""
    return encode(prompt, PROMPT_FORMAT, tokenizer)


def row_prompt_ids(tokenizer: PreTrainedTokenizerBase, row: Mapping[str, Any]) -> list[int]:
    """A row's prompt ids: its ``prompt_ids`` when set, else ``encode_prompt`` of its prompt value."""
    ids = row.get("prompt_ids")
    if ids is not None:
        return list(ids)
    return encode_prompt(tokenizer, prompt_value(row["domain"], row["prompt"]))


def with_prompt_ids(tokenizer: PreTrainedTokenizerBase, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows with their ``prompt_ids`` (encoded once, used by every evaluation)."""
    return [{**row, "prompt_ids": row_prompt_ids(tokenizer, row)} for row in rows]
