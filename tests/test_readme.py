"""The README's public API table matches the code (every signature written there is the real one), and the code
snippets of "Use in your own training code" run as they stand.

Each first-column cell of the table holds one or more code spans such as ``dino_loss(student_logits, ..., *,
n_global_crops=2)``; each is parsed as a Python parameter list and compared with ``inspect.signature`` of the
function (or class) of that name in ``dino_kernels``: the same names in the same order, the same positional /
keyword-only split and the same defaults. A renamed parameter on either side fails here.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import torch

import dino_kernels

README = Path(__file__).resolve().parents[1] / "README.md"
SIGNATURE = re.compile(r"`(\w+)\((.*?)\)`")


def _api_table_signatures() -> list[tuple[str, str]]:
    section = README.read_text().split("## Public API", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [match.groups() for row in rows for match in SIGNATURE.finditer(row.split(" | ")[0])]


def _written(params: str) -> list[tuple[str, str, object]]:
    """(name, kind, default) per parameter of a signature as the README writes it."""
    args = ast.parse(f"def f({params}): pass").body[0].args
    positional = [(a.arg, "positional") for a in args.args]
    defaults = [inspect.Parameter.empty] * (len(positional) - len(args.defaults))
    defaults += [ast.literal_eval(d) for d in args.defaults]
    keyword = [(a.arg, "keyword-only") for a in args.kwonlyargs]
    kw_defaults = [inspect.Parameter.empty if d is None else ast.literal_eval(d) for d in args.kw_defaults]
    return [(n, k, d) for (n, k), d in zip(positional + keyword, defaults + kw_defaults)]


def _actual(obj) -> list[tuple[str, str, object]]:
    kinds = {inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional", inspect.Parameter.POSITIONAL_ONLY: "positional",
             inspect.Parameter.KEYWORD_ONLY: "keyword-only"}
    return [(p.name, kinds.get(p.kind, str(p.kind)), p.default) for p in inspect.signature(obj).parameters.values()]


SIGNATURES = _api_table_signatures()


def test_the_table_lists_every_public_op():
    documented = {name for name, _ in SIGNATURES}
    public = {name for name in dino_kernels.__all__ if callable(getattr(dino_kernels, name))}
    # DINOLossStats is a result type and BACKENDS a constant: not calls a user writes.
    assert public - documented == {"DINOLossStats"}


@pytest.mark.parametrize(("name", "params"), SIGNATURES, ids=[name for name, _ in SIGNATURES])
def test_readme_signature_matches_code(name, params):
    assert hasattr(dino_kernels, name), f"README documents dino_kernels.{name}, which does not exist"
    assert _written(params) == _actual(getattr(dino_kernels, name)), f"README's {name}({params})"


def _adoption_snippets() -> list[str]:
    section = README.read_text().split("\n## Use in your own training code", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


SNIPPETS = _adoption_snippets()


def test_the_adoption_section_has_its_snippets():
    # A DINO v1 fork, a lightly pipeline, a timm backbone, DINOv2's import line.
    assert len(SNIPPETS) == 4, f"expected 4 Python blocks in 'Use in your own training code', found {len(SNIPPETS)}"


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_adoption_snippet_runs(code):
    torch.manual_seed(0)
    exec(compile(code, "README.md snippet", "exec"), {"__name__": "__main__"})
