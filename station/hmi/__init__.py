"""The operator's touchscreen HMI, served by `kozan run` (FastAPI on uvicorn, static page, SSE).

`HmiServer(station, cfg.hmi).start()` returns the URL; `stop()` takes it down. The page lives in
`static/` (no build step), its strings in `i18n/<language>.json` (a new file is a new language).
"""
from station.hmi.server import Hmi, HmiServer, languages

__all__ = ["Hmi", "HmiServer", "languages"]
