"""The HMI's web server: a FastAPI app on uvicorn, in a thread beside the station.

Live updates are server-sent events: the browser's EventSource reconnects by itself after the
station restarts, and SSE needs nothing beyond HTTP (no extra WebSocket library on a line PC). Each
`state` event carries the whole snapshot (a few kB), so a page that reconnects is complete at once.
The live view is a JPEG the page fetches when an event says a new one exists: a slow page only
ever fetches fewer images, it never queues them up.

Operators need no login. Technician endpoints (`/api/tech/...`) need a session from a PIN (see
`auth`). With `hmi.token` set, every request must carry the token (query `?token=` once, which
sets a cookie, or `Authorization: Bearer`).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Body, FastAPI, Header, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from station.config import ConfigError, HmiConfig
from station.hmi.auth import AuditLog, PinLocked, PinNotConfigured, TechnicianAuth
from station.hmi.live import LiveMonitor
from station.hmi.preview import PreviewWorker
from station.state import IllegalTransition
from vision.taxonomy import REPO_ROOT

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
I18N = HERE / "i18n"

_LINE_ACTIONS = {"start": "start_line", "pause": "pause_line", "stop": "stop_line", "reset": "reset_line",
                 "estop": "estop_line"}


class HmiError(HTTPException):
    """An HTTP error the page can show in its own language: the body is `{"detail": English text,
    "code": ..., "params": {...}}` and the page renders `error.<code>` with `params` (the English
    `detail` where its language has no such template)."""

    def __init__(self, status: int, message: str, code: str, **params: Any):
        super().__init__(status, message)
        self.code = code
        self.params = {k: (v if isinstance(v, (int, float, str)) or v is None else str(v)) for k, v in params.items()}


def languages() -> list[dict[str, str]]:
    """Every translation file present: adding th.json adds Thai, with no code."""
    out = []
    for p in sorted(I18N.glob("*.json")):
        try:
            name = json.loads(p.read_text(encoding="utf-8")).get("_language", p.stem)
        except json.JSONDecodeError:
            log.error("%s is not valid JSON: that language is not offered", p)
            continue
        out.append({"code": p.stem, "name": name})
    return out


class Hmi:
    """The app and the threads behind it (preview, snapshots) for one station."""

    def __init__(self, station: Any, cfg: HmiConfig, audit_path: Path | None = None):
        self.station = station
        self.cfg = cfg
        self.preview = PreviewWorker(station, cfg.preview_fps, cfg.preview_width)
        self.live = LiveMonitor(station, self.preview, cfg.push_interval_s, cfg.low_conf_rate, cfg.low_conf_window)
        self.auth = TechnicianAuth(cfg.pin_hash, cfg.pin_env, cfg.pin_max_failures, cfg.pin_lockout_s,
                                   cfg.tech_session_s)
        self.audit = AuditLog(Path(audit_path) if audit_path else station.cfg.resolve(cfg.audit_path))
        self.closing = threading.Event()
        self.app = self._build()

    def start_threads(self) -> None:
        """Hook the preview into the loop (reference stash only) and start the HMI's own threads."""
        self.station.on_frame = self.preview.hook
        self.preview.start()
        self.live.start()

    def stop_threads(self) -> None:
        self.closing.set()
        if self.station.on_frame == self.preview.hook:
            self.station.on_frame = None
        self.preview.stop()
        self.live.stop()

    # ---- the app ---------------------------------------------------------------------------------
    def _build(self) -> FastAPI:
        app = FastAPI(title="Kozan HMI", docs_url=None, redoc_url=None, openapi_url=None)
        st, hmi = self.station, self
        token = self.cfg.token

        @app.exception_handler(HmiError)
        async def hmi_error(request: Request, exc: HmiError) -> JSONResponse:
            return JSONResponse({"detail": exc.detail, "code": exc.code, "params": exc.params},
                                status_code=exc.status_code, headers=exc.headers)

        @app.middleware("http")
        async def require_token(request: Request, call_next):  # type: ignore[no-untyped-def]
            if not token:
                return await call_next(request)
            given = (request.query_params.get("token") or request.cookies.get("kozan_token")
                     or request.headers.get("authorization", "").removeprefix("Bearer ").strip())
            if not given or not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"error": "this HMI needs its access token: open it with ?token=... "
                                              "(hmi.token in station.yaml)"}, status_code=401)
            resp = await call_next(request)
            if request.query_params.get("token"):
                resp.set_cookie("kozan_token", token, httponly=True, samesite="strict")
            return resp

        def client(request: Request) -> str:
            return request.client.host if request.client else ""

        def require_tech(session: str | None) -> None:
            if not hmi.auth.valid(session):
                raise HmiError(401, "technician access needed: enter the PIN (it lasts "
                                    f"{hmi.cfg.tech_session_s / 60:.0f} min)", "tech_needed",
                               min=round(hmi.cfg.tech_session_s / 60))

        @app.get("/", include_in_schema=False)
        def index() -> FileResponse:
            return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

        app.mount("/static", StaticFiles(directory=STATIC), name="static")

        @app.get("/api/state")
        def state() -> dict[str, Any]:
            return hmi.live.snapshot()

        @app.get("/api/events")
        async def events(request: Request) -> StreamingResponse:
            async def stream():  # type: ignore[no-untyped-def]
                hmi.preview.viewers += 1
                try:
                    yield "retry: 2000\n\n"
                    seen = -1
                    # starlette cancels this generator when the client goes away; the wake-up
                    # period is half the snapshot period, so a page lags a snapshot by that at most
                    nap = hmi.cfg.push_interval_s / 2
                    while not hmi.closing.is_set():
                        v = hmi.live.version
                        if v != seen:
                            seen = v
                            yield f"event: state\ndata: {json.dumps(hmi.live.snapshot())}\n\n"
                        await asyncio.sleep(nap)
                finally:
                    hmi.preview.viewers -= 1
            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

        @app.get("/api/preview.jpg")
        def preview() -> Response:
            seq, data = hmi.preview.jpeg()
            if data is None:
                raise HTTPException(404, "no live view yet: it appears once the line runs and a page is open")
            return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store", "X-Seq": str(seq)})

        @app.get("/api/thumb/{track_id}.jpg")
        def thumb(track_id: int) -> Response:
            data = hmi.preview.thumb(track_id)
            if data is None:
                raise HTTPException(404, f"no thumbnail for item {track_id} (only recent items keep one)")
            return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

        @app.get("/api/i18n")
        def i18n_list() -> dict[str, Any]:
            return {"languages": languages(), "default": hmi.cfg.language}

        @app.get("/api/i18n/{code}")
        def i18n(code: str) -> Response:
            if code not in {lang["code"] for lang in languages()}:
                raise HTTPException(404, f"no translation {code!r}; available: {[x['code'] for x in languages()]}")
            return Response((I18N / f"{code}.json").read_bytes(), media_type="application/json")

        # ---- operator actions (no login; audited) --------------------------------------------------
        @app.post("/api/line/{action}")
        def line(action: str, request: Request) -> dict[str, Any]:
            if action not in _LINE_ACTIONS:
                raise HTTPException(404, f"unknown line action {action!r}; one of {sorted(_LINE_ACTIONS)}")
            try:
                getattr(st, _LINE_ACTIONS[action])()
            except IllegalTransition as e:
                hmi.audit.write("operator", f"line.{action}", False, client(request), error=str(e))
                raise HmiError(409, str(e), "line_refused", action=action, state=st.state.state.value) from None
            hmi.audit.write("operator", f"line.{action}", True, client(request), state=st.state.state.value)
            hmi.live.tick()
            return {"state": st.state.state.value, "reason": st.state.reason}

        @app.post("/api/manual-next")
        def manual_next(request: Request, n: int = Body(1, embed=True)) -> dict[str, Any]:
            try:
                pending = st.send_next_to_manual(n)
            except ValueError as e:
                raise HmiError(422, str(e), "manual_n", n=n) from None
            hmi.audit.write("operator", "manual_next", True, client(request), n=n)
            hmi.live.tick()
            return {"manual_next": pending}

        @app.post("/api/items/{track_id}/wrong-bin")
        def wrong_bin(track_id: int, request: Request, note: str = Body("", embed=True)) -> dict[str, Any]:
            """The operator saw this item land in the wrong bin: its frame goes to the dataset."""
            try:
                name = st.flag_wrong_bin(track_id, note)
            except KeyError as e:
                hmi.audit.write("operator", "wrong_bin", False, client(request), track_id=track_id, error=str(e))
                raise HmiError(404, str(e.args[0]), "item_unknown", item=track_id) from None
            except (RuntimeError, AttributeError) as e:
                hmi.audit.write("operator", "wrong_bin", False, client(request), track_id=track_id, error=str(e))
                raise HmiError(409, str(e), "capture_off" if isinstance(e, RuntimeError) else "not_possible",
                               item=track_id) from None
            hmi.audit.write("operator", "wrong_bin", True, client(request), track_id=track_id, capture=name)
            hmi.live.flagged.add(track_id)
            hmi.live.tick()
            return {"track_id": track_id, "capture": name}

        @app.post("/api/alarms/{alarm_id}/ack")
        def ack(alarm_id: int, request: Request) -> dict[str, Any]:
            ok = any(a.id == alarm_id for a in st.alarms.active()) and st.alarms.acknowledge(alarm_id)
            hmi.audit.write("operator", "alarm.ack", ok, client(request), alarm_id=alarm_id)
            if not ok:
                raise HmiError(404, f"no alarm {alarm_id}: it may have been acknowledged already", "alarm_gone",
                               id=alarm_id)
            hmi.live.tick()
            return {"acknowledged": alarm_id}

        # ---- lots (operator: the consignment's paperwork is at the line; audited) -------------------
        @app.get("/api/lot")
        def lot_state() -> dict[str, Any]:
            return {"lot": st.records.current_lot(), "acknowledged": st.records.acknowledged()}

        @app.post("/api/lot/open")
        def lot_open(request: Request, body: dict[str, Any] = Body(...)) -> dict[str, Any]:
            from station.lots import LotError, LotInfo

            try:
                info = LotInfo(str(body.get("lot_number", "")), str(body.get("origin_country", "")),
                               str(body.get("supplier", "")), str(body.get("consignment_ref", "") or ""),
                               str(body.get("basel_ref", "") or ""), opened_by=f"hmi operator {client(request)}")
                lot = st.records.open_lot(info)
            except LotError as e:
                hmi.audit.write("operator", "lot.open", False, client(request), lot=body, error=str(e))
                raise HTTPException(409 if "open" in str(e) or "used" in str(e) else 422, str(e)) from None
            hmi.audit.write("operator", "lot.open", True, client(request), lot=lot["lot_number"])
            return lot

        @app.post("/api/lot/close")
        def lot_close(request: Request) -> dict[str, Any]:
            from station.lots import LotError

            try:
                lot = st.records.close_lot(f"hmi operator {client(request)}", drain_s=st.cfg.records.lot_close_drain_s)
            except LotError as e:
                hmi.audit.write("operator", "lot.close", False, client(request), error=str(e))
                raise HTTPException(409, str(e)) from None
            hmi.audit.write("operator", "lot.close", True, client(request), lot=lot["lot_number"],
                            records=lot["records"], head=lot["head_hash"])
            return lot

        # ---- technician (PIN) --------------------------------------------------------------------
        @app.post("/api/tech/login")
        def login(request: Request, pin: str = Body(..., embed=True)) -> JSONResponse:
            try:
                session = hmi.auth.login(pin)
            except PinLocked as e:
                hmi.audit.write("technician", "login", False, client(request), error="locked")
                return JSONResponse({"error": str(e), "retry_after_s": round(e.retry_after_s)}, status_code=429,
                                    headers={"Retry-After": str(int(e.retry_after_s) + 1)})
            except PinNotConfigured as e:
                return JSONResponse({"error": str(e)}, status_code=503)
            hmi.audit.write("technician", "login", session is not None, client(request))
            if session is None:
                return JSONResponse({"error": "wrong PIN", "tries_left": hmi.auth.failures_left()}, status_code=401)
            return JSONResponse({"session": session, "expires_s": hmi.cfg.tech_session_s})

        @app.post("/api/tech/logout")
        def logout(x_kozan_session: str | None = Header(None)) -> dict[str, bool]:
            hmi.auth.logout(x_kozan_session)
            return {"ok": True}

        @app.get("/api/tech/settings")
        def settings(x_kozan_session: str | None = Header(None)) -> dict[str, Any]:
            require_tech(x_kozan_session)
            models = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "models").glob("*.onnx"))
            return {"rules": st.cfg.rules.model_dump(mode="json"),
                    "diverters": [d.model_dump(mode="json") for d in st.cfg.diverters],
                    "model": st.cfg.detector.model, "model_version": st.core.model_version, "models": models}

        @app.post("/api/tech/settings")
        def change_settings(request: Request, changes: dict[str, Any] = Body(...),
                            x_kozan_session: str | None = Header(None)) -> dict[str, Any]:
            require_tech(x_kozan_session)
            before = {"rules": st.cfg.rules.model_dump(mode="json"),
                      "diverters": [d.model_dump(mode="json") for d in st.cfg.diverters]}
            try:
                st.apply_settings(changes)
            except ConfigError as e:
                hmi.audit.write("technician", "settings", False, client(request), changes=changes, error=str(e))
                raise HTTPException(422, str(e)) from None
            hmi.audit.write("technician", "settings", True, client(request), changes=changes,
                            before={k: before[k] for k in changes if k in before})
            hmi.live.tick()
            return settings(x_kozan_session)

        @app.post("/api/tech/model")
        def change_model(request: Request, model: str = Body(..., embed=True),
                         x_kozan_session: str | None = Header(None)) -> dict[str, Any]:
            require_tech(x_kozan_session)
            try:
                version = st.switch_model(model)
            except IllegalTransition as e:
                hmi.audit.write("technician", "model", False, client(request), model=model, error=str(e))
                raise HmiError(409, str(e), "model_busy", model=model, error=str(e)) from None
            except Exception as e:   # missing file, not ONNX, other classes: the message says which
                hmi.audit.write("technician", "model", False, client(request), model=model, error=str(e))
                raise HmiError(422, f"model {model} not loaded: {e}", "model_not_loaded", model=model,
                               error=str(e)) from None
            hmi.audit.write("technician", "model", True, client(request), model=model, version=version)
            return {"model": model, "version": version}

        @app.get("/api/tech/audit")
        def audit(x_kozan_session: str | None = Header(None)) -> list[dict[str, Any]]:
            require_tech(x_kozan_session)
            return hmi.audit.tail(100)

        return app


class HmiServer:
    """Runs an `Hmi` on uvicorn in a daemon thread; `url` is where the page is."""

    def __init__(self, station: Any, cfg: HmiConfig, audit_path: Path | None = None):
        self.hmi = Hmi(station, cfg, audit_path)
        self.cfg = cfg
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = cfg.port

    @property
    def url(self) -> str:
        host = self.cfg.host if ":" not in self.cfg.host else f"[{self.cfg.host}]"
        return f"http://{host}:{self.port}/"

    def start(self) -> str:
        """Bind now (so a busy port fails here, with a message), then serve in a thread."""
        fam = socket.AF_INET6 if ":" in self.cfg.host else socket.AF_INET
        sock = socket.socket(fam, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.cfg.host, self.cfg.port))
        except OSError as e:
            sock.close()
            raise OSError(f"the HMI cannot listen on {self.cfg.host}:{self.cfg.port} ({e.strerror}): "
                          "set another hmi.port (e.g. --set hmi.port=8081) or hmi.enabled=false") from None
        sock.listen(64)
        self._sock = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.hmi.app, log_level="warning", timeout_graceful_shutdown=2,
                                access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self.hmi.start_threads()
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="hmi-http",
                                        daemon=True)
        self._thread.start()
        log.info("HMI at %s", self.url)
        return self.url

    def stop(self) -> None:
        self.hmi.stop_threads()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
