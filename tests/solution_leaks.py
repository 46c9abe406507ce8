"""Does a cell (or what it printed) contain an exercise's solution? A detector for the student version's
tests.

Code is compared by shape, not by spelling: every name is replaced by ``_`` except module-like names
(``torch``, ``math``, ``F``) and attributes, so ``l_a * torch.exp(m_a - m)`` and ``l * torch.exp(m - m_new)``
look the same. A text *leaks* a solution when it holds most of the solution's substantial statements, any
large expression of it, or one of its longer lines verbatim.
"""

import ast
import copy
import re
import textwrap

KEEP = {"torch", "math", "F", "np", "nn"}
REGION = re.compile(r"### BEGIN SOLUTION[^\n]*\n(.*?)^[ \t]*### END SOLUTION", re.S | re.M)
STATEMENT_NODES = 6  # statements smaller than this (`return x`, `B, T = x.shape`) are not evidence
EXPRESSION_NODES = 24  # one expression this large (in AST nodes), found elsewhere, is enough ...
EXPRESSION_SHARE = 0.5  # ... when it is also this share of the whole solution (not a common idiom)
SHARE = 0.8  # or this share of the solution's substantial statements


class _Anonymise(ast.NodeTransformer):
    def visit_Name(self, node):
        return ast.copy_location(ast.Name(id=node.id if node.id in KEEP else "_", ctx=ast.Load()), node)

    def visit_arg(self, node):
        return ast.copy_location(ast.arg(arg="_"), node)

    def visit_Constant(self, node):
        if isinstance(node.value, str):  # docstrings and messages say what, not how
            return ast.copy_location(ast.Constant(value="_"), node)
        return node


def _size(node) -> int:
    return sum(1 for _ in ast.walk(node))


def _shape(node) -> str:
    return ast.unparse(_Anonymise().visit(copy.deepcopy(node)))


def _parse(text: str):
    for candidate in (text, textwrap.dedent(text)):
        try:
            return [ast.parse(candidate)]
        except SyntaxError:
            continue
    trees = []  # printed source with a cut-off start: parse what parses, line by line
    for line in text.splitlines():
        try:
            trees.append(ast.parse(line.strip()))
        except SyntaxError:
            continue
    return trees


def _statements_and_expressions(text: str, smallest: int = EXPRESSION_NODES) -> tuple[set[str], set[str]]:
    statements, expressions = set(), set()
    for tree in _parse(text):
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Return, ast.Expr)):
                value = node.value if not isinstance(node, ast.Expr) else node.value
                if value is not None and _size(node) >= STATEMENT_NODES:
                    statements.add(_shape(value))
            if isinstance(node, ast.expr) and _size(node) >= smallest:
                expressions.add(_shape(node))
    return statements, expressions


def solution_regions(source: str) -> list[str]:
    return [textwrap.dedent(region) for region in REGION.findall(source)]


def leak(solution: str, text: str) -> str | None:
    """Why ``text`` contains ``solution`` (the code of one solution region), or None."""
    total = sum(_size(tree) for tree in _parse(solution))
    own_statements, own_expressions = _statements_and_expressions(
        solution, max(EXPRESSION_NODES, int(EXPRESSION_SHARE * total))
    )
    statements, expressions = _statements_and_expressions(text)
    big = own_expressions & expressions
    if big:
        return f"an expression of the solution: {sorted(big, key=len)[-1]}"
    if own_statements:
        found = own_statements & statements
        if len(found) >= max(1, SHARE * len(own_statements)):
            return f"{len(found)} of the solution's {len(own_statements)} statements: {sorted(found)}"
    lines = [line.strip() for line in solution.splitlines()]
    copied = [
        line
        for line in lines
        if len(line) >= 25 and not line.startswith(("#", '"""', "'''")) and line in text
    ]
    if any(len(line) >= 40 for line in copied) or len(copied) >= 2:
        return f"the solution's lines {copied}"
    return None
