"""The synthetic reasoning task: chained arithmetic mod 10 with a worked, step-by-step solution.

A problem is a start digit and `n_ops` operations, e.g. the prompt ``4+7*3-2-5>``. Its solution writes
every intermediate result, each step starting from the previous step's result, so an early wrong step
derails every later one, and ends with the verifiable final answer after ``#``:

    4+7=1;1*3=3,3-2=1;1-5=6;#6.

The separator after each step (``;`` or ``,``) is a surface-form choice with no effect on the answer
(the kind of token where teacher and student may disagree without a reasoning fork). Its style:
"random" draws it uniformly; "parity" writes ``;`` after an even result and ``,`` after an odd one
(a teacher's "house style": confident, learnable, and irrelevant to the answer).

Token ids: 0 = PAD, 1 = BOS, then one id per character of `CHARS`. Every prompt of a task has the same
length, so batches of prompts need no padding and rollouts share absolute positions.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
import random

import torch

CHARS = "0123456789+-*=;,>#."
PAD_ID = 0
BOS_ID = 1
VOCAB_SIZE = 2 + len(CHARS)
CHAR_TO_ID = {c: i + 2 for i, c in enumerate(CHARS)}
ID_TO_CHAR = {i: c for c, i in CHAR_TO_ID.items()}
EOS_ID = CHAR_TO_ID["."]
OPS = "+-*"
SEPARATORS = ";,"
SEPARATOR_STYLES = ("random", "parity")


@dataclass(frozen=True)
class TaskConfig:
    """What defines the task: the number of operations, the held-out test set size and its seed."""

    n_ops: int = 4
    test_size: int = 512
    test_seed: int = 12345

    @property
    def prompt_len(self) -> int:
        """Tokens in an encoded prompt: BOS, start digit, n_ops (op, digit) pairs, '>'."""
        return 3 + 2 * self.n_ops

    @property
    def response_len(self) -> int:
        """Tokens in a well-formed solution: 6 per step, then '#', the answer digit and '.'."""
        return 6 * self.n_ops + 3

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Problem:
    """A start digit and a chain of (operator, digit) operations."""

    start: int
    ops: tuple[tuple[str, int], ...]

    @property
    def prompt(self) -> str:
        return str(self.start) + "".join(f"{op}{b}" for op, b in self.ops) + ">"

    def intermediate_results(self) -> list[int]:
        """The result after each operation, mod 10."""
        value, results = self.start, []
        for op, b in self.ops:
            value = apply_op(value, op, b)
            results.append(value)
        return results

    @property
    def answer(self) -> int:
        return self.intermediate_results()[-1]

    def solution(self, rng: random.Random, style: str = "random") -> str:
        """A correct worked solution; separators in `style` ("random" draws them from `rng`)."""
        check_style(style)
        value, steps = self.start, []
        for op, b in self.ops:
            result = apply_op(value, op, b)
            separator = rng.choice(SEPARATORS) if style == "random" else SEPARATORS[result % 2]
            steps.append(f"{value}{op}{b}={result}{separator}")
            value = result
        return "".join(steps) + f"#{value}."


def check_style(style: str) -> str:
    if style not in SEPARATOR_STYLES:
        raise ValueError(f"unknown separator style {style!r}; expected one of {', '.join(SEPARATOR_STYLES)}")
    return style


def apply_op(a: int, op: str, b: int) -> int:
    if op == "+":
        return (a + b) % 10
    if op == "-":
        return (a - b) % 10
    if op == "*":
        return (a * b) % 10
    raise ValueError(f"unknown operator {op!r}")


def random_problem(rng: random.Random, n_ops: int) -> Problem:
    return Problem(rng.randrange(10), tuple((rng.choice(OPS), rng.randrange(10)) for _ in range(n_ops)))


def encode(text: str) -> list[int]:
    return [CHAR_TO_ID[c] for c in text]


def decode(ids) -> str:
    """Characters of `ids`, stopping at the first PAD; BOS is skipped."""
    chars = []
    for i in ids:
        i = int(i)
        if i == PAD_ID:
            break
        if i != BOS_ID:
            chars.append(ID_TO_CHAR[i])
    return "".join(chars)


def parse_answer(response: str) -> int | None:
    """The final answer of a response (the digit between the last '#' and the '.' after it), or None."""
    head, sep, tail = response.rpartition("#")
    if not sep or len(tail) < 2 or not tail[0].isdigit() or tail[1] != ".":
        return None
    return int(tail[0])


class ArithmeticTask:
    """Problem source with a fixed held-out test set; training draws never return a test problem."""

    def __init__(self, config: TaskConfig = TaskConfig()):
        if config.n_ops < 1:
            raise ValueError(f"n_ops must be >= 1, got {config.n_ops}")
        self.config = config
        test_rng = random.Random(config.test_seed)
        tests: dict[str, Problem] = {}
        while len(tests) < config.test_size:
            problem = random_problem(test_rng, config.n_ops)
            tests.setdefault(problem.prompt, problem)
        self.test_problems = list(tests.values())
        self._test_prompts = set(tests)

    def sample_problems(self, count: int, rng: random.Random) -> list[Problem]:
        """`count` training problems (never from the test set), deterministic given `rng`'s state."""
        problems = []
        while len(problems) < count:
            problem = random_problem(rng, self.config.n_ops)
            if problem.prompt not in self._test_prompts:
                problems.append(problem)
        return problems

    def encode_prompts(self, problems: list[Problem]) -> torch.Tensor:
        """(B, prompt_len) long: BOS followed by each prompt."""
        return torch.tensor([[BOS_ID] + encode(p.prompt) for p in problems], dtype=torch.long)

    def encode_solutions(self, problems: list[Problem], rng: random.Random, style: str = "random") -> torch.Tensor:
        """(B, seq_len) long: BOS, prompt and a correct worked solution (separators in `style`) per problem."""
        return torch.tensor(
            [[BOS_ID] + encode(p.prompt + p.solution(rng, style)) for p in problems], dtype=torch.long
        )

    def score(self, problems: list[Problem], tokens: torch.Tensor) -> torch.Tensor:
        """(B,) bool: whether each rollout's final answer is exact. tokens (B, L) include the prompt."""
        start = self.config.prompt_len
        return torch.tensor(
            [parse_answer(decode(row[start:].tolist())) == p.answer for p, row in zip(problems, tokens)],
            dtype=torch.bool,
        )
