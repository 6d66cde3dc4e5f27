"""HMI API against a real station running the simulated line in real time (FastAPI TestClient),
plus the live stream over a real uvicorn on a free port."""
from __future__ import annotations

import ast
import json
import re
import time
from pathlib import Path
from typing import Any, Iterator

import cv2
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from station.alarms import Severity
from station.config import ConfigError, HmiConfig, config_from_dict
from station.hmi import Hmi, HmiServer, languages
from station.hmi.auth import hash_pin
from station.sorting import Reason
from station.state import LineState

from .conftest import wait_for

PIN = "2468"
REPO = Path(__file__).resolve().parents[2]
HMI_DIR = REPO / "station" / "hmi"


@pytest.fixture
def hmi(running_station: Any, tmp_path: Path) -> Iterator[Hmi]:
    cfg = HmiConfig(port=0, pin_hash=hash_pin(PIN, iterations=1000), pin_max_failures=3, pin_lockout_s=30,
                    push_interval_s=0.2)
    h = Hmi(running_station, cfg, audit_path=tmp_path / "audit.jsonl")
    h.start_threads()
    yield h
    h.stop_threads()


@pytest.fixture
def client(hmi: Hmi) -> TestClient:
    return TestClient(hmi.app)


def audit_lines(hmi: Hmi) -> list[dict[str, Any]]:
    return [json.loads(x) for x in hmi.audit.path.read_text(encoding="utf-8").splitlines()]


def test_page_and_assets_are_served_from_the_package(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and "/static/app.js" in r.text
    for asset in ("app.js", "app.css"):
        assert client.get(f"/static/{asset}").status_code == 200


def test_state_shows_counters_growing_on_the_running_line(client: TestClient, running_station: Any) -> None:
    s0 = client.get("/api/state").json()
    assert s0["state"] == "running"
    assert [b["bin"] for b in s0["bins"]] == [0, 1, 2, 3, 4]
    s1 = wait_for(lambda: (s := client.get("/api/state").json())["counters"]["decided"] >= 3 and s,
                  90, "3 items decided")
    assert sum(b["count"] for b in s1["bins"]) == s1["counters"]["decided"]
    assert sum(s1["counters"]["per_class"].values()) == s1["counters"]["decided"]
    assert s1["counters"]["frames"] > s0["counters"]["frames"]
    assert s1["recent"] and {"track_id", "class", "bin", "reason", "outcome"} <= set(s1["recent"][0])
    # the last items carry thumbnails, cut from the frame they were decided in
    with_thumb = wait_for(lambda: [i for i in client.get("/api/state").json()["recent"] if i["thumb"]], 30,
                          "a thumbnail")
    r = client.get(f"/api/thumb/{with_thumb[0]['track_id']}.jpg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    img = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[0] == 112
    assert client.get("/api/thumb/999999.jpg").status_code == 404
    sh = client.get("/api/state").json()["shift"]
    assert sh["items"] >= 3 and sh["running_s"] >= 0


def test_line_controls_follow_the_state_machine_and_are_audited(client: TestClient, running_station: Any,
                                                                hmi: Hmi) -> None:
    st = running_station
    try:
        assert client.post("/api/line/stop").json()["state"] == "idle"
        assert st.state.state.value == "idle"
        r = client.post("/api/line/pause")                  # idle cannot pause
        assert r.status_code == 409 and "idle" in r.json()["detail"]
        assert client.post("/api/line/start").json()["state"] == "running"
        assert client.post("/api/line/pause").json()["state"] == "paused"
        frames = st.core.counters.frames
        time.sleep(1.0)                                     # let frames arrive: none may be sorted
        assert client.post("/api/line/estop").json()["state"] == "estop"
        r = client.post("/api/line/start")                  # leaving e-stop takes a reset
        assert r.status_code == 409 and "reset" in r.json()["detail"]
        assert client.post("/api/line/reset").json()["state"] == "idle"
        assert client.post("/api/line/nonsense").status_code == 404
        assert st.core.counters.frames - frames <= 1        # nothing sorted while not running
    finally:
        if st.state.state.value != "running":
            st.start_line()
    wait_for(lambda: client.get("/api/state").json()["state"] == "running", 5, "the page to see the line running")
    actions = [(e["action"], e["ok"], e["role"]) for e in audit_lines(hmi)]
    assert ("line.stop", True, "operator") in actions and ("line.start", False, "operator") in actions


def test_alarm_is_listed_and_acknowledged(client: TestClient, running_station: Any) -> None:
    # a code the running simulated line never raises itself (its diverter faults would repeat this one
    # and replace its message while the test looks)
    a = running_station.alarms.raise_("camera_lost", Severity.FAULT, "camera lost: USB unplugged (test)",
                                      params={"error": "USB unplugged (test)"})
    wait_for(lambda: any(x["id"] == a.id for x in client.get("/api/state").json()["alarms"]), 5, "the alarm listed")
    listed = next(x for x in client.get("/api/state").json()["alarms"] if x["id"] == a.id)
    assert listed["severity"] == "fault" and "USB unplugged" in listed["message"]
    assert client.post(f"/api/alarms/{a.id}/ack").status_code == 200
    assert all(x["id"] != a.id for x in client.get("/api/state").json()["alarms"])
    r = client.post(f"/api/alarms/{a.id}/ack")
    assert r.status_code == 404 and "already" in r.json()["detail"]


def test_send_next_item_to_manual(client: TestClient, running_station: Any) -> None:
    assert client.post("/api/manual-next", json={"n": 1}).json()["manual_next"] >= 1
    assert client.post("/api/manual-next", json={"n": 0}).status_code == 422
    hit = wait_for(lambda: [i for i in client.get("/api/state").json()["recent"] if i["reason"] == "operator_override"],
                   60, "an item sent to manual by the operator")
    assert hit[0]["bin"] == 0


def test_technician_pin_lockout_settings_and_audit(client: TestClient, running_station: Any, hmi: Hmi) -> None:
    st = running_station
    assert client.get("/api/tech/settings").status_code == 401
    r = client.post("/api/tech/login", json={"pin": "0000"})
    assert r.status_code == 401 and r.json()["tries_left"] == 2
    r = client.post("/api/tech/login", json={"pin": PIN})
    assert r.status_code == 200
    session = {"X-Kozan-Session": r.json()["session"]}
    s = client.get("/api/tech/settings", headers=session).json()
    assert s["rules"]["min_confidence"] == st.cfg.rules.min_confidence and len(s["diverters"]) == 4
    old = st.cfg.rules.min_confidence
    try:
        r = client.post("/api/tech/settings", headers=session, json={"rules": {"min_confidence": 0.7}})
        assert r.status_code == 200 and st.cfg.rules.min_confidence == 0.7 and st.core.sorter.cfg.rules.min_confidence == 0.7
        # the battery safety rule holds on the screen too: refused, nothing changed
        r = client.post("/api/tech/settings", headers=session, json={"rules": {"class_to_bin": {"li_ion_cell": 3}}})
        assert r.status_code == 422 and "board bin" in r.json()["detail"]
        assert st.cfg.rules.class_to_bin["li_ion_cell"] == 1
        # disabling a diverter: its bin's classes must go to manual first, else the change is refused
        divs = [d.model_dump(mode="json") for d in st.cfg.diverters]
        divs[3]["enabled"] = False
        r = client.post("/api/tech/settings", headers=session, json={"diverters": divs})
        assert r.status_code == 422 and "no enabled diverter" in r.json()["detail"]
        r = client.post("/api/tech/settings", headers=session,
                        json={"diverters": divs, "rules": {"class_to_bin": {"board_low": 0}}})
        assert r.status_code == 200 and 4 not in st.core.sorter._diverter_for_bin
        r = client.post("/api/tech/model", headers=session, json={"model": "models/none.onnx"})
        assert r.status_code == 409   # the line runs: stop it before changing the model
    finally:
        divs = [dict(d.model_dump(mode="json"), enabled=True) for d in st.cfg.diverters]
        st.apply_settings({"diverters": divs, "rules": {"min_confidence": old, "class_to_bin": {"board_low": 4}}})
    # wrong PINs lock the entry, even for the right PIN, until the lockout ends
    for _ in range(3):
        client.post("/api/tech/login", json={"pin": "1111"})
    r = client.post("/api/tech/login", json={"pin": PIN})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    client.post("/api/tech/logout", headers=session)
    assert client.get("/api/tech/settings", headers=session).status_code == 401
    log = audit_lines(hmi)
    logins = [e["ok"] for e in log if e["action"] == "login"]
    assert logins[:2] == [False, True] and logins[-1] is False
    settings = [e for e in log if e["action"] == "settings"]
    assert [e["ok"] for e in settings] == [True, False, False, True]
    assert settings[0]["role"] == "technician" and settings[0]["changes"] == {"rules": {"min_confidence": 0.7}}
    assert settings[0]["before"]["rules"]["min_confidence"] == old


def test_no_pin_configured_means_no_technician_access(running_station: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KOZAN_HMI_PIN", raising=False)
    h = Hmi(running_station, HmiConfig(port=0), audit_path=tmp_path / "a.jsonl")
    r = TestClient(h.app).post("/api/tech/login", json={"pin": "1234"})
    assert r.status_code == 503 and "KOZAN_HMI_PIN" in r.json()["error"]
    monkeypatch.setenv("KOZAN_HMI_PIN", "97531")
    assert TestClient(h.app).post("/api/tech/login", json={"pin": "97531"}).status_code == 200


def test_network_binding_needs_a_token(running_station: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="hmi.token"):
        config_from_dict({"hmi": {"host": "0.0.0.0"}})
    cfg = config_from_dict({"hmi": {"host": "0.0.0.0", "token": "s3cret-token"}}).hmi
    c = TestClient(Hmi(running_station, cfg, audit_path=tmp_path / "a.jsonl").app)
    r = c.get("/api/state")
    assert r.status_code == 401 and "token" in r.json()["error"]
    assert c.get("/api/state", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/api/state", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    assert c.get("/?token=s3cret-token").status_code == 200
    assert c.cookies.get("kozan_token") == "s3cret-token"
    assert c.get("/api/state").status_code == 200          # the cookie carries it from now on


def test_translations_cover_every_string_of_the_page(client: TestClient) -> None:
    en = json.loads((HMI_DIR / "i18n" / "en.json").read_text(encoding="utf-8"))
    codes = {x["code"] for x in languages()}
    assert {"en", "ja"} <= codes
    assert {x["code"] for x in client.get("/api/i18n").json()["languages"]} == codes
    for code in codes:
        other = client.get(f"/api/i18n/{code}").json()
        missing = set(en) - set(other) - {"_comment"}
        assert not missing, f"{code}.json lacks {sorted(missing)}"
    html = (HMI_DIR / "static" / "index.html").read_text(encoding="utf-8")
    js = (HMI_DIR / "static" / "app.js").read_text(encoding="utf-8")
    used = set(re.findall(r'data-i18n="([^"]+)"', html)) | set(re.findall(r'\bt\("([a-z_.]+)"', js))
    assert used and not used - set(en), f"keys used but not translated: {sorted(used - set(en))}"
    # keys built at run time (t(`reason.${...}`)) come from the code itself: every line state, every
    # reason a decision can carry, every alarm code raised anywhere in the station
    built = {f"state.{s.value}" for s in LineState} | {f"reason.{r.value}" for r in Reason}
    sources = "".join(p.read_text(encoding="utf-8") for p in (REPO / "station").rglob("*.py"))
    codes_raised = set(re.findall(r'raise_\(\s*"([a-z_]+)"', sources))
    assert {"missed_item", "link_lost", "camera_lost", "low_confidence_rate", "diverter_fault"} <= codes_raised
    built |= {f"alarm.{c}" for c in codes_raised}
    assert not built - set(en), f"shown on the page but not translated: {sorted(built - set(en))}"
    assert client.get("/api/i18n/xx").status_code == 404


def raised_alarm_details() -> dict[str, set[str] | None]:
    """Every alarm detail template the station can ask for, found in its source (not a list kept by
    hand): `alarm_detail.<detail>` for each `raise_(code, ..., detail=...)` (the code where no detail is
    given), plus capture's `_stop("<why>", ...)` (detail `capture_stopped.<why>`). The value is the set of
    parameter names where the call spells them out (a dict literal, or `_stop`'s keywords), else None."""
    found: dict[str, set[str] | None] = {}

    def add(key: str, names: set[str] | None) -> None:
        found[key] = (found.get(key) or set()) | names if names is not None else found.get(key)

    for path in (REPO / "station").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            kw = {k.arg: k.value for k in node.keywords}
            if node.func.attr == "raise_" and node.args and isinstance(node.args[0], ast.Constant):
                d = kw.get("detail")
                if isinstance(d, ast.JoinedStr):
                    continue                       # capture's _stop: its callers are collected below
                key = d.value if isinstance(d, ast.Constant) else node.args[0].value
                p = kw.get("params")
                names = ({k.value for k in p.keys if isinstance(k, ast.Constant)} if isinstance(p, ast.Dict)
                         else set() if p is None else None)
                add(key, names)
            elif node.func.attr == "_stop" and path.name == "capture.py" and node.args \
                    and isinstance(node.args[0], ast.Constant):
                add(f"capture_stopped.{node.args[0].value}", {k for k in kw if k} | {"folder"})
    return found


def test_every_alarm_has_a_detail_template_in_every_language() -> None:
    details = raised_alarm_details()
    assert {"missed_item", "missed_item.refused_late", "link_lost", "link_lost.unanswered", "camera_lost",
            "low_confidence_rate", "diverter_fault", "diverter_fault.refused", "capture_stopped.quota"} <= set(details)
    for lang in languages():
        d = json.loads((HMI_DIR / "i18n" / f"{lang['code']}.json").read_text(encoding="utf-8"))
        missing = sorted(k for k in details if f"alarm_detail.{k}" not in d)
        assert not missing, f"{lang['code']}.json has no alarm_detail template for {missing}"
        for key, names in details.items():
            used = set(re.findall(r"\{([a-z_]+)\}", d[f"alarm_detail.{key}"]))
            if names is not None:    # the page fills `message` (the English text) itself
                assert used <= names | {"message"}, \
                    f"{lang['code']}.json alarm_detail.{key} uses {sorted(used - names)}: not given where it is raised"


def test_alarms_and_errors_reach_the_page_as_codes_and_parameters(client: TestClient, running_station: Any) -> None:
    a = running_station.alarms.raise_("link_lost", Severity.FAULT, "item 7: command 3 unanswered after 3 tries",
                                      item_id=7, detail="link_lost.unanswered",
                                      params={"item": 7, "command": 3, "tries": np.int64(3)})
    listed = wait_for(lambda: [x for x in client.get("/api/state").json()["alarms"] if x["id"] == a.id], 5,
                      "the alarm listed")[0]
    assert listed["detail"] == "link_lost.unanswered" and listed["params"] == {"item": 7, "command": 3, "tries": 3}
    assert client.post(f"/api/alarms/{a.id}/ack").status_code == 200
    r = client.post(f"/api/alarms/{a.id}/ack")
    assert r.status_code == 404 and r.json()["code"] == "alarm_gone" and r.json()["params"] == {"id": a.id}
    assert "already" in r.json()["detail"]                      # the English text stays, for logs and old pages
    for code in ("en", "ja"):
        d = client.get(f"/api/i18n/{code}").json()
        assert "{id}" in d["error.alarm_gone"]
    r = client.post("/api/manual-next", json={"n": 0})
    assert r.status_code == 422 and r.json()["code"] == "manual_n"


def test_per_class_counts_and_language_neutral_live_view_labels(client: TestClient, running_station: Any) -> None:
    from station.hmi.preview import SHORT_NAMES, short_name
    from vision.taxonomy import load_taxonomy

    s = wait_for(lambda: (lambda x: x if x["counters"]["decided"] >= 3 else None)(client.get("/api/state").json()),
                 60, "three items decided")
    classes = {c["class"]: c for c in s["classes"]}
    assert set(running_station.detector.names) <= set(classes)
    assert {k: c["count"] for k, c in classes.items() if c["count"]} == s["counters"]["per_class"]
    assert classes["li_ion_cell"]["bin"] == running_station.cfg.rules.class_to_bin["li_ion_cell"]
    en = json.loads((HMI_DIR / "i18n" / "en.json").read_text(encoding="utf-8"))
    for name in load_taxonomy().names:
        # every class: a name in the translation files, and an ASCII code (Hershey fonts) in the live view
        assert f"class.{name}" in en and short_name(name).isascii() and len(short_name(name)) <= 6
    assert len(set(SHORT_NAMES.values())) == len(SHORT_NAMES)   # codes the legend can tell apart
    assert classes["board_high"]["short"] == "PCB-H"


def test_low_confidence_rate_alarm_fires_on_the_running_line(running_station: Any, tmp_path: Path) -> None:
    """The real path: the sorter sends uncertain items to manual, the HMI's monitor counts them in its
    window and raises the alarm with the numbers the page shows."""
    st = running_station
    cfg = HmiConfig(port=0, push_interval_s=0.2, low_conf_window=10, low_conf_rate=0.5)
    h = Hmi(st, cfg, audit_path=tmp_path / "audit.jsonl")
    old = {k: getattr(st.cfg.rules, k) for k in ("min_confidence", "faint_min_confidence")}
    for a in st.alarms.active():
        if a.code == "low_confidence_rate":
            st.alarms.acknowledge(a.id)
    h.start_threads()
    try:
        st.apply_settings({"rules": {"min_confidence": 1.0, "faint_min_confidence": 1.0}})   # nothing is sure enough
        c = TestClient(h.app)
        alarm = wait_for(lambda: [a for a in c.get("/api/state").json()["alarms"] if a["code"] == "low_confidence_rate"],
                         90, "the low-confidence-rate alarm")[0]
    finally:
        st.apply_settings({"rules": old})
        h.stop_threads()
    assert alarm["severity"] == "warning" and alarm["detail"] == "low_confidence_rate"
    p = alarm["params"]
    assert p["n"] == 10 and 5 <= p["low"] <= 10 and p["pct"] == round(p["low"] / 10 * 100)
    assert f"{p['low']} of the last 10 items" in alarm["message"]
    st.alarms.acknowledge(alarm["id"])


def test_live_stream_and_preview_over_real_uvicorn(running_station: Any, tmp_path: Path) -> None:
    cfg = HmiConfig(port=0, preview_fps=5, preview_width=320, push_interval_s=0.2)
    srv = HmiServer(running_station, cfg, audit_path=tmp_path / "a.jsonl")
    url = srv.start()
    try:
        assert srv.port > 0 and url == f"http://127.0.0.1:{srv.port}/"
        assert srv.hmi.preview.encoded == 0          # nobody watching: no live view encoded
        snaps: list[dict[str, Any]] = []
        with httpx.stream("GET", url + "api/events", timeout=30) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            event = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "state":
                    snaps.append(json.loads(line[6:]))
                    if len(snaps) >= 2 and snaps[-1]["preview_seq"] > 0:
                        break
        assert snaps[0]["state"] == "running"
        jpg = httpx.get(url + "api/preview.jpg", timeout=10)
        assert jpg.status_code == 200
        img = cv2.imdecode(np.frombuffer(jpg.content, np.uint8), cv2.IMREAD_COLOR)
        assert img.shape[1] == 320                    # downscaled to preview_width
    finally:
        srv.stop()
    assert running_station.on_frame is None          # the hook is removed with the HMI
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "api/state", timeout=2)


def test_busy_port_is_refused_with_a_message(running_station: Any, tmp_path: Path) -> None:
    a = HmiServer(running_station, HmiConfig(port=0), audit_path=tmp_path / "a.jsonl")
    a.start()
    try:
        with pytest.raises(OSError, match="hmi.port"):
            HmiServer(running_station, HmiConfig(port=a.port), audit_path=tmp_path / "b.jsonl").start()
    finally:
        a.stop()


def test_a_repeated_alarm_keeps_its_newest_detail_and_its_worst_severity() -> None:
    from station.alarms import AlarmBoard

    b = AlarmBoard(clock=lambda: 1.0)
    b.raise_("diverter_fault", Severity.WARNING, "item 4: MCU refused command 9 (QUEUE_FULL)", item_id=4,
             detail="diverter_fault.refused", params={"item": 4, "command": 9, "reason": "QUEUE_FULL"})
    a = b.raise_("diverter_fault", Severity.FAULT, "MCU fault OVERCURRENT (3)",
                 params={"fault": "OVERCURRENT", "info": np.int32(3)})
    assert (a.count, a.severity, a.detail, a.params) == (2, Severity.FAULT, "diverter_fault",
                                                          {"fault": "OVERCURRENT", "info": 3})
    a = b.raise_("diverter_fault", Severity.WARNING, "item 5: MCU refused command 10 (QUEUE_FULL)")
    assert a.severity == Severity.FAULT and a.detail == "diverter_fault" and a.params == {}
