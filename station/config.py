"""The station's one configuration file: YAML, validated on load.

Every section has defaults that run the simulated line, so an empty file (or none) is a working
station. Errors name the key, the value given and what is allowed — a technician editing the file
beside a stopped line must be able to fix it from the message alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vision.taxonomy import REPO_ROOT, load_taxonomy

MANUAL_BIN = 0  # end of belt: manual check / reject


class ConfigError(ValueError):
    """A configuration that cannot run a line; the message says what to change."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LineConfig(_Section):
    belt_speed_mm_s: float = Field(500.0, gt=0, le=4000, description="nominal belt speed")
    belt_width_mm: float = Field(400.0, gt=0, le=3000)
    mm_per_count: float = Field(0.1, gt=0, le=10, description="encoder scale")
    decision_line_mm: float = Field(520.0, gt=0, description="from the camera view's upstream edge")
    end_of_belt_mm: float = Field(1900.0, gt=0, description="items past this fall into the manual bin")
    command_margin_ms: float = Field(30.0, ge=0, le=1000,
                                     description="a divert command must reach the MCU this long before it fires")


class CameraConfig(_Section):
    source: str = Field("sim", description="sim | opencv:<index or url or pipeline> | file:<video> | folder:<dir>")
    width: int = Field(1280, ge=64, le=8192)
    height: int = Field(720, ge=64, le=8192)
    fps: float = Field(30.0, gt=0, le=500)
    px_per_mm: float = Field(1.8, gt=0, description="sim camera scale; real stations use calibration")
    exposure_ms: float = Field(1.0, ge=0, le=100, description="sim motion blur")


class DiverterConfig(_Section):
    id: int = Field(ge=1, le=32)
    bin: int = Field(ge=1, le=32)
    position_mm: float = Field(gt=0, description="downstream of the camera view's upstream edge")
    latency_ms: float = Field(15.0, ge=0, le=500)
    pulse_ms: float = Field(40.0, gt=0, le=1000)
    max_on_ms: float = Field(200.0, gt=0, le=5000)
    enabled: bool = True

    @model_validator(mode="after")
    def _pulse_within_max(self) -> "DiverterConfig":
        if self.pulse_ms > self.max_on_ms:
            raise ValueError(f"pulse_ms={self.pulse_ms} exceeds max_on_ms={self.max_on_ms}")
        return self


def _default_diverters() -> list[DiverterConfig]:
    return [DiverterConfig(id=i, bin=i, position_mm=900.0 + 220.0 * (i - 1)) for i in range(1, 5)]


class RulesConfig(_Section):
    class_to_bin: dict[str, int] = Field(default_factory=lambda: {
        "li_ion_cell": 1, "li_ion_pack": 1,
        "alkaline": 2, "nimh": 2, "coin_cell": 2, "lead_acid": 2,
        "board_high": 3, "board_low": 4,
    })
    bin_names: dict[int, str] = Field(default_factory=lambda: {
        0: "manual / end of belt", 1: "Li-ion batteries", 2: "other batteries",
        3: "high-grade boards", 4: "low-grade boards",
    })
    min_confidence: float = Field(0.4, ge=0, le=1, description="mean score of the winning bin over the item's views; below this it goes to manual")
    faint_min_confidence: float = Field(0.25, ge=0, le=1, description="below min_confidence, an item is still "
                                        "sorted when its mean score reaches this, ...")
    faint_min_evidence: float = Field(7.0, ge=0, description="... its winning bin's scores sum to this over its views ...")
    faint_min_share: float = Field(0.75, ge=0, le=1, description="... and that bin holds this share of all its votes")
    min_views: int = Field(3, ge=1, le=100, description="frames an item must be seen in before it is sorted")
    battery_guard_share: float = Field(0.15, ge=0, le=1,
                                       description="a board whose votes are this battery-like goes to manual")
    li_ion_guard_share: float = Field(0.25, ge=0, le=1,
                                      description="an item bound for a non-Li-ion bin whose votes are this Li-ion-like goes to manual")
    attached_overlap: float = Field(0.6, gt=0, le=1,
                                    description="a battery box this much inside a board box is attached to it")


class DetectorConfig(_Section):
    model: str = Field("models/active.onnx", description="ONNX model path (relative to the repo root)")
    conf_threshold: float = Field(0.25, ge=0, le=1)
    iou_threshold: float = Field(0.5, ge=0, le=1)
    intra_op_threads: int | Literal["auto"] = Field(
        "auto", description="onnxruntime's threads for one inference. auto: in `kozan run` 1 on a PC with 2 cores "
                            "or fewer (the other core is capture's, the looks' and the link's; 2 threads there "
                            "dropped more frames for 20 % more CPU), else 2; 2 in the fast simulation, where "
                            "nothing runs beside the loop (measurements: MODEL_CARD.md, thread settings)")
    spin: Literal["auto", "never", "run", "always"] = Field(
        "auto", description="when onnxruntime's workers busy-wait for work: never, only inside a run, or always "
                            "(its default: on between runs too). auto: never in `kozan run`, where capture, looks "
                            "and the link share the cores; run in the fast simulation, where nothing runs beside "
                            "the loop (measurements: MODEL_CARD.md, thread settings)")
    opencv_threads: int = Field(2, ge=1, le=64, description="OpenCV's worker threads, process-wide "
                                "(the letterbox, camera conversions, crops)")
    max_detections: int = Field(100, ge=1, le=1000)
    agnostic_nms: bool = Field(True, description="suppress overlapping boxes across classes: one place on the belt, "
                                                 "one item (false: per class, as in COCO evaluation)")

    @field_validator("intra_op_threads", mode="before")
    @classmethod
    def _threads(cls, v: Any) -> int | str:
        if v == "auto":
            return v
        whole = isinstance(v, int) and not isinstance(v, bool) or isinstance(v, str) and v.strip().isdigit()
        if not whole or not 1 <= int(v) <= 64:
            raise ValueError("a thread count from 1 to 64, or auto")
        return int(v)


class InspectorConfig(_Section):
    """Closer looks from the full-resolution frame (vision.inspection): at each board, for a battery
    still on it; at each loose battery, for what kind it is."""
    model: str | None = Field("models/inspector/insp-v2.onnx",
                              description="ONNX model trained on board crops (relative to the repo root); "
                                          "null: no second look, the detector's own view decides")
    conf_threshold: float = Field(0.5, ge=0, le=1, description="score a battery box on a board needs to count")
    looks: int = Field(3, ge=1, le=20, description="most crops inspected per board before its decision")
    spacing_mm: float = Field(60.0, ge=0, description="belt travel between two looks at the same item")
    min_hits: int = Field(1, ge=1, le=20, description="looks that must find a battery for the board to go to manual")
    intra_op_threads: int = Field(1, ge=1, le=64, description="its looks run beside the detector's threads: "
                                  "on 2 cores, 2 more made the loop drop 23 of 900 frames, 1 none (kozan run, 30 s)")
    battery_model: str | None = Field("models/inspector/batt-v2.onnx",
                                      description="ONNX model trained on close crops of loose batteries: reads "
                                                  "what kind each battery is at full camera resolution; null: "
                                                  "the detector's view alone decides")
    battery_conf_threshold: float = Field(0.25, ge=0, le=1, description="score a battery read close up needs to count")
    battery_looks: int = Field(3, ge=1, le=20, description="most crops read per battery before its decision")
    battery_weight: float = Field(0.5, ge=0, le=1, description="share of the close looks in the scores a battery is "
                                  "sorted on (the rest: the detector's views); 0 records the looks but ignores them")

    @model_validator(mode="after")
    def _hits_within_looks(self) -> "InspectorConfig":
        if self.min_hits > self.looks:
            raise ValueError(f"min_hits={self.min_hits} exceeds looks={self.looks}: no board could ever be flagged")
        return self


class TrackingConfig(_Section):
    gate_mm: float = Field(30.0, gt=0, description="max distance of a detection from its track's predicted place")
    max_missed_frames: int = Field(8, ge=1)


class LinkConfig(_Section):
    port: str = Field("sim", description="sim (firmware simulator on a pty) | a serial device | a pyserial URL")
    baudrate: int = Field(250000, gt=0)
    watchdog_ms: int = Field(250, ge=50, le=10000)
    report_interval_ms: int = Field(20, ge=1, le=1000)


class ReportsConfig(_Section):
    """`kozan report`: where reports go, the plant's clock and shifts, the mass/metal table."""
    dir: str = Field("var/reports", description="default output folder (relative to the repo root)")
    timezone: str = Field("UTC", description="IANA zone the plant's days and shifts are in, e.g. Asia/Tokyo")
    shifts: list[str] = Field(default_factory=lambda: ["06:00", "14:00", "22:00"], min_length=1,
                              description="shift start times (HH:MM, local); a shift ends when the next starts")
    composition: str = Field("station/composition.yaml",
                             description="average mass and metal content per class (relative to the repo root)")
    chromium: str = Field("/usr/bin/chromium", description="headless Chromium that prints the PDF")

    @field_validator("shifts")
    @classmethod
    def _hhmm(cls, v: list[str]) -> list[str]:
        import re
        for s in v:
            if not re.fullmatch(r"([01][0-9]|2[0-3]):[0-5][0-9]", s):
                raise ValueError(f"shift start {s!r}: write it as HH:MM (24 h), e.g. 06:00")
        return sorted(v)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}: use an IANA name such as UTC, Asia/Tokyo, Europe/Berlin")
        return v


class RecordsConfig(_Section):
    path: str = Field("var/kozan.sqlite", description="SQLite file (relative to the repo root)")
    synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="FULL: an acknowledged record survives power loss (WAL fsynced at each commit, at "
                            "most 1/batch_s a second); NORMAL survives a killed process only")
    batch_s: float = Field(0.2, gt=0, le=5, description="the writer commits at most this often; a record is "
                                                        "acknowledged when its commit returns")
    archive_dir: str = Field("var/archive", description="`kozan records archive` moves old rows to dated "
                                                        "databases here; reports read them too")
    lot_close_drain_s: float = Field(5.0, ge=0, le=120, description="closing a lot waits this long at most for "
                                                                    "its items' diverter outcomes")
    reports: ReportsConfig = Field(default_factory=ReportsConfig)


class SimCameraTruth(_Section):
    """The simulated camera's true model: what `kozan calibrate camera/belt` must recover.

    Pose: a belt point (x, y, 0) in mm maps to camera coordinates R(rvec) @ (x, y, 0) + tvec."""
    fx: float = Field(gt=0)
    fy: float = Field(gt=0)
    cx: float
    cy: float
    dist: list[float] = Field(default_factory=lambda: [0.0] * 5, min_length=5, max_length=5,
                              description="k1 k2 p1 p2 k3 (OpenCV order)")
    rvec: list[float] = Field(default_factory=lambda: [0.0] * 3, min_length=3, max_length=3, description="radians")
    tvec: list[float] = Field(min_length=3, max_length=3, description="mm")


class SimConfig(_Section):
    seed: int = 1
    items_per_min: float = Field(150.0, gt=0, le=6000)
    min_gap_mm: float = Field(40.0, ge=0, description="singulation: free belt between consecutive items")
    distractor_share: float = Field(0.08, ge=0, le=1)
    board_battery_share: float = Field(0.08, ge=0, le=1, description="share of boards arriving with a battery on them")
    class_mix: dict[str, float] = Field(default_factory=lambda: {
        "board_high": 2.0, "board_low": 2.0, "li_ion_cell": 1.5, "li_ion_pack": 1.0,
        "alkaline": 1.5, "nimh": 1.0, "coin_cell": 0.7, "lead_acid": 0.5,
    })
    actuator_latency_ms: dict[int, float] = Field(default_factory=dict,
                                                  description="true latency per diverter, if unlike the configured one")
    # ground truth for calibration (kozan calibrate on the simulated line); unset = today's behaviour:
    # a straight-down pinhole camera at camera.px_per_mm, the configured encoder scale and diverter positions
    true_camera: "SimCameraTruth | None" = Field(None, description="true camera model (intrinsics, distortion, "
                                                                   "pose over the belt); None = ideal straight-down")
    true_mm_per_count: float | None = Field(None, gt=0, le=10, description="true encoder scale, if unlike line.mm_per_count")
    true_diverter_position_mm: dict[int, float] = Field(default_factory=dict,
                                                        description="true diverter position, if unlike the configured one")


class CalibrationConfig(_Section):
    path: str = Field("var/calibration/active.yaml",
                      description="the active calibration file (relative to the repo root); `kozan calibrate` writes it")
    history_dir: str = Field("var/calibration/history", description="every replaced calibration is kept here")
    max_age_days: float = Field(180.0, gt=0, description="`kozan calibrate check` calls older measurements stale")
    max_belt_residual_mm: float = Field(1.0, gt=0, description="belt homography residual tolerance")
    max_reprojection_px: float = Field(1.0, gt=0, description="camera calibration RMS tolerance")


class HmiConfig(_Section):
    status_interval_s: float = Field(1.0, gt=0)
    enabled: bool = Field(True, description="serve the operator's touchscreen HMI while `kozan run` runs")
    host: str = Field("127.0.0.1", description="address the HMI binds to; anything but loopback needs hmi.token")
    port: int = Field(8080, ge=0, le=65535, description="HMI port; 0 picks a free one (tests)")
    token: str = Field("", description="shared secret every HMI request must carry (?token=, cookie or "
                                       "Authorization: Bearer); required when host is not loopback")
    preview_fps: float = Field(4.0, gt=0, le=15, description="live-view frames encoded per second, at most")
    preview_width: int = Field(480, ge=160, le=1280, description="live-view width in pixels")
    push_interval_s: float = Field(0.5, ge=0.1, le=10, description="how often the page gets fresh counters")
    pin_hash: str = Field("", description="technician PIN as pbkdf2_sha256$iterations$salt$hex "
                                          "(`python -m station.hmi.auth` makes one)")
    pin_env: str = Field("KOZAN_HMI_PIN", description="environment variable holding the technician PIN "
                                                      "when pin_hash is empty")
    pin_max_failures: int = Field(5, ge=1, le=100, description="wrong PINs before the PIN entry locks")
    pin_lockout_s: float = Field(60.0, gt=0, le=86400, description="first lockout; doubles on each further one")
    tech_session_s: float = Field(600.0, gt=0, le=86400, description="technician access lasts this long")
    audit_path: str = Field("var/hmi_audit.jsonl", description="audit log of HMI actions (relative to the repo root)")
    language: str = Field("en", description="default HMI language (a file in station/hmi/i18n/)")
    low_conf_rate: float = Field(0.3, gt=0, le=1, description="alarm when this share of recent items is "
                                                              "sent to manual for low confidence")
    low_conf_window: int = Field(40, ge=5, le=10000, description="recent items the low-confidence share is over")

    @model_validator(mode="after")
    def _network_needs_token(self) -> "HmiConfig":
        if self.enabled and self.host not in ("127.0.0.1", "localhost", "::1") and not self.token:
            raise ValueError(f"hmi.host={self.host!r} serves the HMI on the network: set hmi.token to a "
                             "long random secret (or keep hmi.host=127.0.0.1)")
        return self


class CaptureConfig(_Section):
    """Dataset capture on the line: frames that teach the model most, written off the loop."""
    enabled: bool = Field(False, description="save frames + pre-labels + metadata while the line runs")
    dir: str = Field("datasets/collected", description="where captures go (relative to the repo root)")
    low_confidence: float = Field(0.6, ge=0, le=1, description="capture an item whose vote-weighted "
                                                                "confidence is below this")
    disagreement: float = Field(0.25, ge=0, le=1, description="capture an item whose runner-up class holds "
                                                               "at least this share of its votes")
    manual: bool = Field(True, description="capture items that ended in the manual path")
    random_rate: float = Field(0.02, ge=0, le=1, description="share of all other decided items captured at random")
    max_per_min: float = Field(20.0, gt=0, le=6000, description="rate limit, captures per minute of line time "
                                                                 "(operator flags are exempt)")
    quota_mb: float = Field(2000.0, gt=0, description="capture stops (with an alarm) when its folder holds this much")
    min_free_mb: float = Field(1000.0, ge=0, description="capture stops (with an alarm) when the disk has less free")
    queue: int = Field(8, ge=1, le=256, description="frames waiting for the writer; a full queue drops and counts")
    jpeg_quality: int = Field(92, ge=50, le=100)
    flag_window: int = Field(12, ge=0, le=100, description="recent items whose frame is kept for an operator's "
                                                            "wrong-bin flag (the HMI lists 12)")
    seed: int = Field(0, description="random sample seed (deterministic sims)")


class MqttConfig(_Section):
    enabled: bool = Field(False, description="publish items, counters and health to the plant's MQTT broker")
    host: str = Field("127.0.0.1", description="broker address")
    port: int = Field(1883, ge=1, le=65535)
    username: str = Field("", description="broker user; its password comes from $KOZAN_MQTT_PASSWORD")
    keepalive_s: int = Field(15, ge=5, le=3600)
    settle_s: float = Field(10.0, ge=0, le=3600, description="an item whose diverter has not answered goes out "
                                                               "after this long anyway")
    max_inflight: int = Field(100, ge=1, le=10000, description="items sent and not yet acknowledged by the broker")
    counters_interval_s: float = Field(10.0, gt=0, le=3600)
    health_interval_s: float = Field(10.0, gt=0, le=3600)
    outbox_path: str = Field("", description="the publisher's cursor file; empty = beside the records file")
    confirm_timeout_s: float = Field(10.0, gt=0, le=3600, description="the plant's confirm behind the broker's acks "
                                     "this long: send again from the confirmed item (a broker that lost the "
                                     "plant's session acknowledged and dropped them)")
    confirm_timeout_max_s: float = Field(300.0, gt=0, le=86400, description="the wait doubles after each rewind "
                                         "that brings no progress, up to this")
    max_unconfirmed: int = Field(2000, ge=0, le=10_000_000, description="items sent beyond the plant's confirm "
                                 "at most (the rest waits in the records database); 0 = no limit")


class MetricsConfig(_Section):
    enabled: bool = Field(False, description="serve Prometheus metrics at http://host:port/metrics")
    host: str = Field("127.0.0.1", description="address the endpoint binds to (loopback unless a scraper "
                                               "elsewhere needs it)")
    port: int = Field(9108, ge=0, le=65535, description="0 picks a free one (tests)")


class PlantConfig(_Section):
    station_id: str = Field("", description="this station's name in topics and the plant database; "
                                            "empty = the host name")
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    @field_validator("station_id")
    @classmethod
    def _station_id_is_a_topic_level(cls, v: str) -> str:
        if v:
            from station.plant.topics import check_station_id
            check_station_id(v)
        return v


class StationConfig(_Section):
    line: LineConfig = Field(default_factory=LineConfig)
    camera: CameraConfig = Field(default_factory=CameraConfig)
    diverters: list[DiverterConfig] = Field(default_factory=_default_diverters)
    rules: RulesConfig = Field(default_factory=RulesConfig)
    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    inspector: InspectorConfig = Field(default_factory=InspectorConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    link: LinkConfig = Field(default_factory=LinkConfig)
    records: RecordsConfig = Field(default_factory=RecordsConfig)
    sim: SimConfig = Field(default_factory=SimConfig)
    hmi: HmiConfig = Field(default_factory=HmiConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    plant: PlantConfig = Field(default_factory=PlantConfig)
    capture: CaptureConfig = Field(default_factory=CaptureConfig)

    @field_validator("diverters")
    @classmethod
    def _diverters_unique(cls, v: list[DiverterConfig]) -> list[DiverterConfig]:
        ids = [d.id for d in v]
        if len(ids) != len(set(ids)):
            raise ValueError(f"diverter ids must be unique, got {ids}")
        bins = [d.bin for d in v if d.enabled]
        if len(bins) != len(set(bins)):
            raise ValueError(f"each bin needs exactly one enabled diverter, got bins {bins}")
        return v

    @model_validator(mode="after")
    def _geometry_and_rules(self) -> "StationConfig":
        tax = load_taxonomy()
        for name in self.rules.class_to_bin:
            if name not in tax.names:
                raise ValueError(f"rules.class_to_bin: unknown class {name!r}; allowed: {tax.names}")
        for name in self.sim.class_mix:
            if name not in tax.names:
                raise ValueError(f"sim.class_mix: unknown class {name!r}; allowed: {tax.names}")
        bins_with_diverter = {d.bin for d in self.diverters if d.enabled}
        for name, b in self.rules.class_to_bin.items():
            if b != MANUAL_BIN and b not in bins_with_diverter:
                raise ValueError(f"rules.class_to_bin.{name}: bin {b} has no enabled diverter "
                                 f"(bins with one: {sorted(bins_with_diverter)}; 0 is the manual path)")
            # the safety rule, enforced where the rules are written: a battery never into a board bin
            board_bins = {bb for n, bb in self.rules.class_to_bin.items() if tax.by_name(n).is_board}
            if tax.by_name(name).is_battery and b in board_bins:
                raise ValueError(f"rules.class_to_bin.{name}: battery class sent to board bin {b}; "
                                 "batteries must never reach a board bin")
        view_mm = self.camera.width / self.camera.px_per_mm
        if self.line.decision_line_mm >= view_mm:
            raise ValueError(f"line.decision_line_mm={self.line.decision_line_mm} lies outside the camera view "
                             f"(0..{view_mm:.0f} mm)")
        for d in self.diverters:
            if d.position_mm <= self.line.decision_line_mm:
                raise ValueError(f"diverters[id={d.id}].position_mm={d.position_mm} must lie downstream of "
                                 f"line.decision_line_mm={self.line.decision_line_mm}")
            if d.position_mm >= self.line.end_of_belt_mm:
                raise ValueError(f"diverters[id={d.id}].position_mm={d.position_mm} lies past "
                                 f"line.end_of_belt_mm={self.line.end_of_belt_mm}")
        return self

    def resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else REPO_ROOT / p


def _format_error(e: ValidationError, source: str) -> str:
    lines = [f"{source}: {e.error_count()} problem(s) in the configuration:"]
    for err in e.errors():
        key = ".".join(str(x) for x in err["loc"]) or "(top level)"
        val = err.get("input")
        shown = repr(val) if not isinstance(val, dict) else "{...}"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (misspelt?)"
        lines.append(f"  - {key} = {shown}: {msg}")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any] | None, source: str = "<config>") -> StationConfig:
    try:
        return StationConfig.model_validate(data or {})
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def load_config(path: str | Path | None) -> StationConfig:
    """Load and validate; `None` gives the defaults (the simulated line)."""
    if path is None:
        return StationConfig()
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: configuration file not found; run without --config for the simulated line, "
                          "or write one with `kozan config --defaults > station.yaml`")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
    return config_from_dict(data, str(p))


def dump_defaults() -> str:
    return yaml.safe_dump(StationConfig().model_dump(mode="json"), sort_keys=False, allow_unicode=True)
