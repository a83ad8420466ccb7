"""Byte-level BPE (trained with the `tokenizers` library) with DeepSeek's special tokens and the R1 chat template.

The saved directory (`tokenizer.json` + `tokenizer_config.json`, with the template as Jinja) loads in `transformers`:
`AutoTokenizer.from_pretrained(dir).apply_chat_template(messages, add_generation_prompt=True)` yields exactly the ids of
`Tokenizer.apply_chat_template` here, because both render the same template with Jinja and encode the same string.

R1's template: `<｜begin▁of▁sentence｜>{system}<｜User｜>{q}<｜Assistant｜>{answer}<｜end▁of▁sentence｜>...`; the thinking of
earlier assistant turns is dropped (`content.split('</think>')[-1]`) and the generation prompt opens the thought:
`<｜Assistant｜><think>\\n`.
"""

import json
from pathlib import Path
from typing import Iterable

from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from nanoseek.checkpoint import atomic_write
from nanoseek.errors import NanoseekError

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"  # not "special": decoding with skip_special_tokens keeps them, as in R1
FIM = ["<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>"]
TOOL = ["<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>",
        "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"]
SPECIAL = [BOS, EOS, PAD, USER, ASSISTANT, *FIM, *TOOL]  # ids 0.. in this order; bos 0 and eos 1 as in DeepSeek-V3

CHAT_TEMPLATE = (
    "{%- if not add_generation_prompt is defined %}{%- set add_generation_prompt = false %}{%- endif %}"
    "{%- set ns = namespace(system_prompt='', first=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.first %}{%- set ns.system_prompt = message['content'] %}{%- set ns.first = false %}"
    "{%- else %}{%- set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{{- bos_token }}{{- ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- '" + USER + "' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}{%- set content = message['content'] %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1] %}{%- endif %}"
    "{{- '" + ASSISTANT + "' + content + '" + EOS + "' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '" + ASSISTANT + "<think>\\n' }}{%- endif %}"
)


class Tokenizer:
    def __init__(self, tok):
        self.tok = tok  # a tokenizers.Tokenizer
        self.bos_id, self.eos_id, self.pad_id = (tok.token_to_id(t) for t in (BOS, EOS, PAD))
        self.user_id, self.assistant_id = tok.token_to_id(USER), tok.token_to_id(ASSISTANT)
        self.think_id, self.end_think_id = tok.token_to_id(THINK), tok.token_to_id(END_THINK)
        nl = tok.encode("\n", add_special_tokens=False).ids
        self.newline_id = nl[0] if len(nl) == 1 else None  # a thought's lines end with it, and so does a thought
        self._template = None

    # ---- training ----
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> "Tokenizer":
        if vocab_size < 256 + len(SPECIAL) + 2:
            raise NanoseekError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
                                f"{256 + len(SPECIAL) + 2}")
        tok = HFTokenizer(models.BPE())
        # digits one by one (helps arithmetic), then GPT-2's byte-level split
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, min_frequency=min_frequency, show_progress=False,
                                      special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK, END_THINK)])
        return cls(tok)

    # ---- io ----
    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        f = Path(path) / "tokenizer.json"
        if not f.exists():
            raise NanoseekError(f"no tokenizer.json in {path}")
        try:
            tok = HFTokenizer.from_file(str(f))
        except Exception as e:
            raise NanoseekError(f"{f} is not a valid tokenizer file ({str(e).splitlines()[0]})") from None
        t = cls(tok)
        if t.bos_id is None or t.eos_id is None:
            raise NanoseekError(f"{f} lacks DeepSeek's special tokens {BOS} / {EOS}")
        return t

    def save(self, path) -> None:
        path = Path(path)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": None,
            "add_bos_token": False, "add_eos_token": False,  # the chat template writes bos itself
            "clean_up_tokenization_spaces": False, "model_max_length": 131072,
            "chat_template": CHAT_TEMPLATE,
        }
        atomic_write(path / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        atomic_write(path / "tokenizer.json", self.tok.to_str(pretty=True))  # last: what from_dir looks for

    # ---- use ----
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decoder(self, skip_special_tokens: bool = True) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._template is None:  # the same Jinja setup transformers uses to render chat templates
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            self._template = env.from_string(CHAT_TEMPLATE)
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise NanoseekError(f"a chat message must be {{'role': system|user|assistant, 'content': str}}, "
                                    f"got {m!r:.80}")
        return self._template.render(messages=messages, bos_token=BOS, eos_token=EOS,
                                     add_generation_prompt=add_generation_prompt)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt))

    def prompt_ids(self, problem: dict) -> list[int]:
        """A reasoning problem ({'question': ...}) as one user turn of the R1 template, the assistant's turn opened:
        the prompt GRPO, evaluation and distillation sample from."""
        return self.apply_chat_template([{"role": "user", "content": problem["question"].strip()}])


class IncrementalDecoder:
    """Token ids arriving a few at a time -> their text, each id decoded a bounded number of times (decoding the whole
    output again at every step costs O(n^2) over a long answer). The new text is what decoding a short window of
    recent ids adds to the same window without the newest ones, as in vLLM's `detokenize_incrementally`; a multi-byte
    character split between tokens is held back until it is whole. Equal to `decode(all ids)` (a test checks)."""

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tok, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] is the context window; ids[read:] not yet turned into text
        self.text = ""

    def feed(self, ids: list[int], final: bool = False) -> str:
        """Add ids; returns the text they complete (possibly empty)."""
        self.ids += ids
        if self.read == len(self.ids):
            return ""
        before = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        after = self.tok.decode(self.ids[self.prefix:], self.skip)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""  # nothing yet, or a character still incomplete
        new = after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += new
        return new

