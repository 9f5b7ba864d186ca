"""The parcel explorer in a real browser: Debian's chromium, headless, driven through selenium
against a real uvicorn API on the demo world (``cbmflow demo``'s seed and sizes), extracted by the
worker's own code.

A person logs in, opens a parcel by deep link and by clicking it on the map; the numbers drawn in
the charts (read from uPlot's data in the page) are the API's series; a user without a grant sees
neither the dataset nor its tiles. With ``CBMFLOW_EXPLORER_SCREENSHOT=path`` the explorer is saved
as a PNG there (docs/img/explorer.png comes from this). A missing chromium or chromedriver fails.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import requests
import shapely
import shapely.geometry
from argon2 import PasswordHasher
from psycopg2 import sql

from card.testworld import WorldSummary, generate
from catalog_watcher.service import watch_once
from cbmflow import db
from cbmflow.dev.api_process import api_server
from cbmflow.dev.demo import AOI, C6_SCENES, COLLECTIONS, S1_SCENES, SEED, YEAR
from cbmflow.messages import ExtractParcels
from cbmflow.parcels.ingest import add_aoi, import_parcels
from cbmflow.settings import WatchSettings, WorkerSettings
from worker.consumer import SceneJobs

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ANALYST = ("analyst", "analyst-secret-1")  # granted the demo dataset
STRANGER = ("stranger", "stranger-secret-1")  # granted another area only
SCREENSHOT = os.environ.get("CBMFLOW_EXPLORER_SCREENSHOT", "")
# `cbmflow demo`'s world (300 parcels, 10 scenes) for the screenshot; a smaller one of the same
# seed otherwise, so the test stays within its time (generating and extracting the demo world
# takes a minute on two cores).
PARCELS, SCENES = (300, 10) if SCREENSHOT else (60, 6)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> WorldSummary:
    return generate(
        tmp_path_factory.mktemp("explorer"),
        parcels=PARCELS,
        scenes=SCENES,
        seed=SEED,
        aoi_name=AOI,
        year=YEAR,
        s1_scenes=S1_SCENES,
        c6_scenes=C6_SCENES,
    )


@pytest.fixture
def served(world: WorldSummary, pg_dsn: str, cbm_env: Any) -> Iterator[tuple[str, list[str]]]:
    """The demo chain without its message bus: import, catalogue, extract every scene in-process."""
    started = time.monotonic()
    with db.transaction(pg_dsn) as cur:
        add_aoi(cur, AOI, world.aoi_path)
        import_parcels(cur, world.parcels_path, AOI, YEAR)
        cur.execute("INSERT INTO aois (name, geom) VALUES ('xx', ST_Multi(ST_MakeEnvelope(-48, -16, -47, -15, 4326)))")
        hasher = PasswordHasher()
        for (name, password), aoi in ((ANALYST, AOI), (STRANGER, "xx")):
            cur.execute("INSERT INTO users (name, password_hash) VALUES (%s, %s)", (name, hasher.hash(password)))
            cur.execute("INSERT INTO user_grants (user_name, aoi) VALUES (%s, %s)", (name, aoi))
    watch = WatchSettings(catalog_url=str(world.stac_catalog_path), lookback_days=0, collections=COLLECTIONS)
    assert watch_once(dsn=pg_dsn, settings=watch).new == SCENES + S1_SCENES + C6_SCENES
    jobs = SceneJobs(pg_dsn, "explorer-test", WorkerSettings(metrics_port=-1))
    conn = psycopg2.connect(pg_dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT id, product_id, card, location FROM scenes ORDER BY id")
            scenes = cur.fetchall()
        for sid, product_id, card, location in scenes:
            claimed = jobs.claim(
                conn, ExtractParcels(scene_id=sid, product_id=product_id, card=card, location=location)
            )
            assert claimed is not None
            jobs.run(conn, claimed)
    finally:
        conn.close()
    with db.transaction(pg_dsn) as cur:
        ds = db.get_dataset(cur, AOI, YEAR)
        assert ds is not None
        # Two parcels seen both cloud-free and cloudy (masked SCL fraction above 0.1), most seen first.
        cur.execute(
            sql.SQL(
                "WITH f AS (SELECT h.pid, h.scene_id, coalesce(sum(h.count) FILTER (WHERE h.class IN"
                " (0, 1, 3, 8, 9, 10)), 0)::float8 / sum(h.count) AS masked FROM {hists} h GROUP BY 1, 2)"
                " SELECT p.parcel_id FROM f JOIN {parcels} p ON p.pid = f.pid"
                " WHERE (SELECT count(DISTINCT s.card) FROM {sigs} g JOIN scenes s ON s.id = g.scene_id"
                " WHERE g.pid = p.pid AND s.card IN ('bs', 'c6')) = 2 GROUP BY p.pid, p.parcel_id"
                " HAVING bool_or(f.masked <= 0.1) AND bool_or(f.masked > 0.1) ORDER BY count(*) DESC, p.pid LIMIT 2"
            ).format(parcels=ds.parcels, hists=ds.hists, sigs=ds.sigs)
        )
        pids = [str(r[0]) for r in cur.fetchall()]
    assert len(pids) == 2
    print(f"\nexplorer world: imported, catalogued and extracted in {time.monotonic() - started:.1f} s")
    with api_server(db.role_dsn(pg_dsn, "api"), env={"CBMFLOW_API_CHIP_SECRET": "explorer-test"}) as url:
        yield url, pids


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for binary in (CHROMIUM, CHROMEDRIVER):
        if not binary.exists() and shutil.which(binary.name) is None:
            pytest.fail(f"{binary} is missing: install Debian's chromium and chromium-driver (make deps)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--use-angle=swiftshader",  # WebGL for MapLibre without a GPU
        "--enable-unsafe-swiftshader",
        "--window-size=1366,768",  # a laptop screen
        "--force-device-scale-factor=1",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, script: str, what: str, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = driver.execute_script(script)
        if got:
            return got
        if time.monotonic() > deadline:
            state = driver.execute_script("return JSON.stringify(window.explorer && window.explorer.state)")
            logs = driver.get_log("browser") if hasattr(driver, "get_log") else []
            raise AssertionError(f"timed out waiting for {what}; state {state}; console {logs}")
        time.sleep(0.05)


def _api(base: str, path: str, **params: Any) -> Any:
    resp = requests.get(f"{base}{path}", params=params, auth=ANALYST, timeout=30)
    resp.raise_for_status()
    return resp.json()


def _t(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _same(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9))


def _check_charts(driver: Any, base: str, pid: str) -> dict[str, Any]:
    """The page's chart data against the API's series for ``pid``."""
    page = json.loads(
        driver.execute_script(
            "const e = window.explorer; return JSON.stringify({state: e.state,"
            " data: Object.fromEntries(Object.entries(e.charts).map(([k, c]) => [k, c ? c.data : null]))})"
        )
    )
    ds = f"/api/v1/datasets/{AOI}/{YEAR}"
    clear = _api(base, f"{ds}/index", pid=pid)["observations"]
    everything = _api(base, f"{ds}/index", pid=pid, max_cloud=1)["observations"]
    assert clear and len(everything) > len(clear), "the demo parcel has cloud-free and cloudy dates"
    everything = [o for o in everything if o["value"] is not None]
    kept = {o["scene_id"] for o in clear}
    ndvi = page["data"]["ndvi"]
    assert ndvi[0] == [_t(o["acquired"]) for o in everything]
    assert all(
        _same(g, o["value"] if o["scene_id"] in kept else None) for g, o in zip(ndvi[1], everything, strict=True)
    )
    assert all(
        _same(g, None if o["scene_id"] in kept else o["value"]) for g, o in zip(ndvi[2], everything, strict=True)
    )

    for card, key, bands, convert in (
        ("bs", "s1", ("VVb", "VHb"), lambda v: 10 * math.log10(v)),
        ("c6", "coherence", ("VVc", "VHc"), lambda v: v),
    ):
        obs = _api(base, f"{ds}/timeseries", pid=pid, card=card)["observations"]
        by_scene: dict[int, dict[str, Any]] = {}
        for o in obs:
            by_scene.setdefault(o["scene_id"], {"t": _t(o["acquired"])})[o["band"]] = o["mean"]
        rows = sorted(by_scene.values(), key=lambda r: r["t"])
        data = page["data"][key]
        assert rows, f"the demo parcel has {card} observations"
        assert data[0] == [r["t"] for r in rows]
        for i, band in enumerate(bands, start=1):
            assert all(_same(g, convert(r[band])) for g, r in zip(data[i], rows, strict=True)), (card, band)
    return page["state"]


def _log_in(driver: Any, url: str, who: tuple[str, str]) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    _wait(driver, "return !document.getElementById('login').hidden", "the login form")
    driver.find_element(By.ID, "login-user").send_keys(who[0])
    driver.find_element(By.ID, "login-password").send_keys(who[1])
    driver.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()


def test_explorer_in_chromium(browser: Any, served: tuple[str, list[str]]) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser
    base, (first, second) = served

    # 1. Log in on a deep link: the page opens that parcel and draws the API's numbers.
    _log_in(driver, f"{base}/?dataset={AOI}&year={YEAR}&pid={first}", ANALYST)
    _wait(
        driver,
        f"return window.explorer.state.status === 'parcel' && window.explorer.state.pid === '{first}'",
        "the deep-linked parcel",
    )
    assert driver.execute_script("return sessionStorage.getItem('cbmflow.session')").startswith("cbms_")
    state = _check_charts(driver, base, first)
    facts = _api(base, f"/api/v1/datasets/{AOI}/{YEAR}/parcel", pid=first)["properties"]
    assert state["parcel"]["crop"] == facts["crop_name"] and state["parcel"]["area_m2"] == facts["area_m2"]
    assert driver.find_element(By.ID, "parcel-crop").text.startswith(facts["crop_name"])
    assert [d["aoi"] for d in state["datasets"]] == [AOI]

    # Keyboard: focus the NDVI chart, step to the first date; its values and chip appear.
    chart = driver.find_element(By.ID, "chart-ndvi")
    chart.send_keys(Keys.ARROW_RIGHT)
    first_t = state["ndvi"][0]["t"]
    _wait(driver, f"return window.explorer.state.selected === {first_t}", "the keyboard-selected date")
    _wait(
        driver,
        "return !document.getElementById('chip-img').hidden"
        " && document.getElementById('chip-img').src.startsWith('data:image/png')",
        "the date's chip",
    )
    assert state["ndvi"][0]["acquired"][:10] in driver.find_element(By.ID, "readout-values").text
    # The mouse: hovering the NDVI chart at its last point selects that date.
    last = state["ndvi"][-1]
    px, py = driver.execute_script(
        "const u = window.explorer.charts.ndvi; const r = u.over.getBoundingClientRect();"
        f" return [u.valToPos({last['t']}, 'x') - r.width / 2, u.valToPos({last['value']}, 'y') - r.height / 2]"
    )
    over = driver.find_element(By.CSS_SELECTOR, "#chart-ndvi .u-over")
    ActionChains(driver).move_to_element_with_offset(over, int(px), int(py)).perform()
    _wait(driver, f"return window.explorer.state.selected === {last['t']}", "the hovered date")
    png = driver.execute_script("return window.explorer.png()")
    assert png.startswith("data:image/png;base64,") and len(png) > 5000
    csv_text = driver.execute_script("return window.explorer.csv()")
    assert len(csv_text.strip().splitlines()) == 1 + len(state["ndvi"]) + len(state["s1"]) + len(state["coherence"])

    # 2. Click another parcel on the map: its panel opens.
    geometry = _api(base, f"/api/v1/datasets/{AOI}/{YEAR}/parcel", pid=second)["geometry"]
    point = shapely.geometry.shape(geometry).representative_point()
    driver.execute_script(f"window.explorer.map.jumpTo({{center: [{point.x}, {point.y}], zoom: 17}})")
    _wait(
        driver,
        "const m = window.explorer.map; return m.loaded() && m.areTilesLoaded()"
        " && m.queryRenderedFeatures({layers: ['parcels-fill']}).length > 0",
        "the parcel tiles",
    )
    x, y = driver.execute_script(f"const p = window.explorer.map.project([{point.x}, {point.y}]); return [p.x, p.y]")
    canvas = driver.find_element(By.CSS_SELECTOR, "#map canvas")
    size = canvas.size
    ActionChains(driver).move_to_element_with_offset(
        canvas, int(x - size["width"] / 2), int(y - size["height"] / 2)
    ).click().perform()
    _wait(
        driver,
        f"return window.explorer.state.status === 'parcel' && window.explorer.state.pid === '{second}'",
        "the clicked parcel",
    )
    state = _check_charts(driver, base, second)
    print(
        f"\nexplorer: click-to-chart {state['timings']['clickToChartMs']} ms,"
        f" deep link to chart {state['timings'].get('deepLinkToChartMs')} ms"
    )

    if SCREENSHOT:
        # The parcel among its neighbours over the scene, a mid-season date and its chip.
        driver.execute_script(f"window.explorer.map.jumpTo({{center: [{point.x}, {point.y}], zoom: 15.2}})")
        chart = driver.find_element(By.ID, "chart-ndvi")
        chart.click()
        for _ in range(len(state["ndvi"]) // 2 + 1):
            chart.send_keys(Keys.ARROW_RIGHT)
        _wait(
            driver,
            "const s = window.explorer.state; return s.chip !== null && s.chip.scene_id === s.chipFor",
            "the selected date's chip",
        )
        _wait(
            driver,
            "const m = window.explorer.map; return m.loaded() && m.areTilesLoaded() && m.isSourceLoaded('imagery')",
            "the imagery",
            60,
        )
        time.sleep(1.0)  # the raster fade-in
        Path(SCREENSHOT).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(SCREENSHOT)

    # Search by id: the first parcel again, and the map goes to it.
    search = driver.find_element(By.ID, "search-pid")
    search.send_keys(first + Keys.ENTER)
    _wait(
        driver,
        f"return window.explorer.state.status === 'parcel' && window.explorer.state.pid === '{first}'",
        "the searched parcel",
    )
    assert "pid=" + first in driver.current_url

    # 3. A user without the grant: logs in with `#token=`, sees no dataset, and the tiles refuse.
    token = requests.post(f"{base}/api/v1/auth/token", auth=STRANGER, timeout=10).json()["token"]
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"{base}/?dataset={AOI}&year={YEAR}&pid={first}#token={token}")
    _wait(driver, "return window.explorer.state.status === 'ready'", "the stranger's page")
    assert driver.execute_script("return window.explorer.state.datasets") == []
    options = driver.execute_script("return [...document.querySelectorAll('#dataset option')].map(o => o.value)")
    assert options == []
    assert "#token" not in driver.current_url
    status = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"fetch('/api/v1/datasets/{AOI}/{YEAR}/tiles/15/17000/11000.mvt',"
        " {headers: {Authorization: 'Bearer ' + sessionStorage.getItem('cbmflow.session')}})"
        ".then(r => done(r.status))"
    )
    assert status == 403
    assert driver.execute_script("return window.explorer.state.pid") is None
