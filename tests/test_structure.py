"""The seams stay seams: no family or task branches in the trainer, short functions."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _functions():
    for path in sorted((ROOT / "ftjax").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(ROOT), node.name, node.end_lineno - node.lineno + 1


def test_no_function_over_150_lines_and_a_short_loop():
    long = [f"{p}:{name} ({n} lines)" for p, name, n in _functions() if n > 150]
    assert not long, long
    loop = [n for p, name, n in _functions() if str(p) == "ftjax/train.py" and name == "train_and_evaluate"]
    assert loop and loop[0] <= 120, loop


def test_no_family_branches_outside_the_family_modules():
    files = [ROOT / "ftjax" / "train.py", ROOT / "ftjax" / "export.py", ROOT / "ftjax" / "inference.py",
             *(ROOT / "ftjax" / "convert").glob("*.py"), *(ROOT / "ftjax" / "tasks").glob("*.py"),
             ROOT / "ftjax" / "methods" / "__init__.py"]
    pattern = re.compile(r"family\s*(==|!=|in\s*\()|== \"(bert|vit|resnet|efficientnet)\"")
    hits = [f"{f.relative_to(ROOT)}:{i}" for f in files
            for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_every_family_spec_is_complete():
    from ftjax import models

    for name in models.FAMILIES:
        spec = models.family(name)
        assert spec.name == name and "tiny" in spec.variants
        layout = spec.layout(spec.config(models.variant_config(name, "tiny")))
        assert layout.num_layers >= 1
        assert hasattr(spec.converter_module(), "convert")
