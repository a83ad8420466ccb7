"""The task families: every worked step of the solvers is true and ends at reasoning-gym's answer (its own
score_answer gives it full marks); families.json written, read back, honoured (a changed config changes the
problems) and refused in one line when malformed; the report's side-by-side thoughts."""

import json
import re
import subprocess
import sys

import pytest
import reasoning_gym
import sympy

from nanoseek.data.tasks import (FAMILIES, RL_FAMILIES, family_configs, generate, problem_pool, read_families,
                                 write_families)
from nanoseek.errors import NanoseekError
from nanoseek.report import side_by_side


@pytest.mark.parametrize("family", list(RL_FAMILIES) + ["basic_arithmetic"])
def test_worked_solutions_end_at_the_verified_answer(family):
    score = reasoning_gym.get_score_answer_fn(FAMILIES[family].name)
    for ex in generate(family, 150, 7):
        assert ex["answer"] in ex["steps"][-1]
        assert score(ex["answer"], ex["entry"]) == 1.0


def test_equation_steps_are_all_true():
    for ex in generate("simple_equations", 200, 3):
        var = ex["entry"]["metadata"]["variable"]
        v = sympy.Symbol(var)
        for step in ex["steps"]:
            lhs, rhs = step.split("=")
            assert sympy.simplify(sympy.sympify(lhs) - sympy.sympify(rhs)).subs(v, int(ex["answer"])) == 0, step
        assert ex["steps"][-1] == f"{var} = {ex['answer']}"


def test_chain_steps_are_the_question_left_to_right():
    for ex in generate("chain_sum", 100, 5):
        expr = ex["entry"]["metadata"]["expression"].split()
        assert len(ex["steps"]) == len(expr) // 2
        for i, step in enumerate(ex["steps"]):
            a, op, b, _, c = step.split()
            assert (op, b) == (expr[2 * i + 1], expr[2 * i + 2]) and int(c) == eval(f"{a} {op} {b}")


def test_letters_spelled_and_counted_as_they_come():
    for ex in generate("letter_counting", 100, 2):
        letter, n = ex["entry"]["metadata"]["target_letter"], 0
        for word, step in zip(ex["entry"]["metadata"]["span"], ex["steps"]):
            head, spelled = step.split(": ")
            assert head == word
            letters = spelled.split()
            assert "".join(re.sub(r"\(\d+\)$", "", x) for x in letters) == word.lower()
            for x in letters:
                if x[0] == letter:
                    n += 1
                    assert x == f"{letter}({n})"
                else:
                    assert "(" not in x
        assert ex["steps"][-1] == f"Total: {n}" and str(n) == ex["answer"]


def test_bits_copied_digit_by_digit_with_a_running_count():
    for ex in generate("count_bits", 100, 4):
        n = ex["entry"]["metadata"]["number"]
        binary, marked, last = ex["steps"][0].split()[-1], ex["steps"][1].split(), ex["steps"][2]
        assert binary == bin(n)[2:]
        assert [m[0] for m in marked] == list(binary)
        assert [m for m in marked if m != "0"] == [f"1({i + 1})" for i in range(binary.count("1"))]
        assert last == f"It has {binary.count('1')} ones"


def test_families_file_round_trip_and_honoured(tmp_path):
    f = tmp_path / "families.json"
    spec = write_families(f, ["chain_sum", "count_bits"], ["basic_arithmetic"])
    assert read_families(f) == spec == {"trained": family_configs(["chain_sum", "count_bits"]),
                                        "heldout": family_configs(["basic_arithmetic"])}
    # an edited config is what the problems are drawn from
    spec["trained"]["chain_sum"].update(min_terms=2, max_terms=2)
    f.write_text(json.dumps(spec))
    pool = problem_pool(read_families(f)["trained"], 20, 0, 300)
    assert all(len(p["entry"]["metadata"]["expression"].split()) == 3 for p in pool if p["family"] == "chain_sum")
    assert problem_pool(["count_bits"], 5, 0, 300)[0]["question"] == \
        problem_pool({"count_bits": spec["trained"]["count_bits"]}, 5, 0, 300)[0]["question"]
    with pytest.raises(NanoseekError, match="cannot be both trained and held out"):
        write_families(tmp_path / "x.json", ["chain_sum"], ["chain_sum"])


@pytest.mark.parametrize("content, message", [
    ("{", "is not valid JSON"),
    ('{"heldout": {}}', 'expected {"trained"'),
    ('{"trained": {"nope": {}}}', "unknown task family 'nope'"),
    ('{"trained": {"chain_sum": {"bogus": 1}}}', "reasoning-gym rejects the config"),
    ('{"trained": {"chain_sum": {}}, "heldout": {"chain_sum": {}}}', "both trained and held out"),
])
def test_bad_families_file_is_one_line(tmp_path, content, message):
    f = tmp_path / "families.json"
    f.write_text(content)
    r = subprocess.run([sys.executable, "-m", "nanoseek", "sft", "--init", str(tmp_path), "--out",
                        str(tmp_path / "o"), "--families", str(f), "--examples", "4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_side_by_side_picks_a_problem_that_rose():
    def ev(correct, text):
        rows = [{"family": "chain_sum", "question": f"q{i}", "answer": "1", "correct": c, "k": 8,
                 "example": f"{text} {i}\n|x|"} for i, c in enumerate(correct)]
        return {"trained": ["chain_sum"], "per_problem": rows}
    rows = side_by_side(ev([3, 2, 5], "before"), ev([3, 6, 1], "after"))
    assert len(rows) == 3 and "q1" in rows[2] and "before 1<br>\\|x\\|" in rows[2] and "6/8" in rows[2]


def test_drill_facts_are_true():
    from nanoseek.data.tasks import drills
    docs = drills(RL_FAMILIES, 40, 0)
    assert len(docs) == 40 and all(d.startswith("Facts:\n") and len(d.splitlines()) == 9 for d in docs)
    kinds = set()
    for d in docs:
        for line in d.splitlines()[1:]:
            if " in binary is " in line:
                n, b = line.split(" in binary is ")
                assert bin(int(n))[2:] == b and 1 <= int(n) <= 255
                kinds.add("bits")
            elif " is spelled " in line:
                w, spelled = line.split(" is spelled ")
                assert spelled.split() == list(w.lower())
                kinds.add("spell")
            else:
                lhs, rhs = line.split(" = ")
                assert sympy.sympify(lhs) == int(rhs), line
                kinds.add("arith")
    assert kinds == {"bits", "spell", "arith"}
    assert drills(["gsm_symbolic"], 5, 0) == [] and drills(RL_FAMILIES, 4, 1) == drills(RL_FAMILIES, 4, 1)


def test_drills_join_the_training_split_only():
    from nanoseek.data.corpus import embedded_splits
    plain = embedded_splits(40, 0, RL_FAMILIES)
    with_drills = embedded_splits(40, 0, RL_FAMILIES, drills=0.5)
    assert sum("text" in ex for ex in with_drills["train"]) == 20 and len(with_drills["train"]) == 60
    assert not any("text" in ex for ex in plain["train"] + with_drills["val"] + with_drills["heldout"])
    assert [ex["question"] for ex in with_drills["train"] if "question" in ex] != [] and \
        sorted(ex["question"] for ex in plain["train"]) == \
        sorted(ex["question"] for ex in with_drills["train"] if "question" in ex)
