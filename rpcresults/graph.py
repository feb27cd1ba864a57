"""The dependency graph of a result and its descendants, as ``AsyncResult.build_graph()`` returns it."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, List, Tuple

__all__ = ('DependencyGraph',)


class DependencyGraph:
    """Nodes and their children, as ``build_graph()`` returns them."""

    def __init__(self) -> None:
        self.adjacent: Dict[Any, List[Any]] = {}

    def add_arc(self, node: Any) -> None:
        """Add ``node`` (with no children yet); a node already present is kept as is."""
        self.adjacent.setdefault(node, [])

    def add_edge(self, parent: Any, child: Any) -> None:
        """Record ``child`` as a child of ``parent`` (adding ``parent`` when new)."""
        self.add_arc(parent)
        self.adjacent[parent].append(child)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.adjacent)

    def __len__(self) -> int:
        return len(self.adjacent)

    def __contains__(self, node: object) -> bool:
        return node in self.adjacent

    def items(self) -> Iterable[Tuple[Any, List[Any]]]:
        """``(node, children)`` for every node, in insertion order."""
        return self.adjacent.items()

    def edges(self) -> List[Tuple[Any, Any]]:
        """Every ``(parent, child)`` pair of the graph."""
        return [(parent, child) for parent, children in self.adjacent.items() for child in children]

    def to_dot(self) -> str:
        """Graphviz source of the graph."""
        lines = ['digraph dependencies {']
        for node in self.adjacent:
            lines.append(f'  "{node}";')
        for parent, child in self.edges():
            lines.append(f'  "{parent}" -> "{child}";')
        lines.append('}')
        return '\n'.join(lines)
