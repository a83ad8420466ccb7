"""Reasoning task families from `reasoning-gym`, each with a small programmatic solver that writes the worked,
step-by-step solution (gsm_symbolic carries its own). The same steps become pretraining text now and cold-start
`<think>` traces for SFT later; `reasoning-gym`'s own `score_answer` stays the verifier.

Sizes are chosen so that a few-million-parameter model can learn them on a CPU.
"""

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import reasoning_gym
import sympy

from nanoseek.checkpoint import atomic_write
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


def _term(a, var: str) -> str:
    return var if a == 1 else f"-{var}" if a == -1 else f"{a}*{var}"


def _equation(eq: str, var: str) -> list[str]:
    """'7*v + 2 = 65' -> ['7*v = 65 - 2', '7*v = 63', 'v = 63 / 7', 'v = 9']: the constant moved across, the sign of
    the unknown made positive, then one division; each step one operation a small model has seen many times."""
    lhs, rhs = (sympy.sympify(side) for side in eq.split("="))
    v = sympy.Symbol(var)
    lhs, rhs = sympy.expand(lhs - rhs.coeff(v, 1) * v), rhs.coeff(v, 0)  # unknown on the left, number on the right
    a, b = lhs.coeff(v, 1), lhs.coeff(v, 0)
    steps, r = [], rhs
    if b != 0:
        steps.append(f"{_term(a, var)} = {r} {'-' if b > 0 else '+'} {abs(b)}")
        r = r - b
        steps.append(f"{_term(a, var)} = {r}")
    if a < 0:
        a, r = -a, -r
        steps.append(f"{_term(a, var)} = {r}")
    if a != 1:
        steps.append(f"{var} = {r} / {a}")
        r = sympy.nsimplify(r / a)
        steps.append(f"{var} = {r}")
    return steps or [f"{var} = {r}"]


def _letters(entry) -> list[str]:
    """Each word spelled letter by letter, every occurrence of the target letter numbered as it is met, the count
    carried from word to word: 'hundred: h u n(1) d r e d', 'thousand: t h o u s a n(2) d', 'Total: 2'."""
    letter, count, steps = entry["metadata"]["target_letter"], 0, []
    for w in entry["metadata"]["span"]:
        spelled = []
        for ch in w.lower():
            if ch == letter:
                count += 1
                spelled.append(f"{ch}({count})")
            else:
                spelled.append(ch)
        steps.append(f"{w}: {' '.join(spelled)}")
    steps.append(f"Total: {count}")
    return steps


def _backward(entry) -> list[str]:
    w = entry["metadata"]["word"]
    return [f"The letters of {w}: {' '.join(w)}", f"Reversed: {' '.join(reversed(w))}"]


def _bits(entry) -> list[str]:
    """'160 in binary is 10100000', then the digits copied one by one with each 1 numbered: '1(1) 0 1(2) 0 0 0 0 0'
    (the tokenizer splits digits, so each is one token), 'It has 2 ones'."""
    n, b = entry["metadata"]["number"], entry["metadata"]["binary"]
    count, marked = 0, []
    for d in b:
        if d == "1":
            count += 1
            marked.append(f"1({count})")
        else:
            marked.append("0")
    return [f"{n} in binary is {b}", " ".join(marked), f"It has {count} ones"]


def _gsm(entry) -> list[str]:
    cot = entry["metadata"].get("answer_cot", "")
    return [line.strip() for line in cot.splitlines() if line.strip()]


# ---- drills: the single facts the worked steps are made of, for the pretraining corpus (like a times table) ----

def _sum_fact(rng, cfg) -> str:
    """'13 + 7 = 20': a running total of the family's size and one more term."""
    top = 10 ** cfg.get("max_digits", 1) - 1
    span = (cfg.get("max_terms", 2) - 1) * top
    a = rng.randint(0, top) if rng.random() < 0.5 else rng.randint(-span, span)
    b, op = rng.randint(0, top), rng.choice("+-")
    return f"{a} {op} {b} = {a + b if op == '+' else a - b}"


def _equation_fact(rng, cfg) -> str:
    """'65 - 2 = 63' or '63 / 7 = 9': moving a constant across, then the division."""
    v = cfg.get("max_value", 9)
    if rng.random() < 0.5:
        c, b, op = rng.randint(-10 * v, 10 * v), rng.randint(1, v), rng.choice("+-")
        return f"{c} {op} {b} = {c + b if op == '+' else c - b}"
    a, x = rng.randint(1, 4 * v), rng.randint(1, v)
    return f"{a * x} / {a} = {x}"


def _binary_fact(rng, cfg) -> str:
    n = rng.randint(cfg.get("min_n", 1), cfg.get("max_n", 255))
    return f"{n} in binary is {bin(n)[2:]}"


_WORDS = []


def _spelling_fact(rng, cfg) -> str:
    """'hundred is spelled h u n d r e d', a word of the text letter_counting draws its spans from. Not in the worked
    step's 'word: letters' form, so that in the corpus a line's 'word:' is only ever followed by the question's next
    word (random words in that form would outnumber the solution lines)."""
    if not _WORDS:
        from reasoning_gym.data import read_data_file
        _WORDS.extend(w for w in re.findall(r"\b\w+\b", read_data_file("in_the_year_2889.txt")) if w.isalnum())
    w = rng.choice(_WORDS)
    return f"{w} is spelled {' '.join(w.lower())}"


@dataclass
class Family:
    name: str  # the reasoning-gym dataset
    config: dict = field(default_factory=dict)
    solve: Callable | None = None  # entry -> list of steps
    fact: Callable | None = None  # (random.Random, config) -> one fact line its steps use (drills), or None

    def steps(self, entry) -> list[str]:
        return self.solve(entry)


FAMILIES = {
    # one-digit terms, 2-4 of them: every problem takes 1-3 steps, each within a tiny model's reach
    "chain_sum": Family("chain_sum", dict(min_terms=2, max_terms=4, min_digits=1, max_digits=1),
                        lambda e: _chain(e["metadata"]["expression"]), _sum_fact),
    # + and - only: reasoning-gym 0.1.25 scores "3 + 2 * 3" as 15 (left to right), so products would teach nonsense
    "basic_arithmetic": Family("basic_arithmetic", dict(min_terms=3, max_terms=5, min_digits=1, max_digits=1,
                                                        operators=("+", "-"), allow_parentheses=False,
                                                        allow_negation=False),
                               lambda e: _chain(e["metadata"]["expression"])),
    "simple_equations": Family("simple_equations", dict(min_terms=2, max_terms=2, max_value=9),
                               lambda e: _equation(e["metadata"]["equation"], e["metadata"]["variable"]),
                               _equation_fact),
    "letter_counting": Family("letter_counting", dict(min_words=2, max_words=4), _letters, _spelling_fact),
    "spell_backward": Family("spell_backward", dict(min_word_len=3, max_word_len=7), _backward),
    "count_bits": Family("count_bits", dict(min_n=1, max_n=255), _bits, _binary_fact),
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


def family_configs(families) -> dict[str, dict]:
    """Family names (each with its built-in size) or {name: reasoning-gym config} -> {name: config}: the exact
    arguments of `reasoning_gym.create_dataset` for each family (JSON types: tuples become lists)."""
    if isinstance(families, dict):
        check_families(families)
        for f, cfg in families.items():
            if not isinstance(cfg, dict):
                raise NanoseekError(f"the config of family {f!r} must be an object of reasoning-gym arguments, "
                                    f"got {json.dumps(cfg)[:60]}")
            generate(f, 1, 0, cfg)  # reasoning-gym checks the arguments: a bad one is found before any work
        return {f: dict(cfg) for f, cfg in families.items()}
    check_families(families)
    return {f: json.loads(json.dumps(FAMILIES[f].config)) for f in families}


def write_families(path, trained, heldout) -> dict:
    """OUT/families.json: `{"trained": {name: config}, "heldout": {name: config}}`, the exact problem distributions
    a run trains and scores (every stage of the main job reads it back with `--families path`); anyone can draw
    fresh problems from it with reasoning-gym. Written atomically."""
    trained, heldout = family_configs(trained), family_configs(heldout)
    if set(trained) & set(heldout):
        raise NanoseekError(f"families {sorted(set(trained) & set(heldout))} cannot be both trained and held out")
    spec = {"trained": trained, "heldout": heldout}
    atomic_write(Path(path), json.dumps(spec, indent=2) + "\n")
    return spec


def read_families(path) -> dict:
    """A families.json back -> {"trained": {name: config}, "heldout": {name: config}}, checked."""
    p = Path(path)
    if not p.is_file():
        raise NanoseekError(f"families file {p} does not exist (write one with nanoseek families)")
    try:
        spec = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanoseekError(f"{p} is not valid JSON ({e})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("trained"), dict) or not spec["trained"]:
        raise NanoseekError(f'{p}: expected {{"trained": {{name: config, ...}}, "heldout": {{name: config}}}}')
    out = {"trained": family_configs(spec["trained"]), "heldout": family_configs(spec.get("heldout") or {})}
    if set(out["trained"]) & set(out["heldout"]):
        raise NanoseekError(f"{p}: families {sorted(set(out['trained']) & set(out['heldout']))} are both trained "
                            f"and held out")
    return out


def families_arg(values, part: str = "trained"):
    """A `--families` / `--heldout` value as given: family names, or one families.json path (its `part`)."""
    if values and len(values) == 1 and str(values[0]).endswith(".json"):
        return read_families(values[0])[part]
    return values


def generate(name: str, n: int, seed: int, config: dict | None = None) -> list[dict]:
    """n entries of a family: {'question', 'answer', 'steps', 'family', 'entry'} (entry: reasoning-gym's own).
    `config` replaces the family's built-in reasoning-gym arguments (a families.json's)."""
    fam = FAMILIES[name]
    cfg = fam.config if config is None else config
    try:
        ds = reasoning_gym.create_dataset(fam.name, size=n, seed=seed, **cfg)
    except (TypeError, AssertionError, ValueError) as e:
        raise NanoseekError(f"family {name}: reasoning-gym rejects the config {json.dumps(cfg)} ({e})") from None
    out = []
    for entry in ds:
        out.append({"question": entry["question"], "answer": str(entry["answer"]), "steps": fam.steps(entry),
                    "family": name, "entry": entry})
    return out


def problem_pool(families, n: int, seed: int, offset: int) -> list[dict]:
    """n problems of each family (names, or {name: config}), with reasoning-gym's own entry (what score_answer
    needs); family i draws from seed seed*1000 + offset + i. Each stage has its own offset (data/chat.py SEED_*), so
    GRPO, evaluation and distillation never meet the same problem."""
    pool = []
    for i, (f, cfg) in enumerate(family_configs(families).items()):
        pool += generate(f, n, seed * 1000 + offset + i, cfg)
    return pool


def drills(families, n: int, seed: int, lines: int = 8) -> list[str]:
    """n drill documents, spread evenly over the families that have facts: `lines` facts of one family each, as
    'Facts:\\n13 + 7 = 20\\n...'. Pretraining text only (never a problem to solve): the single steps of the worked
    solutions, practised apart so the model can take them when it meets them inside a solution."""
    fams = [(f, cfg) for f, cfg in family_configs(families).items() if FAMILIES[f].fact]
    if not fams or n <= 0:
        return []
    rng = random.Random(seed)
    return ["Facts:\n" + "\n".join(FAMILIES[f].fact(rng, cfg) for _ in range(lines))
            for i in range(n) for f, cfg in [fams[i % len(fams)]]]


def render(ex: dict) -> str:
    """A worked example as pretraining text."""
    steps = "\n".join(ex["steps"])
    return f"Problem: {ex['question'].strip()}\nSolution:\n{steps}\nAnswer: {ex['answer']}"
