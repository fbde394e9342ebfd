"""The demo's built-in dataset: templated arithmetic word problems with worked answers.

Generated from a seed by our own code (nothing is downloaded). Each answer writes the
computation out as equations and ends GSM8K-style with `#### <number>`, e.g.

    Question: Mia has 12 marbles. She buys 7 more. How many marbles does Mia have now?
    Answer: Mia has 12 + 7 = 19 marbles. #### 19

The problems mix one- and two-step additions, subtractions, multiplications and
divisions with small whole numbers, so a 135M model learns the format within a few dozen
steps and still has arithmetic left to learn: ranks then differ measurably.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

NAMES = ("Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Eva", "Ben", "Lily", "Noah", "Emma", "Omar", "Nina", "Ravi")
ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "books", "coins", "shells", "cards", "stamps", "eggs", "toys")
CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("basket", "baskets"), ("jar", "jars"), ("crate", "crates"))

Problem = dict[str, str]


def _add(rng: random.Random) -> Problem:
    n, it = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    return {
        "question": f"{n} has {a} {it}. {n} buys {b} more. How many {it} does {n} have now?",
        "answer": f"{n} has {a} + {b} = {a + b} {it}. #### {a + b}",
    }


def _sub(rng: random.Random) -> Problem:
    n, it = rng.choice(NAMES), rng.choice(ITEMS)
    a = rng.randint(10, 80)
    b = rng.randint(1, a - 1)
    return {
        "question": f"{n} had {a} {it} and gave {b} of them to a friend. How many {it} does {n} have left?",
        "answer": f"{n} has {a} - {b} = {a - b} {it} left. #### {a - b}",
    }


def _mul(rng: random.Random) -> Problem:
    n, it = rng.choice(NAMES), rng.choice(ITEMS)
    one, many = rng.choice(CONTAINERS)
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return {
        "question": f"{n} has {a} {many} with {b} {it} in each {one}. How many {it} does {n} have in total?",
        "answer": f"{n} has {a} * {b} = {a * b} {it}. #### {a * b}",
    }


def _div(rng: random.Random) -> Problem:
    n, it = rng.choice(NAMES), rng.choice(ITEMS)
    k, q = rng.randint(2, 9), rng.randint(2, 12)
    total = k * q
    return {
        "question": f"{n} shares {total} {it} equally among {k} friends. How many {it} does each friend get?",
        "answer": f"Each friend gets {total} / {k} = {q} {it}. #### {q}",
    }


def _mul_add(rng: random.Random) -> Problem:
    n, it = rng.choice(NAMES), rng.choice(ITEMS)
    one, many = rng.choice(CONTAINERS)
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 20)
    p = a * b
    return {
        "question": f"{n} buys {a} {many} of {it} with {b} in each {one}, and finds {c} more {it}. "
        f"How many {it} does {n} have?",
        "answer": f"The {many} hold {a} * {b} = {p} {it}. Then {p} + {c} = {p + c}. #### {p + c}",
    }


def _add_sub(rng: random.Random) -> Problem:
    n, it = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(5, 50), rng.randint(5, 50)
    c = rng.randint(1, a + b - 1)
    s = a + b
    return {
        "question": f"{n} has {a} {it} and gets {b} more, then uses {c} of them. How many {it} are left?",
        "answer": f"First {a} + {b} = {s}. Then {s} - {c} = {s - c}. #### {s - c}",
    }


TEMPLATES: tuple[Callable[[random.Random], Problem], ...] = (_add, _sub, _mul, _div, _mul_add, _add_sub)


def make_problems(n: int, seed: int = 0) -> list[Problem]:
    """`n` problems ({"question", "answer"}), the same list for the same (n, seed)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    return [rng.choice(TEMPLATES)(rng) for _ in range(n)]


def make_splits(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """Disjoint train / held-out problems (no question appears in both)."""
    problems, seen = [], set()
    rng_seed = seed
    while len(problems) < n_train + n_eval:
        for p in make_problems(n_train + n_eval, rng_seed):
            if p["question"] not in seen and len(problems) < n_train + n_eval:
                seen.add(p["question"])
                problems.append(p)
        rng_seed += 1_000_003
    return problems[:n_train], problems[n_train:]


def write_jsonl(problems: list[Problem], path: str | os.PathLike) -> Path:
    """Write problems as JSONL (question/answer records, the GSM8K layout)."""
    path = Path(path)
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    return path
