"""The project's modules import each other without loops (module-level imports: what runs at import time)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("urae", "networks", "comfyui_urae")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules this file imports at its top level (functions' own imports run later and may break a
    loop on purpose)."""
    out = set()
    pkg = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            names = subs if len(subs) == len(node.names) else [base, *subs]  # `from pkg import module`
        out |= {n for n in names if n in modules}
    return out


def test_no_import_loop_between_the_projects_modules():
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p) for p in files}
    graph = {_module_name(p): _imports(p, modules) - {_module_name(p)} for p in files}
    assert len(graph) > 40 and graph["urae.trainer"] >= {"urae.train_plan", "urae.train_sync"}

    def cycle_from(start):
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for dep in graph.get(node, ()):
                if dep == start:
                    return path + [dep]
                if dep not in seen:
                    seen.add(dep)
                    stack.append((dep, path + [dep]))
        return None

    loops = [c for m in sorted(graph) if (c := cycle_from(m))]
    assert loops == [], " ; ".join(" -> ".join(c) for c in loops[:3])
