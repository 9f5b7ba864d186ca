"""The S2 L2A reader on generated products (and on hand-written older-baseline metadata).

The generated products are checked against the raster files themselves (CRS, shape, transform)
and against GDAL's own SENTINEL2 driver, so the reader is not only consistent with the generator.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import shapely.geometry

from card.s2 import MissingBandError, S2Product, native_resolution_m, normalize_band, open_s2_product
from card.testworld import WorldSummary, generate

BANDS_10M = ("B02", "B03", "B04", "B08")
BANDS_20M = ("B05", "B11", "SCL")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> WorldSummary:
    return generate(tmp_path_factory.mktemp("s2world"), parcels=40, scenes=3, seed=11)


@pytest.fixture(scope="module")
def product(world: WorldSummary) -> S2Product:
    return open_s2_product(world.product_paths[1])


def test_reader_parses_product_info(world: WorldSummary, product: S2Product) -> None:
    name = world.products[1]
    assert product.product_name == name
    assert product.mission == "S2B"
    assert product.processing_baseline == "05.10"
    assert product.baseline_tuple == (5, 10)
    assert product.tile_id == "32UPU"
    assert product.epsg == 32632
    assert product.quantification_value == 10000
    assert product.nodata_dn == 0
    assert product.sensing_time.tzinfo is not None and product.sensing_time.utcoffset() == UTC.utcoffset(None)
    stamp = datetime.strptime(name.split("_")[2], "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    assert product.sensing_time.replace(microsecond=0) == stamp
    # Spectral_Information says "B2"/"B8A"; offsets are keyed by the file names' "B02"/"B8A".
    assert set(product.boa_add_offset) == {f"B{i:02d}" for i in range(1, 13)} | {"B8A"}
    assert set(product.boa_add_offset.values()) == {-1000}
    assert product.reflectance_offset("B04") == product.reflectance_offset("b4") == -1000
    assert product.reflectance_offset("SCL") == 0


def test_reader_accepts_the_metadata_file_itself(world: WorldSummary, product: S2Product) -> None:
    again = open_s2_product(str(world.product_paths[1] / "MTD_MSIL2A.xml"))
    assert again == product


def test_band_files_match_tile_geocoding(product: S2Product) -> None:
    for bands, res in ((BANDS_10M, 10), (BANDS_20M, 20)):
        grid = product.tile_grid(res)
        for band in bands:
            path = product.band_path(band)
            assert path.is_file()
            assert path.parent.name == f"R{res}m" and path.name.endswith(f"_{band}_{res}m.jp2")
            assert native_resolution_m(band) == res
            with rasterio.open(path) as src:
                assert src.driver == "JP2OpenJPEG"
                assert src.crs.to_epsg() == product.epsg
                assert (src.height, src.width) == grid.shape
                assert tuple(src.transform)[:6] == tuple(grid.transform)[:6]
                assert src.dtypes[0] == ("uint8" if band == "SCL" else "uint16")
    g60, g10 = product.tile_grid(60), product.tile_grid(10)
    assert (g60.bounds.left, g60.bounds.top) == (g10.bounds.left, g10.bounds.top)
    assert g60.width * 6 == g10.width
    # Crops sit on the real tile's 60 m lattice (T32UPU: ULX 600000, ULY 5400000).
    assert (g60.bounds.left - 600000) % 60 == 0 and (5400000 - g60.bounds.top) % 60 == 0


def test_footprint_contains_the_aoi(world: WorldSummary, product: S2Product) -> None:
    aoi = json.loads(world.aoi_path.read_text())["features"][0]["geometry"]
    assert product.footprint.is_valid
    assert product.footprint.contains(shapely.geometry.shape(aoi))
    assert 11.0 < product.footprint.centroid.x < 11.2 and 48.1 < product.footprint.centroid.y < 48.4


def test_gdal_sentinel2_driver_agrees(product: S2Product) -> None:
    """GDAL's SENTINEL2 driver understands our SAFE (its 10 m band order is B4, B3, B2, B8)."""
    mtd = product.path / "MTD_MSIL2A.xml"
    with rasterio.open(f"SENTINEL2_L2A:{mtd}:10m:EPSG_{product.epsg}") as sub:
        assert sub.descriptions[0].startswith("B4,") and sub.descriptions[3].startswith("B8,")
        via_gdal = sub.read(1)
        assert tuple(sub.transform)[:6] == tuple(product.tile_grid(10).transform)[:6]
    with rasterio.open(product.band_path("B04")) as src:
        assert np.array_equal(src.read(1), via_gdal)


def test_missing_band_file_is_a_clear_error(product: S2Product, tmp_path: Path) -> None:
    copy = tmp_path / product.path.name
    shutil.copytree(product.path, copy)
    copied = open_s2_product(copy)
    victim = copied.band_path("B08")
    victim.unlink()
    with pytest.raises(MissingBandError) as caught:
        copied.band_path("B08")
    assert isinstance(caught.value, FileNotFoundError)
    assert caught.value.band == "B08" and caught.value.expected_path == victim
    assert "B08" in str(caught.value) and str(victim) in str(caught.value)
    with pytest.raises(MissingBandError, match=r"B12 at 20 m is not listed"):
        copied.band_path("B12")  # the world ships only the bands cbmflow extracts
    with pytest.raises(MissingBandError, match="not listed"):
        copied.band_path("B02", resolution_m=60)


def test_band_names_and_resolutions() -> None:
    assert [normalize_band(b) for b in ("B2", "b02", " B8A ", "scl", "B12")] == ["B02", "B02", "B8A", "SCL", "B12"]
    assert [native_resolution_m(b) for b in ("B01", "B8A", "B09", "SCL", "B08")] == [60, 20, 60, 20, 10]
    with pytest.raises(ValueError, match="unknown"):
        native_resolution_m("B13")


# --- hand-written metadata of older baselines ---------------------------------------------------

_TILE = """<?xml version="1.0" encoding="UTF-8"?>
<n1:Level-2A_Tile_ID xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/S2_PDI_Level-2A_Tile_Metadata.xsd">
  <n1:Geometric_Info>
    <Tile_Geocoding metadataLevel="Brief">
      <HORIZONTAL_CS_NAME>WGS84 / UTM zone 32N</HORIZONTAL_CS_NAME>
      <HORIZONTAL_CS_CODE>EPSG:32632</HORIZONTAL_CS_CODE>
      <Size resolution="10"><NROWS>10980</NROWS><NCOLS>10980</NCOLS></Size>
      <Size resolution="20"><NROWS>5490</NROWS><NCOLS>5490</NCOLS></Size>
      <Geoposition resolution="10"><ULX>600000</ULX><ULY>5400000</ULY><XDIM>10</XDIM><YDIM>-10</YDIM></Geoposition>
      <Geoposition resolution="20"><ULX>600000</ULX><ULY>5400000</ULY><XDIM>20</XDIM><YDIM>-20</YDIM></Geoposition>
    </Tile_Geocoding>
  </n1:Geometric_Info>
</n1:Level-2A_Tile_ID>
"""

# Shaped like a real N0213 (2019) MTD_MSIL2A.xml: no BOA_ADD_OFFSET_VALUES_LIST before baseline 04.00.
_N0213 = """<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<n1:Level-2A_User_Product xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-2A.xsd">
  <n1:General_Info>
    <Product_Info>
      <PRODUCT_START_TIME>2019-09-27T10:20:29.024Z</PRODUCT_START_TIME>
      <PRODUCT_URI>S2A_MSIL2A_20190927T102021_N0213_R065_T32UPU_20190927T132211.SAFE</PRODUCT_URI>
      <PROCESSING_LEVEL>Level-2A</PROCESSING_LEVEL>
      <PROCESSING_BASELINE>02.13</PROCESSING_BASELINE>
      <Datatake datatakeIdentifier="GS2A_20190927T102021_022280_N02.13">
        <SPACECRAFT_NAME>Sentinel-2A</SPACECRAFT_NAME>
      </Datatake>
      <Product_Organisation>
        <Granule_List>
          <Granule granuleIdentifier="x" imageFormat="JPEG2000">
            <IMAGE_FILE>GRANULE/L2A_T32UPU_A022280_20190927T102021/IMG_DATA/R10m/T32UPU_20190927T102021_B04_10m</IMAGE_FILE>
            <IMAGE_FILE>GRANULE/L2A_T32UPU_A022280_20190927T102021/IMG_DATA/R20m/T32UPU_20190927T102021_B04_20m</IMAGE_FILE>
            <IMAGE_FILE>GRANULE/L2A_T32UPU_A022280_20190927T102021/IMG_DATA/R20m/T32UPU_20190927T102021_SCL_20m</IMAGE_FILE>
          </Granule>
        </Granule_List>
      </Product_Organisation>
    </Product_Info>
    <Product_Image_Characteristics>
      <Special_Values><SPECIAL_VALUE_TEXT>NODATA</SPECIAL_VALUE_TEXT><SPECIAL_VALUE_INDEX>0</SPECIAL_VALUE_INDEX></Special_Values>
      <QUANTIFICATION_VALUES_LIST>
        <BOA_QUANTIFICATION_VALUE unit="none">10000</BOA_QUANTIFICATION_VALUE>
      </QUANTIFICATION_VALUES_LIST>
      <Spectral_Information_List>
        <Spectral_Information bandId="3" physicalBand="B4"><RESOLUTION>10</RESOLUTION></Spectral_Information>
      </Spectral_Information_List>
    </Product_Image_Characteristics>
  </n1:General_Info>
  <n1:Geometric_Info>
    <Product_Footprint><Product_Footprint><Global_Footprint>
      <EXT_POS_LIST>48.7 10.3 48.7 11.8 47.7 11.8 47.7 10.3 48.7 10.3</EXT_POS_LIST>
    </Global_Footprint></Product_Footprint></Product_Footprint>
  </n1:Geometric_Info>
</n1:Level-2A_User_Product>
"""


def _write_product(root: Path, mtd: str, granule: str = "L2A_T32UPU_A022280_20190927T102021") -> Path:
    safe = root / "PRODUCT.SAFE"
    (safe / "GRANULE" / granule / "IMG_DATA" / "R10m").mkdir(parents=True)
    (safe / "MTD_MSIL2A.xml").write_text(mtd)
    (safe / "GRANULE" / granule / "MTD_TL.xml").write_text(_TILE)
    return safe


def test_pre_04_baseline_has_no_offset(tmp_path: Path) -> None:
    safe = _write_product(tmp_path, _N0213)
    (safe / "GRANULE/L2A_T32UPU_A022280_20190927T102021/IMG_DATA/R10m/T32UPU_20190927T102021_B04_10m.jp2").touch()
    p = open_s2_product(safe)
    assert p.processing_baseline == "02.13" and p.boa_add_offset == {}
    assert p.reflectance_offset("B04") == 0
    assert (p.product_name, p.mission, p.tile_id, p.epsg) == (
        "S2A_MSIL2A_20190927T102021_N0213_R065_T32UPU_20190927T132211",
        "S2A",
        "32UPU",
        32632,
    )
    assert p.sensing_time == datetime(2019, 9, 27, 10, 20, 29, 24000, tzinfo=UTC)
    assert tuple(p.tile_grid(10).transform)[:6] == (10.0, 0.0, 600000.0, 0.0, -10.0, 5400000.0)
    assert p.footprint.bounds == (10.3, 47.7, 11.8, 48.7)  # EXT_POS_LIST is lat, lon
    assert p.band_path("B04").name == "T32UPU_20190927T102021_B04_10m.jp2"  # native 10 m, not the 20 m copy
    with pytest.raises(MissingBandError, match="listed in MTD_MSIL2A.xml but its file is missing"):
        p.band_path("SCL")


def test_new_baseline_without_offsets_is_refused(tmp_path: Path) -> None:
    mtd = _N0213.replace("<PROCESSING_BASELINE>02.13", "<PROCESSING_BASELINE>04.00")
    with pytest.raises(ValueError, match="no BOA_ADD_OFFSET_VALUES_LIST"):
        open_s2_product(_write_product(tmp_path, mtd))


def test_l2ap_2017_variant_is_understood(tmp_path: Path) -> None:
    """Sen2Cor 2.4 products (PSD 14.2) use L2A_Product_Info, PRODUCT_URI_2A and IMAGE_FILE_2A."""
    mtd = (
        _N0213.replace("<Product_Info>", "<L2A_Product_Info>")
        .replace("</Product_Info>", "</L2A_Product_Info>")
        .replace("<PRODUCT_URI>", "<PRODUCT_URI_2A>")
        .replace("</PRODUCT_URI>", "</PRODUCT_URI_2A>")
        .replace("<IMAGE_FILE>", "<IMAGE_FILE_2A>")
        .replace("</IMAGE_FILE>", "</IMAGE_FILE_2A>")
        .replace("<BOA_QUANTIFICATION_VALUE", "<L2A_BOA_QUANTIFICATION_VALUE")
        .replace("</BOA_QUANTIFICATION_VALUE>", "</L2A_BOA_QUANTIFICATION_VALUE>")
        .replace("N0213", "N0205")
        .replace("02.13", "02.05")
    )
    p = open_s2_product(_write_product(tmp_path, mtd))
    assert p.processing_baseline == "02.05" and p.quantification_value == 10000 and p.boa_add_offset == {}
    assert ("B04", 10) in p.image_files


def test_unreadable_metadata_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_s2_product(tmp_path / "nothing.SAFE")
    broken = _write_product(tmp_path, _N0213.replace("</n1:General_Info>", ""))
    with pytest.raises(ValueError, match="not well-formed"):
        open_s2_product(broken)
    (broken / "MTD_MSIL2A.xml").write_text(_N0213)
    (broken / "GRANULE/L2A_T32UPU_A022280_20190927T102021/MTD_TL.xml").unlink()
    with pytest.raises(FileNotFoundError, match="MTD_TL"):
        open_s2_product(broken)
