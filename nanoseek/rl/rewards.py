"""Verifiable rewards: R1's accuracy and format rewards, and user reward functions by Python path.

A reward function is `fn(completion: str, problem: dict) -> float`: `completion` is what the model wrote after the
generation prompt (which opens `<think>`), i.e. `thought\\n</think>\\n\\nanswer`; `problem` holds at least
`question` and `answer` (the gold answer), and for reasoning-gym tasks `family` and `entry` (reasoning-gym's own item,
what its `score_answer` needs).

Built in:
  accuracy  reasoning-gym's own `score_answer` for reasoning-gym tasks, math-verify for anything else
  math      math-verify: the answer and the gold answer parsed (LaTeX or plain) and compared symbolically
  format    1 if the completion closes its thought once and then answers (`…\\n</think>\\n\\n<answer>`), else 0
Anything else is `module:function` (the module importable, e.g. a file on PYTHONPATH). A function that raises or
returns something other than a finite number scores 0 for that completion and is counted and reported by name; it
is probed once before a run starts, so a broken one stops the run with one line before anything is written.
"""

import importlib
import logging
import math
import numbers
import re
import threading
from dataclasses import dataclass, field
from typing import Callable

import reasoning_gym
from math_verify import parse, verify

from nanoseek.data.tasks import FAMILIES
from nanoseek.errors import NanoseekError

_FORMAT = re.compile(r"^(?!.*<think>)(?!.*</think>.*</think>).*\S.*\n</think>\n\n\S.*$", re.S)


def extract_answer(completion: str) -> str | None:
    """The answer: the text after the last `</think>`, stripped (None when the thought never closed)."""
    if "</think>" not in completion:
        return None
    return completion.rsplit("</think>", 1)[1].strip()


def format_reward(completion: str, problem: dict) -> float:
    return 1.0 if _FORMAT.match(completion) else 0.0


def math_reward(completion: str, problem: dict) -> float:
    answer = extract_answer(completion)
    if not answer:
        return 0.0
    # math-verify's time limit uses SIGALRM, which only the main thread may set
    t = 5 if threading.current_thread() is threading.main_thread() else None
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold = parse(str(problem["answer"]), parsing_timeout=t)
    pred = parse(answer, parsing_timeout=t)
    return 1.0 if gold and pred and verify(gold, pred, timeout_seconds=t) else 0.0


_SCORERS: dict[str, Callable] = {}


def accuracy_reward(completion: str, problem: dict) -> float:
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    if problem.get("entry") is not None and problem.get("family"):
        name = FAMILIES[problem["family"]].name if problem["family"] in FAMILIES else problem["family"]
        if name not in _SCORERS:
            _SCORERS[name] = reasoning_gym.get_score_answer_fn(name)
        return float(_SCORERS[name](answer, problem["entry"]))
    return math_reward(completion, problem)


BUILTIN = {"accuracy": accuracy_reward, "math": math_reward, "format": format_reward}


def resolve(spec: str) -> Callable:
    """A built-in name or `module:function` -> the function (errors name what to fix)."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise NanoseekError(f"reward {spec!r}: not a built-in ({', '.join(BUILTIN)}) nor module:function")
    mod_name, fn_name = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise NanoseekError(f"reward {spec!r}: cannot import module {mod_name!r} ({e})") from None
    except Exception as e:  # the module itself is broken
        raise NanoseekError(f"reward {spec!r}: importing {mod_name!r} failed: {type(e).__name__}: {e}") from None
    fn = getattr(mod, fn_name, None)
    if fn is None:
        raise NanoseekError(f"reward {spec!r}: module {mod_name!r} has no attribute {fn_name!r}")
    if not callable(fn):
        raise NanoseekError(f"reward {spec!r}: {fn_name!r} is not callable")
    return fn


def parse_specs(specs: list[str]) -> list[tuple[str, float]]:
    """['accuracy', 'format=0.1', 'my.mod:fn=2'] -> [(name, weight)]."""
    out = []
    for s in specs:
        name, _, w = s.rpartition("=") if "=" in s else (s, "", "1")
        try:
            weight = float(w)
        except ValueError:
            raise NanoseekError(f"reward {s!r}: the weight after '=' must be a number") from None
        if not math.isfinite(weight):
            raise NanoseekError(f"reward {s!r}: the weight must be finite")
        out.append((name, weight))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise NanoseekError(f"a reward is named twice in {specs}")
    return out


@dataclass
class Reward:
    """A reward function by name, with its weight and a tally of failures."""
    name: str
    weight: float
    fn: Callable
    errors: int = 0
    last_error: str = ""
    calls: int = 0
    _step_errors: list = field(default_factory=list)

    def __call__(self, completion: str, problem: dict) -> float:
        self.calls += 1
        try:
            v = self.fn(completion, problem)
        except Exception as e:  # a user's reward must not end the run: score 0, count, report
            return self._fail(f"raised {type(e).__name__}: {e}")
        if not isinstance(v, numbers.Real):
            return self._fail(f"returned {type(v).__name__} ({v!r:.40}), not a number")
        v = float(v)
        if not math.isfinite(v):
            return self._fail(f"returned {v}")
        return v

    def _fail(self, msg: str) -> float:
        self.errors += 1
        self.last_error = msg
        return 0.0

    def probe(self, completion: str, problem: dict) -> None:
        """Call once on a known completion before the run: a broken function stops the run with one line."""
        before = self.errors
        self(completion, problem)
        if self.errors > before:
            raise NanoseekError(f"reward {self.name!r} {self.last_error} on a test completion; fix it before "
                                f"training")


def build(specs: list[str]) -> list[Reward]:
    return [Reward(name, w, resolve(name)) for name, w in parse_specs(specs)]
