"""Chat data for SFT: rows of OpenAI-style `messages`, tokenized with the R1 template, loss on the assistant's tokens.

A row is `{"messages": [{"role": "system"|"user"|"assistant", "content": str, "reasoning_content"?: str}, ...]}`
ending with an assistant turn: the trained target. Its thought is either in `reasoning_content` (DeepSeek's API
field) or inline as `<think>…</think>answer`. As in R1's template, earlier assistant turns keep only their answer
(context, no loss) and the generation prompt opens the thought, so the target is
`{thought}\\n</think>\\n\\n{answer}<｜end▁of▁sentence｜>` after `<｜Assistant｜><think>\\n`.

The embedded default is cold-start data: reasoning-gym problems whose thought is the worked solution a small
programmatic solver writes (`data/tasks.py`), then the answer.

Whole examples are packed into windows of seq_len + 1 tokens with a parallel loss mask; the windows are shuffled per
epoch (seeded), the state being (epoch, cursor) as for pretraining.
"""

import json
from pathlib import Path

import numpy as np
import torch

from nanoseek.data.loader import WindowOrder
from nanoseek.data.tasks import DEFAULT_TRAIN, family_configs, generate
from nanoseek.errors import NanoseekError

# seed offsets of the problem sets (pretraining uses seed*1000 + i for train, +500 val, +900 held-out)
SEED_SFT, SEED_RL, SEED_EVAL, SEED_DISTILL = 100, 200, 300, 400


def cold_start_rows(n: int, seed: int = 0, families=None, partial: float = 0.0) -> list[dict]:
    """n cold-start chat rows drawn evenly from the families: the solver's steps as the thought, then the answer.

    `partial` is the share of rows whose thought stops early, after a uniformly drawn number of its steps (none
    included), followed by the right answer all the same: the model learns to answer from however far it has
    thought (the engine's thinking budget cuts a thought back to its last whole step, `Engine._cut_thought`), and
    reinforcement learning has a choice to make between thinking to the end and answering early."""
    families = family_configs(families or DEFAULT_TRAIN)
    per = -(-n // len(families))
    cut = np.random.default_rng([seed, 1])  # its own stream: partial=0 keeps the rows of before
    rows = []
    for i, (f, cfg) in enumerate(families.items()):
        for ex in generate(f, per, seed * 1000 + SEED_SFT + i, cfg):
            steps = ex["steps"]
            if partial > 0 and cut.random() < partial:
                steps = steps[:int(cut.integers(0, len(steps)))]
            rows.append(trace_row(ex["question"], steps, ex["answer"], family=f))
    rng = np.random.default_rng(seed)
    return [rows[i] for i in rng.permutation(len(rows))[:n]]


def trace_row(question: str, steps: list[str], answer: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": question.strip()},
                         {"role": "assistant", "reasoning_content": "\n".join(steps), "content": str(answer)}],
            **extra}


def read_rows(path) -> list[dict]:
    """A JSONL file of {"messages": [...]} rows; a malformed row is reported with its line number."""
    p = Path(path)
    if not p.is_file():
        raise NanoseekError(f"dataset {p} does not exist")
    rows = []
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise NanoseekError(f"{p}:{i}: not valid JSON ({e.msg})") from None
            check_row(row, f"{p}:{i}")
            rows.append(row)
    if not rows:
        raise NanoseekError(f"{p} holds no rows")
    return rows


def check_row(row, where: str) -> None:
    msgs = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise NanoseekError(f"{where}: a row must be an object with a non-empty 'messages' list")
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str) \
                or not isinstance(m.get("reasoning_content", ""), str):
            raise NanoseekError(f"{where}: each message needs a role (system, user or assistant) and string content, "
                                f"got {json.dumps(m)[:80]}")
    if msgs[-1]["role"] != "assistant":
        raise NanoseekError(f"{where}: the last message must be the assistant's (the trained answer)")
    if not any(m["role"] == "user" for m in msgs):
        raise NanoseekError(f"{where}: no user message")


def split_thought(message: dict) -> tuple[str, str]:
    """An assistant message -> (thought, answer)."""
    if message.get("reasoning_content"):
        return message["reasoning_content"].strip(), message["content"].strip()
    content = message["content"]
    if "</think>" in content:
        thought, answer = content.rsplit("</think>", 1)
        return thought.replace("<think>", "").strip(), answer.strip()
    return "", content.strip()


def target_text(thought: str, answer: str) -> str:
    """What the model writes after the generation prompt `<｜Assistant｜><think>\\n`."""
    return f"{thought}\n</think>\n\n{answer}" if thought else f"</think>\n\n{answer}"


def encode_row(tok, row: dict) -> tuple[list[int], list[int]]:
    """-> (ids, loss mask): the prompt (mask 0) and the final assistant turn + eos (mask 1)."""
    msgs = row["messages"]
    context = [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]]
    prompt = tok.apply_chat_template(context, add_generation_prompt=True)
    target = tok.encode(target_text(*split_thought(msgs[-1]))) + [tok.eos_id]
    return prompt + target, [0] * len(prompt) + [1] * len(target)


def pack(tok, rows: list[dict], seq_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Whole examples packed greedily into windows of seq_len + 1 tokens (an example never starts in one window and
    ends in the next), the rest of a window padded with eos under mask 0. -> ids, mask [n, seq_len + 1], and the
    number of examples cut because they were longer than a window."""
    windows, masks, cur_i, cur_m, cut = [], [], [], [], 0
    W = seq_len + 1

    def flush():
        if cur_i:
            windows.append(cur_i + [tok.eos_id] * (W - len(cur_i)))
            masks.append(cur_m + [0] * (W - len(cur_m)))

    for row in rows:
        i, m = encode_row(tok, row)
        if len(i) > W:
            i, m, cut = i[:W], m[:W], cut + 1
        if len(cur_i) + len(i) > W:
            flush()
            cur_i, cur_m = [], []
        cur_i, cur_m = cur_i + i, cur_m + m
    flush()
    return np.asarray(windows, dtype=np.int64).reshape(-1, W), np.asarray(masks, dtype=np.bool_).reshape(-1, W), cut


class MaskedLoader(WindowOrder):
    """Batches of packed windows: inputs x and targets y, y = -100 where the loss mask is 0."""

    changed = "the SFT data changed since the checkpoint; resume with the same data and --seq-len"

    def __init__(self, ids: np.ndarray, mask: np.ndarray, batch: int, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle: bool = True):
        self.ids, self.mask = ids, mask
        super().__init__(len(ids), batch, rank, world, seed, shuffle)
        if self.n_windows < batch * world:
            raise NanoseekError(f"the SFT data packs into {self.n_windows} windows: too few for one batch of "
                                f"{batch * world} (lower --batch-size / --seq-len or add rows)")

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.next_indices()
        ids, mask = self.ids[idx], self.mask[idx]
        y = np.where(mask[:, 1:], ids[:, 1:], -100)
        return torch.from_numpy(ids[:, :-1].copy()), torch.from_numpy(y)
