"""The active calibration file and its history: versioned writes, listing and roll-back.

Why a history: a technician who re-calibrates on a bad day must be able to get yesterday's numbers
back with one command. Every write moves the previous active file into `history_dir` under its
version number before the new one replaces it (atomically), so nothing measured is ever lost.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from calibration.record import TOOL_FOR, CalibrationFile, now_iso

log = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """A calibration file that cannot be used; the message says what to re-measure."""


@dataclass(frozen=True)
class Version:
    version: int
    written_at: str
    sections: tuple[str, ...]
    note: str
    path: Path
    active: bool


def _describe_validation(e: ValidationError, path: Path) -> str:
    lines = [f"{path}: the calibration file is invalid:"]
    for err in e.errors():
        loc = [str(x) for x in err["loc"]]
        section = loc[0] if loc else ""
        fix = f" — re-run `{TOOL_FOR[section]}`" if section in TOOL_FOR else ""
        lines.append(f"  - {'.'.join(loc) or '(top level)'}: {err['msg'].removeprefix('Value error, ')}{fix}")
    return "\n".join(lines)


def read_calibration(path: Path) -> CalibrationFile:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise CalibrationError(f"{path}: not valid YAML ({e}); restore one with `kozan calibrate history "
                               "--rollback N` or re-run the calibration tools") from None
    if not isinstance(data, dict):
        raise CalibrationError(f"{path}: expected a mapping of sections; restore one with `kozan calibrate "
                               "history --rollback N` or re-run the calibration tools")
    try:
        return CalibrationFile.model_validate(data)
    except ValidationError as e:
        raise CalibrationError(_describe_validation(e, path)) from None


class CalibrationStore:
    def __init__(self, active: str | Path, history_dir: str | Path):
        self.active = Path(active)
        self.history_dir = Path(history_dir)

    @staticmethod
    def from_config(cfg: Any) -> "CalibrationStore":
        return CalibrationStore(cfg.resolve(cfg.calibration.path), cfg.resolve(cfg.calibration.history_dir))

    def load(self) -> CalibrationFile | None:
        """The active calibration, or None when there is none yet."""
        if not self.active.exists():
            return None
        return read_calibration(self.active)

    def save(self, cal: CalibrationFile, note: str = "") -> CalibrationFile:
        """Write `cal` as the new active calibration; the previous one goes to the history."""
        prev = self.load() if self.active.exists() else None
        version = max([v.version for v in self.versions()] + [0]) + 1
        new = cal.model_copy(update={"version": version, "written_at": now_iso(), "note": note or cal.note})
        if prev is not None:
            self._archive(prev)
        self.active.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(new.to_yaml_dict(), sort_keys=False)
        fd, tmp = tempfile.mkstemp(dir=self.active.parent, prefix=".calibration-", suffix=".yaml")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, self.active)
        log.info("calibration version %d written to %s (%s)", version, self.active, note)
        return new

    def update(self, section: str, value: Any, note: str) -> CalibrationFile:
        """Replace one section of the active calibration (or start a new file) and save."""
        cur = self.load() or CalibrationFile()
        return self.save(cur.model_copy(update={section: value}), note)

    def _archive(self, cal: CalibrationFile) -> Path:
        self.history_dir.mkdir(parents=True, exist_ok=True)
        dest = self.history_dir / f"v{cal.version:04d}.yaml"
        if not dest.exists():
            shutil.copy2(self.active, dest)
        return dest

    def versions(self) -> list[Version]:
        """Every version on disk, oldest first; the active one is marked."""
        out: dict[int, Version] = {}
        if self.history_dir.exists():
            for p in sorted(self.history_dir.glob("v*.yaml")):
                try:
                    c = read_calibration(p)
                except CalibrationError as e:
                    log.warning("skipping unreadable history file %s: %s", p, e)
                    continue
                out[c.version] = Version(c.version, c.written_at, _sections(c), c.note, p, False)
        if self.active.exists():
            c = read_calibration(self.active)
            out[c.version] = Version(c.version, c.written_at, _sections(c), c.note, self.active, True)
        return [out[k] for k in sorted(out)]

    def rollback(self, version: int) -> CalibrationFile:
        """Make an older version active again (as a new version, so the roll-back is itself history)."""
        found = [v for v in self.versions() if v.version == version]
        if not found:
            have = [v.version for v in self.versions()]
            raise CalibrationError(f"no calibration version {version}; versions on disk: {have}")
        if found[0].active:
            return read_calibration(self.active)
        old = read_calibration(found[0].path)
        return self.save(old, note=f"rolled back to version {version}")


def _sections(c: CalibrationFile) -> tuple[str, ...]:
    return tuple(s for s in ("camera", "belt", "encoder", "diverters") if getattr(c, s) is not None)
