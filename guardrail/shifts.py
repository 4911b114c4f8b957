"""Which shift vectors fit a guard, and where its dataset-level shift comes from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from guardrail.errors import ShiftMismatchError
from shift_store import (
    FORMAT_VERSION,
    CachedShiftSource,
    Lookup,
    ModelFingerprint,
    ShiftKey,
    ShiftStore,
    ShiftVector,
)

# Where the engine measures a shift: the last prompt token (decode steps have their own vectors).
MEASURED_POSITION = "last-prompt-token"


@dataclass(frozen=True)
class ShiftRequirements:
    """Everything a shift vector depends on: model, shape, corruption, position, format; and,
    when pinned, the calibration it must come from."""

    model: ModelFingerprint
    corruption: str
    position: str = MEASURED_POSITION
    format_version: int = FORMAT_VERSION
    calibration_id: str | None = None

    def check(self, shift: ShiftVector) -> None:
        """Raise :class:`ShiftMismatchError` naming every way ``shift`` does not fit."""
        meta, expected = shift.meta, (self.model.num_layers, self.model.hidden_size)
        problems = []
        if tuple(shift.vectors.shape) != expected:
            problems.append(f"shape {tuple(shift.vectors.shape)}, model needs {expected}")
        if meta.model.id != self.model.id:
            problems.append(
                f"computed on model {meta.model.name_or_path} ({meta.model.id}), "
                f"not {self.model.name_or_path} ({self.model.id})"
            )
        if meta.corruption != self.corruption:
            problems.append(f"corruption {meta.corruption!r}, guard uses {self.corruption!r}")
        if meta.position != self.position:
            problems.append(f"measured at {meta.position!r}, guard needs {self.position!r}")
        if meta.format_version != self.format_version:
            problems.append(
                f"format version {meta.format_version}, guard reads {self.format_version}"
            )
        if self.calibration_id is not None and meta.calibration_id != self.calibration_id:
            problems.append(
                f"calibration {meta.calibration_id}, guard is pinned to {self.calibration_id}"
            )
        if problems:
            raise ShiftMismatchError("shift does not fit: " + "; ".join(problems))

    def key(self, anchor_name: str) -> ShiftKey:
        """The store key of a dataset-level shift that fits, calibrated on ``anchor_name``."""
        return ShiftKey(
            model_id=self.model.id,
            corruption=self.corruption,
            position=self.position,
            anchor=anchor_name,
            format_version=self.format_version,
        )


@dataclass(frozen=True)
class DatasetShifts:
    """The dataset-level shift of a guard: none, a fixed vector, or a store entry (cached).

    Every lookup is checked against ``requirements``: a vector that does not fit is never
    returned, whatever its key says.
    """

    requirements: ShiftRequirements
    fixed: ShiftVector | None = None
    source: CachedShiftSource | None = None
    anchor_name: str | None = None

    @classmethod
    def from_store(
        cls,
        requirements: ShiftRequirements,
        store: ShiftStore,
        anchor_name: str,
        revalidate_s: float = 1.0,
    ) -> DatasetShifts:
        source = CachedShiftSource(store, requirements.key(anchor_name), revalidate_s=revalidate_s)
        return cls(requirements, source=source, anchor_name=anchor_name)

    def ensure(self, compute: Callable[[], ShiftVector], lock_timeout_s: float = 0.0) -> None:
        """Compute and store the shift on a miss, once across processes (store sources only)."""
        if self.source is not None:
            self.source.ensure(compute, lock_timeout_s=lock_timeout_s)

    def current(self) -> Lookup:
        """The vector to use now, or a note saying why there is none."""
        lookup = self.source.current() if self.source is not None else Lookup(self.fixed)
        if lookup.vector is None:
            return lookup
        try:
            self.requirements.check(lookup.vector)
        except ShiftMismatchError as e:
            return Lookup(
                None, note=f"dataset-level shift rejected: {e}", store_down=lookup.store_down
            )
        return lookup

    @property
    def key_name(self) -> str | None:
        """The store key looked up, if the shift comes from a store."""
        return self.source.key.name if self.source is not None else None

    def for_requirements(self, requirements: ShiftRequirements) -> DatasetShifts:
        """The same source for other requirements: itself when they are equal, else a lookup
        under the key that fits them (same store and anchors), or nothing for a fixed vector."""
        if requirements == self.requirements:
            return self
        if self.source is None or self.anchor_name is None:
            return DatasetShifts(requirements)
        return self.from_store(
            requirements, self.source.store, self.anchor_name, self.source.revalidate_s
        )
