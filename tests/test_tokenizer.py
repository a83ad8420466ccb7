"""The tokenizer: DeepSeek's special tokens at DeepSeek's ids, <think> kept by skip_special_tokens, the R1 chat
template, and `transformers.AutoTokenizer` on the saved directory giving exactly nanoseek's ids."""

import pytest

from nanoseek.data.corpus import reasoning_texts
from nanoseek.errors import NanoseekError
from nanoseek.tokenizer import ASSISTANT, BOS, EOS, USER, Tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is 17 * 3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Use digits."},
     {"role": "user", "content": "Sort 3, 1, 2."}],
    [{"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "<think>\n2 plus 2 is 4.\n</think>\n\nThe answer is 4."},
     {"role": "user", "content": "And 3+3? ünïcödé ✓"}],
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(reasoning_texts(400, seed=3), vocab_size=600)


def test_special_tokens(tok):
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.vocab_size <= 600
    for t in (tok.user_id, tok.assistant_id, tok.think_id, tok.end_think_id):
        assert t is not None
    text = f"{BOS}{USER}hi{ASSISTANT}<think>\nok</think>yes{EOS}"
    ids = tok.encode(text)
    assert ids[:2] == [tok.bos_id, tok.user_id] and ids[-1] == tok.eos_id
    assert tok.decode(ids) == text
    kept = tok.decode(ids, skip_special_tokens=True)
    assert "<think>" in kept and "</think>" in kept and BOS not in kept


def test_roundtrip_bytes(tok):
    s = "Calculate 123 - 45 * 6.\n  émoji 🤖 and 中文\ttab"
    assert tok.decode(tok.encode(s)) == s


def test_r1_chat_template(tok):
    text = tok.render_chat(CONVERSATIONS[2])
    assert text.startswith(BOS + USER + "2+2?" + ASSISTANT)
    assert "2 plus 2" not in text  # earlier reasoning is dropped
    assert "\n\nThe answer is 4." + EOS in text
    assert text.endswith(ASSISTANT + "<think>\n")
    assert tok.render_chat(CONVERSATIONS[1]).startswith(BOS + "Be brief.\n\nUse digits." + USER)
    with pytest.raises(NanoseekError):
        tok.render_chat([{"role": "robot", "content": "x"}])


def test_transformers_autotokenizer_agrees(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for conv in CONVERSATIONS:
        for gen in (True, False):
            ours = tok.apply_chat_template(conv, add_generation_prompt=gen)
            theirs = hf.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True)
            theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
            assert list(theirs) == ours
    s = "Solve for x: 3*x + 4 = 19"
    assert hf(s, add_special_tokens=False)["input_ids"] == tok.encode(s)
    assert hf.decode(tok.encode(s)) == s
    assert hf.bos_token_id == 0 and hf.eos_token_id == 1


def test_reload(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert again.encode("Question: 1+1") == tok.encode("Question: 1+1")
    with pytest.raises(NanoseekError):
        Tokenizer.from_dir(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(NanoseekError):
        Tokenizer.from_dir(tmp_path / "bad")
