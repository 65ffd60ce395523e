"""MONAI Label's OHIF viewer in a real headless Chromium, against the app served with ``--studies`` at a private Orthanc.

The chain under test is the one an annotator uses: Orthanc (DICOMweb) holds a CT series made from the shared data; the
app's server runs as the README starts it, with ``--studies`` at Orthanc's DICOMweb root; Chromium (Debian's, driven by
Selenium through Debian's chromium-driver, so nothing is downloaded) opens ``/ohif/``. From the page itself the test
makes the MONAI Label panel's point-prompt request and its label upload, and checks what comes back and what Orthanc
then holds. Run with ``make test-browser`` (it installs Orthanc, Chromium and the pins first).
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dicomweb_fixtures import (
    ORTHANC_SKIP_REASON,
    SHARED_CT,
    Orthanc,
    ct_volume,
    new_uid,
    orthanc_available,
    series_geometry,
    write_series,
)
from label_server import MODEL, box_weights, label_server, model_window

REPO = Path(__file__).resolve().parents[1]
LABEL_BIN = REPO / ".venv-label" / "bin"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",  # software WebGL without the deprecation fallback (Chromium >= 137 asks for it)
    "--disable-dev-shm-usage",
    "--window-size=1400,900",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # the page reaches nothing off this machine (fonts)
)
PAGE_TIMEOUT_S = 90
REQUEST_TIMEOUT_S = 180
CLICK_FRACTIONS = (0.3, 0.65, 0.35)  # the click, as a fraction of each axis: off-centre, so a flipped axis shows

pytestmark = [
    pytest.mark.skipif(
        not (LABEL_BIN / "monailabel").exists(),
        reason="needs .venv-label with monailabel; run with `make test-browser` (it builds the venv)",
    ),
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason=f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); `make test-browser` installs "
        "them",
    ),
    pytest.mark.skipif(not orthanc_available(), reason=ORTHANC_SKIP_REASON),
    pytest.mark.skipif(not SHARED_CT.exists(), reason=f"shared test data not found at {SHARED_CT}"),
]

selenium = pytest.importorskip(
    "selenium", reason="needs selenium (tests/browser/requirements.txt); run with `make test-browser`"
)


def artefact_dir() -> Path:
    """Where screenshots go: ``$MSAM_TEST_ARTEFACTS`` or ``test-artefacts/`` in the repository root (git-ignored)."""
    folder = Path(os.environ.get("MSAM_TEST_ARTEFACTS") or REPO / "test-artefacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def start_chromium(profile: Path) -> Any:
    """Headless Debian Chromium through Debian's chromedriver, both by explicit path (Selenium Manager never runs)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # should anything still reach Selenium Manager, it must not download
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROME_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(profile.parent / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_script_timeout(REQUEST_TIMEOUT_S)
    return driver


def page_text(driver: Any) -> str:
    """The visible text of the page's body."""
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.TAG_NAME, "body").text)


def wait_for(driver: Any, what: str, condition, timeout: float = PAGE_TIMEOUT_S) -> Any:
    """Wait until ``condition(driver)`` is truthy; on timeout fail with the page text and the browser's errors."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5).until(condition)
    except TimeoutException:
        errors = [e["message"][:300] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        driver.save_screenshot(str(artefact_dir() / f"timeout_{what.replace(' ', '_')}.png"))
        pytest.fail(
            f"{what}: not seen in {timeout}s at {driver.current_url}\npage: {page_text(driver)[:1500]}\n"
            f"browser errors: {errors[-10:]}"
        )


def dismiss_banner(driver: Any) -> None:
    """Close OHIF's "investigational use" banner if it shows, so it does not cover the viewport in screenshots."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.XPATH, "//button[normalize-space()='Confirm and Hide']"):
        if button.is_displayed():
            button.click()


# In the page: the active viewport's volume (the one the MONAI Label panel reads), the index of a world point as the
# panel computes a click's (worldToIndex, rounded), and the volume's dimensions.
VOLUME_JS = """
const s = window.services;
if (!s || !s.viewportGridService || !s.cornerstoneViewportService) return null;
const vpId = s.viewportGridService.getActiveViewportId();
const info = vpId && s.cornerstoneViewportService.getViewportInfo(vpId);
const data = info && info.viewportData && info.viewportData.data;
const volume = data && data[0] && data[0].volume;
if (!volume || !volume.imageData) return null;
const loaded = volume.loadStatus ? !!volume.loadStatus.loaded : true;
const world = arguments[0];
return {dims: Array.from(volume.imageData.getDimensions()), loaded: loaded,
        index: world ? Array.from(volume.imageData.worldToIndex(world)).map(Math.round) : null};
"""

# In the page: the panel's point-prompt request (MonaiLabelClient.infer as the OHIF v3 panel calls it for a deepgrow
# model): POST infer/<model>?image=<series>&output=image, a form with one `params` field holding the clicks and the
# result options the client adds; the answer read as an array buffer and handed back base64-encoded.
INFER_JS = """
const [server, model, image, foreground, done] = arguments;
(async () => {
  try {
    const params = {foreground: [foreground], background: [], result_extension: '.nrrd', result_dtype: 'uint8',
                    result_compress: false, restore_label_idx: false};
    const form = new FormData();
    form.append('params', JSON.stringify(params));
    const url = new URL('infer/' + encodeURIComponent(model), server);
    url.searchParams.append('image', image);
    url.searchParams.append('output', 'image');
    const resp = await fetch(url.toString(), {method: 'POST', body: form,
                                              headers: {accept: 'application/json,multipart/form-data'}});
    const bytes = new Uint8Array(await resp.arrayBuffer());
    let bin = '';
    for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    const magic = String.fromCharCode.apply(null, bytes.subarray(0, 4));
    done({status: resp.status, magic: magic, length: bytes.length, b64: btoa(bin),
          text: resp.status === 200 ? '' : new TextDecoder().decode(bytes).slice(0, 2000)});
  } catch (e) { done({error: String(e && e.stack || e)}); }
})();
"""

# In the page: the panel's label save (MonaiLabelClient.save_label): PUT datastore/label?image=<series>&tag=<tag>, a
# form with `params` and the label as a blob named label.bin.
SAVE_JS = """
const [server, image, tag, b64, params, done] = arguments;
(async () => {
  try {
    const raw = atob(b64);
    const bytes = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    const form = new FormData();
    form.append('params', JSON.stringify(params));
    form.append('label', new Blob([bytes]), 'label.bin');
    const url = new URL('datastore/label', server);
    url.searchParams.append('image', image);
    url.searchParams.append('tag', tag);
    const resp = await fetch(url.toString(), {method: 'PUT', body: form,
                                              headers: {accept: 'application/json,multipart/form-data'}});
    done({status: resp.status, text: (await resp.text()).slice(0, 2000)});
  } catch (e) { done({error: String(e && e.stack || e)}); }
})();
"""


def read_nrrd(content: bytes) -> tuple[dict, np.ndarray]:
    """Header and data of an NRRD answer (pynrrd; data indexed ``[i, j, k]``, first axis fastest in the file)."""
    import nrrd

    header = nrrd.read_header(io.BytesIO(content))
    data = nrrd.read_data(header, io.BytesIO(content.split(b"\n\n", 1)[1]), index_order="F")
    return dict(header), np.asarray(data)


def _tag(instance: dict, tag: str) -> list:
    """A DICOM JSON attribute's values (``[]`` when absent)."""
    return list(instance.get(tag, {}).get("Value", []))


def ohif_person_name(value: str) -> str:
    """A DICOM person name as OHIF's study list shows it (``FAMILY^GIVEN`` -> ``FAMILY, GIVEN``)."""
    parts = [p for p in value.split("^")[:2] if p]
    return ", ".join(parts)


ERROR_PAGE_TEXT = ("Something went wrong", "Error Code", "No data source", "Invalid Study")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A private Orthanc holding the whole shared CT (198x202x59, so the model window fits inside it) as one axial
    series, the app's server with ``--studies`` at its DICOMweb root (box weights), and a headless Chromium."""
    root = tmp_path_factory.mktemp("browser")
    ckpt = box_weights(root / "box.pt")
    orthanc = Orthanc(root / "orthanc").start()
    driver = None
    server = contextlib.ExitStack()
    try:
        volume, spacing = ct_volume(nib_shape(SHARED_CT), step=(1, 1, 1))
        stamp = f"{int(time.time())}{os.getpid() % 10000}"
        study, series = new_uid(f"7.{stamp}"), new_uid(f"8.{stamp}")
        orthanc.upload(write_series(root / "dicom", "axial", study, series, volume, spacing))
        geometry = series_geometry(orthanc.url, study, series)
        base = server.enter_context(label_server(root, orthanc.url, ckpt))
        (root / "profile").mkdir()
        driver = start_chromium(root / "profile")
        yield {
            "url": orthanc.url,
            "rest": orthanc.rest,
            "orthanc": orthanc,
            "study": study,
            "series": series,
            "geometry": geometry,
            "base": base,
            "driver": driver,
            "root": root,
        }
    finally:
        if driver is not None:
            driver.quit()
        server.close()
        if (root / "server.log").exists():
            shutil.copy(root / "server.log", artefact_dir() / "browser_test_server.log")
        orthanc.stop()


def nib_shape(path: Path) -> tuple[int, int, int]:
    """The voxel grid shape of a NIfTI file."""
    import nibabel as nib

    return tuple(int(n) for n in nib.load(str(path)).shape[:3])  # type: ignore[return-value]


def open_monai_label_viewer(stack: dict) -> dict:
    """The MONAI Label mode (``/ohif/monai-label``) on the study, its volume loaded and its panel connected to the
    server; returns the active viewport's volume info (dimensions, index of the click's world point)."""
    from selenium.webdriver.common.by import By

    driver, base = stack["driver"], stack["base"]
    if stack.get("volume"):
        return stack["volume"]
    geometry = stack["geometry"]
    click = tuple(int(round(f * (n - 1))) for f, n in zip(CLICK_FRACTIONS, geometry.dims))
    driver.get(f"{base}/ohif/")
    # the panel's server address (a cookie it keeps; by default the page's host on port 8000)
    driver.add_cookie({"name": "MONAILABEL_SERVER_URL", "value": f"{base}/", "path": "/"})
    driver.get(f"{base}/ohif/monai-label?StudyInstanceUIDs={stack['study']}")

    def volume_ready(d: Any) -> dict | None:
        info = d.execute_script(VOLUME_JS, [float(v) for v in geometry.world(click)])
        return info if info and info["loaded"] else None

    volume = wait_for(driver, "monai-label volume", volume_ready)
    dismiss_banner(driver)
    field = wait_for(driver, "panel server field", lambda d: d.find_elements(By.ID, "monailabelServerURL"))[0]
    assert field.get_attribute("value") == f"{base}/"
    driver.find_element(By.XPATH, "//input[@id='monailabelServerURL']/ancestor::tr[1]//button").click()
    panel_js = "const p = document.querySelector('.monaiLabelPanel'); return p ? p.textContent : '';"
    wait_for(driver, "panel model list", lambda d: MODEL in d.execute_script(panel_js))
    stack["volume"], stack["click"] = volume, click
    return volume


def infer_from_page(stack: dict) -> dict:
    """The panel's point-prompt request made from the page at the click's index as OHIF computes it (cached)."""
    if "infer" not in stack:
        volume = open_monai_label_viewer(stack)
        driver = stack["driver"]
        answer = driver.execute_async_script(INFER_JS, f"{stack['base']}/", MODEL, stack["series"], volume["index"])
        assert "error" not in answer, f"page script failed: {answer.get('error')}"
        stack["infer"] = answer
        time.sleep(1)
        driver.save_screenshot(str(artefact_dir() / "ohif_monai_label_viewer.png"))
    return stack["infer"]


def test_study_list_shows_the_study(stack: dict) -> None:
    import httpx

    studies = httpx.get(f"{stack['url']}/studies", params={"StudyInstanceUID": stack["study"]}, timeout=60).json()
    assert len(studies) == 1, studies
    name = ohif_person_name(_tag(studies[0], "00100010")[0]["Alphabetic"])
    patient_id = _tag(studies[0], "00100020")[0]
    assert name and patient_id, "the test series should carry a PatientName and a PatientID"
    driver = stack["driver"]
    driver.get(f"{stack['base']}/ohif/")
    # one row of the list: the patient's name, MRN (PatientID) and the series' instance count, as Orthanc has them
    # (StudyDescription is not among the study attributes Orthanc's QIDO returns by default, so OHIF leaves it blank)
    row_js = """
    const [name, mrn] = arguments;
    return Array.from(document.querySelectorAll('tr, [role=row], div')).filter(
        r => r.textContent.includes(name) && r.textContent.includes(mrn)).map(r => r.innerText).sort(
        (a, b) => a.length - b.length)[0] || null;"""
    row = wait_for(driver, "study list row", lambda d: d.execute_script(row_js, name, patient_id))
    assert str(stack["geometry"].dims[2]) in row.split(), f"study row {row!r} lacks the instance count"
    dismiss_banner(driver)
    driver.save_screenshot(str(artefact_dir() / "ohif_study_list.png"))


def test_viewer_route_loads(stack: dict) -> None:
    driver = stack["driver"]
    driver.get(f"{stack['base']}/ohif/viewer?StudyInstanceUIDs={stack['study']}")
    canvas_js = (
        "return Array.from(document.querySelectorAll('canvas')).filter(c => c.width > 64 && c.height > 64).length"
    )
    wait_for(driver, "viewer canvas", lambda d: d.execute_script(canvas_js) > 0)
    slices = stack["geometry"].dims[2]
    wait_for(driver, "viewer slice counter", lambda d: f"/{slices})" in page_text(d))  # "I:1 (1/59)": the series shown
    text = page_text(driver)
    assert not [t for t in ERROR_PAGE_TEXT if t in text], text[:1500]
    dismiss_banner(driver)
    driver.save_screenshot(str(artefact_dir() / "ohif_viewer.png"))


def test_panel_point_prompt_returns_nrrd_mask_at_the_click(stack: dict) -> None:
    volume = open_monai_label_viewer(stack)
    geometry = stack["geometry"]
    click = stack["click"]
    # OHIF's volume is the series as DICOM lays it out, so the panel's click index is this voxel
    assert volume["dims"] == list(geometry.dims), (volume, geometry.dims)
    assert volume["index"] == list(click), f"OHIF's worldToIndex of voxel {click}'s position: {volume['index']}"
    edge_mm, model_voxel_mm = model_window()
    half = edge_mm / 2 / geometry.spacing()
    assert np.all(np.array(click) - half >= 0) and np.all(
        np.array(click) + half < np.array(geometry.dims)
    ), f"click {click} is too near the border for the {edge_mm} mm model window: pick another"

    answer = infer_from_page(stack)
    assert answer["status"] == 200, answer["text"]
    assert answer["magic"] == "NRRD", f"answer is not NRRD (starts {answer['magic']!r})"
    content = base64.b64decode(answer["b64"])
    header, mask = read_nrrd(content)
    assert header["type"] in ("uint8", "unsigned char", "uchar"), header  # result_dtype
    assert header["encoding"] == "raw", header  # result_compress: false
    # the panel copies the raw data straight into its labelmap volume: same dimensions, first axis fastest
    assert list(mask.shape) == volume["dims"], (mask.shape, volume["dims"])
    assert set(np.unique(mask).tolist()) <= {0, 1}
    assert mask[click] == 1, f"the clicked voxel {click} is not in the mask"
    # box weights: the mask is the model window centred on the click; its centroid sits on the click (to a model voxel)
    fg = np.argwhere(mask > 0)
    offset_mm = (fg.mean(0) - np.array(click)) * geometry.spacing()
    assert np.all(
        np.abs(offset_mm) <= model_voxel_mm
    ), f"mask centroid {fg.mean(0).round(2)} is {offset_mm.round(2)} mm from the click {click}"
    stack["mask"] = mask


def test_saved_label_reaches_orthanc_as_dicom_seg(stack: dict) -> None:
    import httpx
    import pydicom

    if "mask" not in stack:
        pytest.fail("no mask to save: the point-prompt test did not produce one")
    driver = stack["driver"]
    params = {"label_info": [{"name": "tumor", "idx": 1}]}
    # what the panel holds after showing the mask: its labelmap's bytes (uint8, first axis fastest), sent as label.bin
    labelmap = np.asarray(stack["mask"], dtype=np.uint8).tobytes(order="F")
    b64 = base64.b64encode(labelmap).decode()
    answer = driver.execute_async_script(SAVE_JS, f"{stack['base']}/", stack["series"], "final", b64, params)
    assert "error" not in answer, f"page script failed: {answer.get('error')}"
    assert answer["status"] == 200, answer["text"]

    seg_series: list = []
    deadline = time.monotonic() + 60
    while not seg_series and time.monotonic() < deadline:
        found = httpx.get(f"{stack['url']}/studies/{stack['study']}/series", params={"Modality": "SEG"}, timeout=30)
        seg_series = found.json() if found.status_code == 200 and found.content.strip() else []
        time.sleep(0 if seg_series else 1)
    assert len(seg_series) == 1, f"Orthanc holds {len(seg_series)} SEG series in the study after the save"
    seg_uid = _tag(seg_series[0], "0020000E")[0]
    meta = httpx.get(f"{stack['url']}/studies/{stack['study']}/series/{seg_uid}/metadata", timeout=30).json()
    assert len(meta) == 1 and _tag(meta[0], "00080060") == ["SEG"], meta
    sop_uid = _tag(meta[0], "00080018")[0]
    found = httpx.post(f"{stack['rest']}/tools/lookup", content=sop_uid, timeout=30).json()
    instance = [f["ID"] for f in found if f["Type"] == "Instance"]
    assert instance, found
    ds = pydicom.dcmread(io.BytesIO(httpx.get(f"{stack['rest']}/instances/{instance[0]}/file", timeout=60).content))
    referenced = [s.SeriesInstanceUID for s in getattr(ds, "ReferencedSeriesSequence", [])]
    assert stack["series"] in referenced, f"SEG references series {referenced}, not {stack['series']}"
    # the SEG's frames hold the mask in the series' geometry: each frame at its slice's position equals that slice
    geometry = stack["geometry"]
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    assert (int(ds.Rows), int(ds.Columns)) == (geometry.dims[1], geometry.dims[0])
    mask = stack["mask"]
    heights = np.array([float(p @ geometry.normal) for p in geometry.positions])
    seen = set()
    for frame, group in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        position = np.array(group.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        k = int(np.argmin(np.abs(heights - float(position @ geometry.normal))))
        assert abs(heights[k] - float(position @ geometry.normal)) < 1e-2, f"SEG frame at {position} is on no slice"
        np.testing.assert_array_equal(frame.astype(bool), mask[:, :, k].T.astype(bool), err_msg=f"slice {k}")
        seen.add(k)
    assert int(frames.astype(bool).sum()) == int(mask.sum())
    assert {k for k in range(mask.shape[2]) if mask[:, :, k].any()} <= seen
