"""The package's folders are its layers, and each imports only from the layers below it (docs/design.md):

    utils -> penalty -> models -> distributed -> data -> refusal -> procon -> train | integrations -> cli

A module may import its own layer and any layer below; train and integrations are siblings (neither imports
the other); ``fastprocon/__init__.py`` exposes the penalty API only. Imports inside functions (lazy ones) are
for the command line only: anywhere else they hide an upward dependency."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastprocon"
LAYERS = ["kernels", "utils", "penalty", "models", "distributed", "data", "refusal", "procon",
          ("train", "integrations"), "cli"]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in ((layer,) if isinstance(layer, str) else layer)}


def layer_of(module: str) -> str | None:
    """'fastprocon.procon.hooks' -> 'procon'; the package root itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        if "kernels" in rel.parts:
            continue
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        yield name, path


def fastprocon_imports(tree: ast.AST):
    """(imported module, line, at module level?) for every import of fastprocon, names resolved:
    `from fastprocon.x import y` counts as fastprocon.x.y when y is a module (a layer, for the root)."""
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                and node.module.split(".")[0] == "fastprocon"):
            targets = [f"{node.module}.{a.name}" if node.module == "fastprocon" else node.module for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.split(".")[0] == "fastprocon"]
        else:
            continue
        for target in targets:
            yield target, node.lineno, id(node) in top


def test_every_folder_is_a_known_layer_and_a_regular_package():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.is_symlink() and any(p.glob("*.py"))}
    assert folders <= set(RANK), f"folders without a layer in tests/test_layers.py: {folders - set(RANK)}"
    # a folder without __init__.py would be left out of a wheel by setup.py's find_packages
    missing = sorted(name for name in folders if not (PACKAGE / name / "__init__.py").exists())
    assert not missing, f"layer folders without __init__.py: {missing}"


@pytest.mark.parametrize("module,path", list(modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_only_go_downwards(module, path):
    layer = layer_of(module)
    problems = []
    for target, line, at_top in fastprocon_imports(ast.parse(path.read_text())):
        where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
        if not at_top and layer != "cli":
            problems.append(f"{where} inside a function (only cli/ imports lazily)")
        target_layer = layer_of(target)
        if target_layer is None or target_layer not in RANK:
            problems.append(f"{where}: not a layer")
            continue
        if layer is None:   # fastprocon/__init__.py: the penalty API
            if target_layer != "penalty":
                problems.append(f"{where}: the package root exposes the penalty API only")
            continue
        if target_layer != layer and RANK[target_layer] >= RANK[layer]:
            problems.append(f"{where}: {target_layer} is not below {layer}")
    assert not problems, "\n".join(problems)
