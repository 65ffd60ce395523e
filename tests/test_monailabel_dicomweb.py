"""The MONAI Label app against a DICOMweb server: a private Orthanc (``dicomweb_fixtures``) holding axial, oblique and
flipped CT series, and the app's server started with the README's command and ``--studies <Orthanc>/dicom-web``.

The model is the tiny test network (``tests/configs/small_bundle.yaml``) with "box" weights: its decoder answers
"tumour" everywhere, so the served mask is the model window that the app centres on the click. The geometry path is
the real one (WADO-RS fetch, SimpleITK's GDCM conversion, the bundle's resampling and paste-back, the NRRD writer);
where the mask lands says whether OHIF's voxel index (slices sorted along the normal) and the app's agree.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dicomweb_fixtures import (  # noqa: F401
    ORTHANC_SKIP_REASON,
    SHARED_CT,
    SeriesGeometry,
    dicomweb,
    orthanc_available,
    series_geometry,
)
from label_server import MODEL, box_weights, label_server, model_window

REPO = Path(__file__).resolve().parents[1]
LABEL_BIN = REPO / ".venv-label" / "bin"
CLICK_FRACTIONS = (0.3, 0.65, 0.35)  # off-centre on every axis, so a flipped axis shows

pytestmark = [
    pytest.mark.skipif(not (LABEL_BIN / "monailabel").exists(), reason="needs .venv-label (make label-venv)"),
    pytest.mark.skipif(
        importlib.util.find_spec("httpx") is None,
        reason="needs httpx (installed in .venv-label); run with `make test-browser`",
    ),
    pytest.mark.skipif(not orthanc_available(), reason=ORTHANC_SKIP_REASON),
    pytest.mark.skipif(not SHARED_CT.exists(), reason=f"shared test data not found at {SHARED_CT}"),
]


@pytest.fixture(scope="module")
def server(
    dicomweb: dict, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:  # noqa: F811 - the imported fixture
    """The app's server, started with the README's command (no venv on PATH), ``--studies`` at Orthanc's DICOMweb root
    and its cache in a temporary folder."""
    root = tmp_path_factory.mktemp("label_dicomweb")
    cache = root / "cache"
    with label_server(
        root, dicomweb["url"], box_weights(root / "box.pt"), {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(cache)}
    ) as base:
        yield {**dicomweb, "base": base, "root": root, "cache": cache}


def infer(server: dict, series: str, params: dict[str, Any]) -> Any:
    """The OHIF panel's point-prompt request: ``POST /infer/<model>?image=<series>&output=image`` with ``params``."""
    import httpx

    return httpx.post(
        f"{server['base']}/infer/{MODEL}",
        params={"image": series, "output": "image"},
        data={"params": json.dumps(params)},
        timeout=300,
    )


def ohif_params(click: tuple[int, int, int], extension: str = ".nrrd") -> dict[str, Any]:
    """The params MonaiLabelClient.infer sends for one foreground click."""
    return {
        "foreground": [list(click)],
        "background": [],
        "result_extension": extension,
        "result_dtype": "uint8",
        "result_compress": False,
        "restore_label_idx": False,
    }


def read_nrrd(content: bytes) -> tuple[dict[str, Any], np.ndarray]:
    """Header and data (``[i, j, k]``, first axis fastest in the file) of an NRRD answer, read by pynrrd."""
    import nrrd

    header = nrrd.read_header(io.BytesIO(content))
    data = nrrd.read_data(header, io.BytesIO(content.split(b"\n\n", 1)[1]), index_order="F")
    return dict(header), np.asarray(data)


def nrrd_world(header: dict[str, Any], ijk: Any) -> np.ndarray:
    """LPS position (mm) of voxel ``ijk`` by an NRRD header's space directions and origin."""
    assert header["space"] == "left-posterior-superior", header
    return np.asarray(header["space origin"], float) + np.asarray(ijk, float) @ np.asarray(header["space directions"])


def click_of(geometry: SeriesGeometry) -> tuple[int, int, int]:
    """The test click, as a fraction of each axis of the series (OHIF's voxel index)."""
    return tuple(int(round(f * (n - 1))) for f, n in zip(CLICK_FRACTIONS, geometry.dims))  # type: ignore[return-value]


def test_images_are_the_series_uids(server: dict) -> None:
    import httpx
    import nibabel as nib

    stats = httpx.get(f"{server['base']}/datastore/", params={"output": "stats"}, timeout=60).json()
    assert stats["total"] == len(server["series_by_kind"]), stats
    for kind, uid in server["series_by_kind"].items():
        r = httpx.get(f"{server['base']}/datastore/image/info", params={"image": uid}, timeout=120)
        assert r.status_code == 200, (kind, r.text)
        assert r.json().get("SeriesInstanceUID") == uid, r.json()
        path = server["cache"].glob(f"*/{uid}.nii.gz")
        found = list(path)
        assert len(found) == 1, f"no converted {uid}.nii.gz in the cache {server['cache']}"
        geometry = series_geometry(server["url"], server["study"], uid)
        assert nib.load(str(found[0])).shape[:3] == geometry.dims


@pytest.mark.parametrize(
    "image, code",
    [
        ("../../etc/passwd", 400),
        ("1.2.3/../../x", 400),
        ("..", 400),
        ("1.2.840.99999.1", 404),  # a valid UID that Orthanc does not hold
        ("not-a-uid", 400),
    ],
)
def test_bad_ids_are_refused_and_nothing_leaves_the_cache(server: dict, image: str, code: int) -> None:
    import httpx

    before = {str(p) for p in server["root"].rglob("*")}
    r = httpx.get(f"{server['base']}/datastore/image/info", params={"image": image}, timeout=60)
    assert r.status_code == code, r.text
    r = infer(server, image, ohif_params((1, 1, 1)))
    assert r.status_code == code, r.text
    r = httpx.put(
        f"{server['base']}/datastore/label",
        params={"image": image, "tag": "final"},
        files={"label": ("label.bin", b"\x00" * 8)},
        data={"params": "{}"},
        timeout=60,
    )
    assert r.status_code == code, r.text
    after = {str(p) for p in server["root"].rglob("*")}
    new = {p for p in after - before if not p.startswith(str(server["root"] / "tmp")) and not p.endswith(".log")}
    assert not new, f"a refused request wrote {sorted(new)}"


def test_links_out_of_the_cache_are_never_followed(server: dict) -> None:
    """A cached image or label replaced by a link to a file outside the cache: the image is fetched again (the link
    replaced, the outside file untouched), the label is not found."""
    import httpx
    import nibabel as nib

    uid = server["series_by_kind"]["axial"]
    assert httpx.get(f"{server['base']}/datastore/image/info", params={"image": uid}, timeout=120).status_code == 200
    (cached,) = server["cache"].glob(f"*/{uid}.nii.gz")
    secret = server["root"] / "outside_secret.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 7, np.int16), np.eye(4)), str(secret))
    before = secret.read_bytes()
    cached.unlink()
    cached.symlink_to(secret)
    r = httpx.get(f"{server['base']}/datastore/image", params={"image": uid}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.content != before and not cached.is_symlink(), "the app served or kept the link out of the cache"
    assert secret.read_bytes() == before
    label_dir = cached.parent / "labels" / "final"
    label_dir.mkdir(parents=True, exist_ok=True)
    (label_dir / f"{uid}.nii.gz").symlink_to(secret)
    r = httpx.get(f"{server['base']}/datastore/label", params={"label": uid, "tag": "final"}, timeout=60)
    assert r.status_code == 404 or before not in r.content, r.status_code
    (label_dir / f"{uid}.nii.gz").unlink()


@pytest.mark.parametrize("kind", ["axial", "oblique", "flipped"])
def test_click_lands_on_its_voxel(server: dict, kind: str) -> None:
    """OHIF's voxel index (slices sorted along the normal) and the app's agree: the NRRD answer puts each voxel at the
    position OHIF gives it, and the mask (the model window around the click) is centred on the clicked voxel."""
    series = server["series_by_kind"][kind]
    geometry = series_geometry(server["url"], server["study"], series)
    click = click_of(geometry)
    edge_mm, voxel_mm = model_window()
    half = edge_mm / 2 / geometry.spacing()
    assert np.all(np.array(click) - half >= 0) and np.all(np.array(click) + half < np.array(geometry.dims)), click

    r = infer(server, series, ohif_params(click))
    assert r.status_code == 200, r.text
    assert r.content[:4] == b"NRRD", r.content[:40]
    header, mask = read_nrrd(r.content)
    assert header["type"] in ("uint8", "unsigned char", "uchar") and header["encoding"] == "raw", header
    assert mask.shape == geometry.dims, (mask.shape, geometry.dims)
    for ijk in [click, (0, 0, 0), tuple(d - 1 for d in geometry.dims), (geometry.dims[0] - 1, 0, 0)]:
        np.testing.assert_allclose(nrrd_world(header, ijk), geometry.world(ijk), atol=1e-2, err_msg=f"voxel {ijk}")
    assert set(np.unique(mask).tolist()) == {0, 1}
    assert mask[click] == 1, f"clicked voxel {click} not in the mask"
    offset_mm = (np.argwhere(mask > 0).mean(0) - np.array(click)) * geometry.spacing()
    assert np.all(np.abs(offset_mm) <= voxel_mm), f"mask centroid is {offset_mm.round(2)} mm from the click {click}"


def test_infer_result_formats(server: dict) -> None:
    import nibabel as nib

    series = server["series_by_kind"]["oblique"]
    geometry = series_geometry(server["url"], server["study"], series)
    click = click_of(geometry)
    r = infer(server, series, {**ohif_params(click, ".nii.gz"), "result_dtype": "int16"})
    assert r.status_code == 200, r.text
    img = nib.Nifti1Image.from_bytes(gzip.decompress(r.content))
    assert img.get_data_dtype() == np.int16 and img.shape == geometry.dims
    lps = np.diag([-1.0, -1.0, 1.0]) @ (img.affine[:3, :3] @ np.array(click) + img.affine[:3, 3])
    np.testing.assert_allclose(lps, geometry.world(click), atol=1e-2)
    nrrd_gz = infer(server, series, {**ohif_params(click), "result_compress": True, "result_dtype": "float32"})
    header, mask = read_nrrd(nrrd_gz.content)
    assert header["encoding"] == "gzip" and header["type"] == "float" and mask.dtype == np.float32, header
    for bad, name in [({"result_extension": ".png"}, ".png"), ({"result_dtype": "complex64"}, "complex64")]:
        r = infer(server, series, {**ohif_params(click), **bad})
        assert r.status_code == 400 and name in r.text, r.text


def put_label(server: dict, series: str, tag: str, filename: str, content: bytes, params: dict | None = None) -> Any:
    """``PUT /datastore/label`` as the clients send it (a multipart ``label`` file and ``params``)."""
    import httpx

    return httpx.put(
        f"{server['base']}/datastore/label",
        params={"image": series, "tag": tag},
        files={"label": (filename, content)},
        data={"params": json.dumps(params or {})},
        timeout=300,
    )


def label_box(dims: tuple[int, ...]) -> np.ndarray:
    """An off-centre, asymmetric box label (uint8, ``[i, j, k]``): a flipped axis would move it."""
    mask = np.zeros(dims, dtype=np.uint8)
    i, j, k = (int(d * f) for d, f in zip(dims, (0.2, 0.55, 0.15)))
    mask[i : i + 12, j : j + 7, k : k + 5] = 1
    return mask


def test_labels_in_the_clients_formats(server: dict) -> None:
    import httpx
    import nibabel as nib
    import nrrd

    series = server["series_by_kind"]["oblique"]
    geometry = series_geometry(server["url"], server["study"], series)
    mask = label_box(geometry.dims)
    # OHIF's label.bin: the labelmap's bytes (uint8, first axis fastest)
    r = put_label(server, series, "ohif", "label.bin", mask.tobytes(order="F"))
    assert r.status_code == 200, r.text
    # the NRRD mask the app answered, sent back under OHIF's name, and a 3D Slicer .nrrd file
    answer = infer(server, series, ohif_params(click_of(geometry)))
    assert put_label(server, series, "ohif_nrrd", "label.bin", answer.content).status_code == 200
    assert put_label(server, series, "slicer", "label.nrrd", answer.content).status_code == 200
    expected = {"ohif": mask, "ohif_nrrd": read_nrrd(answer.content)[1], "slicer": read_nrrd(answer.content)[1]}
    for tag, want in expected.items():
        got = httpx.get(f"{server['base']}/datastore/label", params={"label": series, "tag": tag}, timeout=60)
        assert got.status_code == 200, (tag, got.text)
        img = nib.Nifti1Image.from_bytes(gzip.decompress(got.content))
        np.testing.assert_array_equal(np.asarray(img.dataobj), want, err_msg=tag)
    # refused: a raw label of the wrong size, a value that is no label, an NRRD on another grid
    r = put_label(server, series, "bad", "label.bin", mask.tobytes()[:-1])
    assert r.status_code == 400 and "bytes" in r.text, r.text
    r = put_label(server, series, "bad", "label.bin", (mask * 7).tobytes(order="F"))
    assert r.status_code == 400 and "7" in r.text, r.text
    header = dict(read_nrrd(answer.content)[0])
    header["space origin"] = np.asarray(header["space origin"]) + 5.0
    path = server["root"] / "shifted.nrrd"
    nrrd.write(str(path), read_nrrd(answer.content)[1], header, index_order="F")
    r = put_label(server, series, "bad", "label.nrrd", path.read_bytes())
    assert r.status_code == 400 and "grid" in r.text, r.text
    assert not list(server["cache"].glob("*/labels/bad/*")), "a refused label was stored"


def test_final_label_reaches_orthanc_as_dicom_seg(server: dict) -> None:
    """A ``final`` label on the flipped series becomes a DICOM-SEG in Orthanc that MONAI Label's reader maps back onto
    the series' voxels exactly."""
    import httpx
    import pydicom
    import SimpleITK as sitk
    from monailabel.datastore.utils.convert import dicom_to_nifti

    series = server["series_by_kind"]["flipped"]
    geometry = series_geometry(server["url"], server["study"], series)
    orthanc = server["orthanc"]
    assert not orthanc.series_of_modality(server["study"], "SEG")
    mask = label_box(geometry.dims)
    r = put_label(server, series, "final", "label.bin", mask.tobytes(order="F"), {"label_info": [{"name": "tumor"}]})
    assert r.status_code == 200, r.text
    segs = orthanc.series_of_modality(server["study"], "SEG")
    assert len(segs) == 1, segs
    seg_uid = segs[0]["0020000E"]["Value"][0]
    meta = httpx.get(f"{server['url']}/studies/{server['study']}/series/{seg_uid}/metadata", timeout=30).json()
    sop = meta[0]["00080018"]["Value"][0]
    seg_file = server["root"] / "seg.dcm"
    seg_file.write_bytes(orthanc.instance_file(sop))
    ds = pydicom.dcmread(str(seg_file))
    assert ds.Modality == "SEG" and series in [s.SeriesInstanceUID for s in ds.ReferencedSeriesSequence]
    # read back (MONAI Label's DICOM-SEG reader) and put on the series' grid by patient position (nearest voxel)
    back = sitk.ReadImage(dicom_to_nifti(str(seg_file), is_seg=True))
    want = np.zeros(geometry.dims, dtype=np.uint8)
    fg = np.argwhere(mask > 0)
    for ijk in fg:
        idx = back.TransformPhysicalPointToIndex(tuple(float(v) for v in geometry.world(ijk)))
        inside = all(0 <= v < s for v, s in zip(idx, back.GetSize()))
        want[tuple(ijk)] = back[idx] if inside else 0
    assert int(want.sum()) == len(fg), f"only {int(want.sum())} of {len(fg)} labelled voxels read back in place"
    assert int((sitk.GetArrayFromImage(back) > 0).sum()) == len(fg), "the SEG holds voxels the label does not"
    os.remove(seg_file)
