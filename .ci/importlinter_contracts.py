"""import-linter contract types of ckptkit's own (run by `lint-imports` in CI, with this folder on PYTHONPATH).

``private_names``: no module imports another module's private names (``from x import _y``), and a private
module (``x._impl``) is imported only from inside the package that holds it. Dunder names are not private.
"""

from __future__ import annotations

import ast
import importlib.util
from typing import Any

from importlinter import Contract, ContractCheck, fields, output


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _source(module: str) -> str | None:
    spec = importlib.util.find_spec(module)
    return spec.origin if spec is not None and spec.origin and spec.origin.endswith(".py") else None


class PrivateNamesContract(Contract):
    """Modules in ``containers`` import no private names of other modules."""

    containers = fields.ListField(subfield=fields.StringField())

    def check(self, graph: Any, verbose: bool) -> ContractCheck:
        violations: list[str] = []
        containers = list(self.containers)  # type: ignore[attr-defined]
        for importer in sorted(graph.modules):
            if not any(importer == c or importer.startswith(c + ".") for c in containers):
                continue
            path = _source(importer)
            if path is None:
                continue
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            is_package = path.endswith("__init__.py")
            package = importer if is_package else importer.rpartition(".")[0]
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                        target = f"{base}.{node.module}" if node.module else base
                    else:
                        target = node.module or ""
                    if not any(target == c or target.startswith(c + ".") for c in containers):
                        continue
                    for alias in node.names:
                        if _private(alias.name) and target != importer:
                            violations.append(f"{importer}:{node.lineno} imports private name {alias.name} "
                                              f"from {target}")  # fmt: skip
                    modules = [target]
                elif isinstance(node, ast.Import):
                    modules = [a.name for a in node.names
                               if any(a.name == c or a.name.startswith(c + ".") for c in containers)]  # fmt: skip
                else:
                    continue
                for target in modules:
                    parts = target.split(".")
                    for i, part in enumerate(parts):
                        if _private(part):
                            owner = ".".join(parts[:i])  # the package that holds the private module
                            if not (importer == owner or importer.startswith(owner + ".")):
                                violations.append(f"{importer}:{node.lineno} imports private module {target} "
                                                  f"from outside {owner}")  # fmt: skip
                            break
        return ContractCheck(kept=not violations, metadata={"violations": violations})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for v in check.metadata["violations"]:
            output.print_error(v)
            output.new_line()
        output.print("Make the name public in its module (no leading underscore, listed in __all__) if other "
                     "modules need it, or keep the use inside that module.")  # fmt: skip
