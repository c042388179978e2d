"""The conversation contract has one definition (qwen_sft/conversation), and both stages use it.

    python -m pytest -q tests/test_conversation_contract.py

An AST scan of qwen_sft/ fails when a second record error, a second role list, a second validator or tool-call
normaliser, or a reason name outside ``REASONS`` appears; a run of convert and one of tokenize over the same bad
records must reject the same lines with the same reasons (so their reject counts add up).
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from qwen_sft.conversation import REASONS, RENAMED, ROLES

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "qwen_sft"
CONTRACT = PACKAGE / "conversation"
# Functions only the contract may define (their old copies lived in data/ and tokenize/).
CONTRACT_FUNCTIONS = frozenset(("validate_conversation", "normalize_tool_call", "_tool_call", "calls_from_value",
                                "normalize_tools", "tool_list", "normalize_record", "build_record", "maybe_json"))
# Exceptions outside the contract that carry a reason but are not record rejects: a length drop.
NOT_REJECTS = frozenset(("Overlong",))


def _is_exception(node: ast.ClassDef) -> bool:
    return any(isinstance(b, ast.Name) and (b.id.endswith(("Error", "Exception"))) for b in node.bases)


def _sets_reason(node: ast.ClassDef) -> bool:
    return any(isinstance(t, ast.Attribute) and t.attr == "reason" and isinstance(t.value, ast.Name)
               and t.value.id == "self" for sub in ast.walk(node) if isinstance(sub, ast.Assign) for t in sub.targets)


def _role_literal(value: ast.AST) -> bool:
    if not isinstance(value, ast.Tuple | ast.List | ast.Set):
        return False
    found = {e.value for e in value.elts if isinstance(e, ast.Constant)}
    return set(ROLES) <= found


def contract_findings(source: str, where: str) -> list[str]:
    """What in one module outside qwen_sft/conversation redefines a piece of the contract."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and _is_exception(node) and node.name not in NOT_REJECTS:
            if _sets_reason(node) or node.name in ("RecordError", "BadRecord"):
                out.append(f"{where}:{node.lineno}: a second record error type, class {node.name}")
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
            if "ROLES" in names or (node.value is not None and _role_literal(node.value)):
                out.append(f"{where}:{node.lineno}: a second role list ({', '.join(names) or 'a literal'})")
        elif isinstance(node, ast.FunctionDef) and node.name in CONTRACT_FUNCTIONS:
            out.append(f"{where}:{node.lineno}: def {node.name} belongs to qwen_sft/conversation")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "arguments":
            out.append(f"{where}:{node.lineno}: tool-call arguments read outside the tool-call normaliser")
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) \
                and node.slice.value == "arguments":
            out.append(f"{where}:{node.lineno}: tool-call arguments read outside the tool-call normaliser")
    return out


def raised_reasons(source: str) -> list[tuple[int, str]]:
    """(line, reason) of every ``RecordError("literal", ...)`` in a module."""
    return [(node.lineno, node.args[0].value) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "RecordError"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)]


def modules(root: Path) -> list[Path]:
    found = sorted(root.rglob("*.py"))
    assert len(found) > 50, f"the scan found only {len(found)} modules under {root}"
    return found


def test_the_guard_catches_the_old_duplicates():
    """The scan finds what the tokenize stage held before the contract had one home (render.py, abridged)."""
    old_render = '''
ROLES = ("system", "user", "assistant", "tool")

class RecordError(ValueError):
    def __init__(self, reason, detail):
        self.reason = reason

def _tool_call(call, where):
    args = call.get("arguments", {})
'''
    found = contract_findings(old_render, "render.py")
    assert [f.split(": ", 1)[1].split(" ")[0:3] for f in found] == [
        ["a", "second", "role"], ["a", "second", "record"], ["def", "_tool_call", "belongs"],
        ["tool-call", "arguments", "read"]], found
    assert contract_findings("class ConfigError(ValueError):\n    pass\n", "x.py") == []
    assert contract_findings('PLAIN_ROLES = ("system", "user", "assistant")\n', "x.py") == []


def test_each_contract_piece_has_one_definition():
    findings = []
    for path in modules(PACKAGE):
        if CONTRACT not in path.parents:
            source, where = path.read_text(encoding="utf-8"), str(path.relative_to(REPO))
            findings += contract_findings(source, where)
            if path.parent.name in ("data", "tokenize"):  # the stages' old validators were plain ``validate``
                findings += [f"{where}:{n.lineno}: def validate: the conversation rules are validate_conversation's"
                             for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)
                             and n.name == "validate"]
    assert not findings, "\n".join(findings)
    assert not (PACKAGE / "data" / "validate.py").exists() and not (PACKAGE / "data" / "messages.py").exists()


def test_every_reason_raised_is_listed_and_documented():
    raised = Counter()
    unlisted = []
    for path in modules(PACKAGE):
        for line, reason in raised_reasons(path.read_text(encoding="utf-8")):
            raised[reason] += 1
            if reason not in REASONS:
                unlisted.append(f"{path.relative_to(REPO)}:{line}: {reason}")
    assert not unlisted, "reasons not in qwen_sft.conversation.errors.REASONS:\n" + "\n".join(unlisted)
    assert len(raised) > 30  # the scan really saw the package's rejects
    docs = (REPO / "docs" / "convert.md").read_text(encoding="utf-8") + (REPO / "docs" / "tokenize.md").read_text(
        encoding="utf-8")
    undocumented = [r for r in [*REASONS, *RENAMED] if f"`{r}`" not in docs]
    assert not undocumented, f"reasons docs/convert.md and docs/tokenize.md do not name: {undocumented}"
    assert not set(RENAMED) & set(REASONS)  # an old name is never reused for another problem


U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}


def _call(fn: dict) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": fn}]}


DEEP = '{"a":' + "[" * 300 + "]" * 300 + "}"  # parses (orjson reads 1,024 levels), cannot be written (255)
# (reason, record): each record has exactly one problem
BAD = [
    ("no_messages", {"messages": []}),
    ("unknown_role", {"messages": [{"role": "bot", "content": "x"}, A]}),
    ("wrong_type", {"messages": [U, {"role": "assistant", "content": 5}]}),
    ("wrong_type", {"messages": [U, {**A, "loss": "yes"}]}),
    ("system_not_first", {"messages": [U, A, {"role": "system", "content": "late"}, A]}),
    ("empty_content", {"messages": [{"role": "user", "content": " "}, A]}),
    ("empty_assistant", {"messages": [U, {"role": "assistant", "content": ""}]}),
    ("tool_calls_on_non_assistant", {"messages": [{**_call({"name": "f", "arguments": {}}), "role": "user",
                                                   "content": "x"}, A]}),
    ("tool_without_call", {"messages": [U, {"role": "tool", "content": "r"}, A]}),
    ("no_supervised_tokens", {"messages": [U]}),
    ("no_supervised_tokens", {"messages": [U, {**A, "loss": False}]}),
    ("arguments_not_object", {"messages": [U, _call({"name": "f", "arguments": "print(1)"})]}),
    ("arguments_not_object", {"messages": [U, _call({"name": "f", "arguments": '{"x": NaN}'})]}),
    ("bad_tool_call", {"messages": [U, _call({"arguments": {}})]}),
    ("nested_too_deep", {"messages": [U, _call({"name": "f", "arguments": DEEP})]}),
    ("invalid_json_field", {"messages": [U, A], "tools": "[oops"}),
    ("bad_tool", {"messages": [U, A], "tools": [5]}),
    ("wrong_type", {"messages": [U, A], "tools": {"name": "f"}}),
]


def test_convert_and_tokenize_give_the_same_reason_for_the_same_bad_record(tmp_path):
    from qwen_sft.data.cli import main as convert_main
    from qwen_sft.tokenize.pipeline import tokenize_chatml_file

    src = tmp_path / "bad.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for _, r in BAD) + json.dumps({"messages": [U, A]}) + "\n")
    assert convert_main([str(src), "-o", str(tmp_path / "conv.jsonl"), "--no_progress"]) == 0
    stats = tokenize_chatml_file(src, tmp_path / "tok.jsonl", model="offline", max_len=512, progress=False)
    expected = [(line, reason) for line, (reason, _) in enumerate(BAD, 1)]
    for name in ("conv.jsonl", "tok.jsonl"):
        rows = [json.loads(x) for x in (tmp_path / f"{name}.rejects.jsonl").read_text().splitlines()]
        assert [(r["line"], r["reason"]) for r in rows] == expected, name
    assert stats["samples"] == 1 and stats["rejected"] == dict(Counter(reason for reason, _ in BAD))
    assert len((tmp_path / "conv.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("path", ["docs/convert.md", "docs/tokenize.md"])
def test_docs_list_no_reason_the_package_no_longer_raises(path):
    """A reason in backticks followed by 'rejected' context must exist: old names appear only as renames."""
    text = (REPO / path).read_text(encoding="utf-8")
    for old in RENAMED:
        for match in re.finditer(f"`{old}`", text):
            line = text[text.rfind("\n", 0, match.start()) + 1 : text.find("\n", match.end())]
            assert "→" in line or "renamed" in line.lower(), f"{path}: {old} named outside the renames: {line}"
