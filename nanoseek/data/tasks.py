"""Reasoning task families from `reasoning-gym`, each with a small programmatic solver that writes the worked,
step-by-step solution (gsm_symbolic carries its own). The same steps become pretraining text now and cold-start
`<think>` traces for SFT later; `reasoning-gym`'s own `score_answer` stays the verifier.

Sizes are chosen so that a few-million-parameter model can learn them on a CPU.
"""

from dataclasses import dataclass, field
from typing import Callable

import reasoning_gym
import sympy

from nanoseek.errors import NanoseekError


def _chain(expr: str) -> list[str]:
    """'4 - 1 - 7' -> ['4 - 1 = 3', '3 - 7 = -4'] (left to right)."""
    toks = expr.split()
    total, steps = int(toks[0]), []
    for op, num in zip(toks[1::2], toks[2::2]):
        new = total + int(num) if op == "+" else total - int(num)
        steps.append(f"{total} {op} {num} = {new}")
        total = new
    return steps


def _equation(eq: str, var: str) -> list[str]:
    lhs, rhs = eq.split("=")
    v = sympy.Symbol(var)
    expr = sympy.expand(sympy.sympify(lhs) - sympy.sympify(rhs))
    a, b = expr.coeff(v, 1), expr.coeff(v, 0)
    return [f"Move everything to one side: {a}*{var} + ({b}) = 0",
            f"{a}*{var} = {-b}",
            f"{var} = {-b} / {a} = {sympy.nsimplify(-b / a)}"]


def _letters(entry) -> list[str]:
    letter = entry["metadata"]["target_letter"]
    counts = [(w, w.lower().count(letter)) for w in entry["metadata"]["span"]]
    steps = [f'"{w}" has {c}' for w, c in counts]
    steps.append(" + ".join(str(c) for _, c in counts) + f" = {sum(c for _, c in counts)}")
    return steps


def _backward(entry) -> list[str]:
    w = entry["metadata"]["word"]
    return [f"The letters of {w}: {' '.join(w)}", f"Reversed: {' '.join(reversed(w))}"]


def _bits(entry) -> list[str]:
    n, b = entry["metadata"]["number"], entry["metadata"]["binary"]
    return [f"{n} in binary is {b}", f"It has {b.count('1')} ones"]


def _gsm(entry) -> list[str]:
    cot = entry["metadata"].get("answer_cot", "")
    return [line.strip() for line in cot.splitlines() if line.strip()]


@dataclass
class Family:
    name: str  # the reasoning-gym dataset
    config: dict = field(default_factory=dict)
    solve: Callable | None = None  # entry -> list of steps

    def steps(self, entry) -> list[str]:
        return self.solve(entry)


FAMILIES = {
    # one-digit terms, 3-5 of them: every problem takes 2-4 steps, each within a tiny model's reach
    "chain_sum": Family("chain_sum", dict(min_terms=3, max_terms=5, min_digits=1, max_digits=1),
                        lambda e: _chain(e["metadata"]["expression"])),
    # + and - only: reasoning-gym 0.1.25 scores "3 + 2 * 3" as 15 (left to right), so products would teach nonsense
    "basic_arithmetic": Family("basic_arithmetic", dict(min_terms=3, max_terms=5, min_digits=1, max_digits=1,
                                                        operators=("+", "-"), allow_parentheses=False,
                                                        allow_negation=False),
                               lambda e: _chain(e["metadata"]["expression"])),
    "simple_equations": Family("simple_equations", dict(min_terms=2, max_terms=2, max_value=9),
                               lambda e: _equation(e["metadata"]["equation"], e["metadata"]["variable"])),
    "letter_counting": Family("letter_counting", dict(min_words=3, max_words=6), _letters),
    "spell_backward": Family("spell_backward", dict(min_word_len=3, max_word_len=7), _backward),
    "count_bits": Family("count_bits", dict(min_n=1, max_n=1023), _bits),
    "gsm_symbolic": Family("gsm_symbolic", {}, _gsm),
}
DEFAULT_TRAIN = ("chain_sum", "simple_equations", "letter_counting", "spell_backward", "count_bits", "gsm_symbolic")
DEFAULT_HELDOUT = ("basic_arithmetic",)  # never in training: evaluation only
RL_FAMILIES = ("chain_sum", "simple_equations", "letter_counting", "count_bits")  # GRPO's, eval's, distill's default


def check_families(families) -> None:
    """A family name that is not in FAMILIES is a user mistake: one clear line naming the choices."""
    for f in families:
        if f not in FAMILIES:
            raise NanoseekError(f"unknown task family {f!r}; choose from {', '.join(FAMILIES)}")


def generate(name: str, n: int, seed: int) -> list[dict]:
    """n entries of a family: {'question', 'answer', 'steps', 'family', 'entry'} (entry: reasoning-gym's own)."""
    fam = FAMILIES[name]
    ds = reasoning_gym.create_dataset(fam.name, size=n, seed=seed, **fam.config)
    out = []
    for entry in ds:
        out.append({"question": entry["question"], "answer": str(entry["answer"]), "steps": fam.steps(entry),
                    "family": name, "entry": entry})
    return out


def problem_pool(families, n: int, seed: int, offset: int) -> list[dict]:
    """n problems of each family, with reasoning-gym's own entry (what score_answer needs); family i draws from seed
    seed*1000 + offset + i. Each stage has its own offset (data/chat.py SEED_*), so GRPO, evaluation and
    distillation never meet the same problem."""
    check_families(families)
    pool = []
    for i, f in enumerate(families):
        pool += generate(f, n, seed * 1000 + offset + i)
    return pool


def render(ex: dict) -> str:
    """A worked example as pretraining text."""
    steps = "\n".join(ex["steps"])
    return f"Problem: {ex['question'].strip()}\nSolution:\n{steps}\nAnswer: {ex['answer']}"
