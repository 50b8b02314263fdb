"""Writes a small, real, deterministic DeepSeek-style byte-level BPE tokenizer.

The generated checkpoints need a tokenizer that behaves like DeepSeek-V3's (byte-level BPE,
fullwidth-bar special tokens, BOS added on encode, a Jinja chat template) but is tiny and
reproducible: the BPE is trained on the built-in corpus below, and the vocabulary is padded with
reserved placeholder tokens up to exactly `vocab_size`, as DeepSeek pads its own vocabulary.

Id layout: 0 BOS, 1 EOS, 2 PAD, 3 User, 4 Assistant, then the 256 byte tokens, then merges,
then `<｜place▁holder▁no▁N｜>` tokens up to `vocab_size`.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
CORE_SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
BYTE_TOKEN_COUNT = 256
# Below this the tokenizer would be little more than raw bytes; 64 merges keep it a real BPE.
MIN_VOCAB_SIZE = len(CORE_SPECIAL_TOKENS) + BYTE_TOKEN_COUNT + 64
MODEL_MAX_LENGTH = 16384

# DeepSeek-V3 splits digit runs into groups of at most three before the byte-level split.
_DIGIT_GROUPS = r"\p{N}{1,3}"


def placeholder_token(index: int) -> str:
    return f"<｜place▁holder▁no▁{index}｜>"


# System prompt first (all system messages joined), then User/Assistant turns; a finished
# assistant turn ends with EOS; add_generation_prompt opens the next assistant turn.
CHAT_TEMPLATE = (
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if ns.system %}{% set ns.system = ns.system + '\\n\\n' %}{% endif %}"
    "{% set ns.system = ns.system + message['content'] %}"
    "{% endif %}"
    "{% endfor %}"
    "{{ bos_token }}{{ ns.system }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' + (message['content'] or '') + '<｜end▁of▁sentence｜>' }}"
    "{% elif message['role'] != 'system' %}"
    "{{ raise_exception('unsupported chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

TRAINING_CORPUS = """\
The serving system reads a prompt, turns it into tokens, and sends those tokens to the model.
A good tokenizer keeps common words whole and breaks rare words into smaller pieces, so that
every string, however strange, still has an encoding. This text is the whole training corpus of
the small tokenizer: it is short, but it holds ordinary English sentences, some program code,
numbers of many shapes, and words from other languages.

On Monday morning the weather was cold and grey, and the train to the city was late again.
People stood on the platform with coffee in their hands, reading the news on their phones.
When the train finally arrived, everyone found a seat, and the journey took forty minutes.
The office opened at nine o'clock. The team met in the small room by the window to plan the
week: who would write the report, who would call the customers, and who would fix the bugs
that the testers had found on Friday afternoon.

Cooking is a kind of engineering. You measure the flour, warm the milk, and mix the eggs with
sugar until the batter is smooth. Then you wait. A cake that is taken out of the oven too early
will fall; a cake that is left in too long will burn. Recipes are programs for the kitchen, and
every cook learns to debug them by taste.

Questions and answers:
Q: What is the capital of France? A: Paris.
Q: How many days are there in a week? A: Seven.
Q: Why is the sky blue? A: Because air scatters short wavelengths of sunlight more strongly.
Q: Can you help me write a letter? A: Of course. Tell me who the letter is for.

def mixture_of_experts(hidden, gate, experts, top_k=8):
    scores = gate(hidden).sigmoid()
    weights, indices = scores.topk(top_k, dim=-1)
    output = torch.zeros_like(hidden)
    for slot in range(top_k):
        for expert_id in indices[:, slot].unique().tolist():
            mask = indices[:, slot] == expert_id
            output[mask] += weights[mask, slot, None] * experts[expert_id](hidden[mask])
    return output

class RequestQueue:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: list[str] = []

    def push(self, item: str) -> bool:
        if len(self.items) >= self.capacity:
            return False
        self.items.append(item)
        return True

for (int i = 0; i < n; ++i) { total += values[i] * 2; }
if (x != NULL && x->next == NULL) { return -1; }
SELECT name, price FROM products WHERE price > 100 ORDER BY price DESC;
{"model": "deepseek-v3", "max_tokens": 256, "temperature": 0.7, "stream": true}
<div class="header"><a href="https://example.com/docs">Read the docs</a></div>
$ make test && echo "all tests passed" || exit 1

Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 4096 65536 3.14159 2.71828 -17 +23 1e-5
Dates and times: 2025-02-28, 09:30, 23:59:59, March 1st, the year 1999 and the year 2024.
Prices: $0.14, $0.55, $2.19 per million tokens; 545% margin; 73,700 tokens per second.
Arithmetic: 12 + 30 = 42; 7 * 6 = 42; 84 / 2 = 42; 2^10 = 1024; (3 + 4) * 5 = 35.
Phone 555-0123, room 404, flight BA117, version 1.2.3, port 50051, address 10.0.0.1.

Words from elsewhere: café, naïve, résumé, façade, jalapeño, Zürich, São Paulo, Kraków,
Ångström, crème brûlée, déjà vu, smörgåsbord, Straße, über, niño, coöperate.
日本語のテキストも少し入れておきます。東京は大きな都市です。
中文也有一点：今天天气很好，我们去公园散步吧。
Русский текст: привет, как дела? Ελληνικά: καλημέρα κόσμε. 한국어: 안녕하세요.
العربية: مرحبا بالعالم. עברית: שלום עולם. हिन्दी: नमस्ते दुनिया.
Symbols and emoji: → ← ≤ ≥ ≠ ± × ÷ ∞ ∑ √ π µ € £ ¥ © ® ™ 🙂 😀 🚀 🎉 👍 ❤️ 🌍 ✨ 🤖 📚.

A long sentence helps the merges learn which pairs are frequent: the quick brown fox jumps over
the lazy dog, and then the lazy dog gets up, shakes itself, and runs after the quick brown fox
through the green field, past the old barn, and over the little bridge by the river.
Machine learning models learn patterns from data; language models learn to predict the next
token, one token at a time, and a serving system streams those tokens back to the user.
"""


def write_tokenizer(out_dir: pathlib.Path, vocab_size: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE}, got {vocab_size}")
    save_tokenizer(out_dir, build_tokenizer(vocab_size))


def save_tokenizer(out_dir: pathlib.Path, tokenizer: Tokenizer) -> None:
    """Write a tokenizer built here (build_tokenizer, train_bpe) with its config files."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # to_str is canonical for a given tokenizer; sort_keys keeps the config files stable too.
    _write_text(out_dir / "tokenizer.json", tokenizer.to_str(pretty=True))
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(tokenizer))
    _write_json(out_dir / "special_tokens_map.json", _special_tokens_map())


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """Train the BPE on TRAINING_CORPUS and pad it with placeholders to exactly vocab_size."""
    return train_bpe([TRAINING_CORPUS], vocab_size)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A DeepSeek-style byte-level BPE trained on texts, padded with placeholders to exactly
    vocab_size (the demo model's tokenizer is trained on its corpus through this)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE}, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_DIGIT_GROUPS), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # The trainer breaks count ties by token ids and sorts its alphabet, so one corpus always
    # yields the same merges; tests/unit/test_tokenizer_gen.py checks this across processes.
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in CORE_SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    missing = vocab_size - tokenizer.get_vocab_size(with_added_tokens=True)
    tokenizer.add_special_tokens(
        [AddedToken(placeholder_token(i), special=True, normalized=False) for i in range(missing)]
    )
    actual = tokenizer.get_vocab_size(with_added_tokens=True)
    if actual != vocab_size:
        raise RuntimeError(f"built a vocabulary of {actual} tokens, wanted {vocab_size}")
    # The same template transformers builds from add_bos_token=True, so both encode alike.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    return tokenizer


def _tokenizer_config(tokenizer: Tokenizer) -> dict:
    added_tokens_decoder = {
        str(token_id): {
            "content": token.content,
            "lstrip": token.lstrip,
            "normalized": token.normalized,
            "rstrip": token.rstrip,
            "single_word": token.single_word,
            "special": token.special,
        }
        for token_id, token in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": BOS_TOKEN,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "legacy": True,
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def _special_tokens_map() -> dict:
    return {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}


def _write_json(path: pathlib.Path, payload: dict) -> None:
    _write_text(path, json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _write_text(path: pathlib.Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8"))
