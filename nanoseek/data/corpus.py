"""Text generated locally from `reasoning-gym`'s procedural tasks: no download. A small default corpus for the
tokenizer and the smoke run; the pretraining work widens it into the full embedded corpus."""

import random

TASKS = ("basic_arithmetic", "chain_sum", "simple_equations", "count_bits", "letter_counting", "number_sorting",
         "gsm_symbolic")


def reasoning_texts(n: int, seed: int = 0, tasks=TASKS) -> list[str]:
    """n question/answer documents drawn round-robin from `tasks` (gsm_symbolic with its worked solution)."""
    import reasoning_gym
    per = -(-n // len(tasks))
    docs = []
    for i, name in enumerate(tasks):
        ds = reasoning_gym.create_dataset(name, size=per, seed=seed * 1000 + i)
        for x in ds:
            cot = x["metadata"].get("answer_cot")
            body = f"{cot}\n" if cot else ""
            docs.append(f"Question: {x['question']}\n{body}Answer: {x['answer']}\n")
    random.Random(seed).shuffle(docs)
    return docs[:n]
