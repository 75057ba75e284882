"""The kernels sit under the model: nothing in ``mixtral.kernels`` imports the model, the engine or the benchmarks
(the tuners live in ``mixtral.bench``), and the tile tables do not import the kernels that use them (no
``moe_configs`` <-> ``sorted_moe`` cycle). Checked on the source, imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import mixtral.kernels

KERNELS = Path(mixtral.kernels.__file__).parent


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_kernels_import_nothing_above_them() -> None:
    files = sorted(KERNELS.rglob("*.py"))
    assert len(files) > 10
    for path in files:
        above = [n for n in _imports(path) if n.startswith(("mixtral.model", "mixtral.engine", "mixtral.bench",
                                                            "mixtral.serve", "mixtral.cli"))]
        assert not above, f"{path.relative_to(KERNELS)} imports {above}"


def test_tile_tables_do_not_import_their_kernels() -> None:
    imported = _imports(KERNELS / "triton" / "moe_configs.py")
    assert not [n for n in imported if "sorted_moe" in n or "fused_moe" in n], imported
