"""The class taxonomy, read from `datasets/taxonomy.yaml`.

One file names the classes so that the renderer, the dataset writer, the detector's sanity
checks and the sorting rules can never disagree about what a class id means.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
TAXONOMY_PATH = REPO_ROOT / "datasets" / "taxonomy.yaml"

BATTERY_GROUPS = frozenset({"li_ion", "battery"})


@dataclass(frozen=True)
class ClassInfo:
    id: int
    name: str
    group: str
    description: str

    @property
    def is_battery(self) -> bool:
        return self.group in BATTERY_GROUPS

    @property
    def is_li_ion(self) -> bool:
        return self.group == "li_ion"

    @property
    def is_board(self) -> bool:
        return self.group == "board"


@dataclass(frozen=True)
class Taxonomy:
    classes: tuple[ClassInfo, ...]
    distractors: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    def by_name(self, name: str) -> ClassInfo:
        for c in self.classes:
            if c.name == name:
                return c
        raise KeyError(f"unknown class {name!r}; the taxonomy has {self.names}")

    def id_of(self, name: str) -> int:
        return self.by_name(name).id


@lru_cache(maxsize=4)
def load_taxonomy(path: Path = TAXONOMY_PATH) -> Taxonomy:
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    classes = tuple(
        ClassInfo(id=i, name=c["name"], group=c["group"], description=c["description"])
        for i, c in enumerate(data["classes"])
    )
    distractors = tuple(d["name"] for d in data.get("distractors", []))
    return Taxonomy(classes=classes, distractors=distractors)
