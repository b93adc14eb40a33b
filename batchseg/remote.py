"""Inputs in object storage: ``batchseg run s3://BUCKET/PREFIX`` (the ``batchseg[s3]`` extra).

An S3 input is kept as GDAL's path for it, ``/vsis3/BUCKET/PREFIX``: it joins with an image's
relative path like a folder, and rasterio opens it as it is. Two well-kept libraries do the work:

* **boto3** lists the prefix (each object's key, size, ETag, time) and fetches a plain image's bytes
  (a JPEG or PNG is decoded whole anyway). Its ``standard`` retry mode retries throttling, 5xx and
  dropped connections with exponential back-off and jitter.
* **GDAL's /vsis3/** (inside rasterio's wheels) reads a georeferenced GeoTIFF (a COG) by window with
  HTTP range requests, never the whole object; ``GDAL_HTTP_MAX_RETRY`` / ``GDAL_HTTP_RETRY_DELAY``
  retry its transient errors with back-off.

Both find credentials where AWS tools do (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and ``~/.aws/credentials``, instance roles); batchseg never
reads, stores nor logs them. An S3-compatible store (MinIO, Ceph, ...) is named as boto3 users name
it, ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (``http://host:9000``), or as GDAL users do,
``AWS_S3_ENDPOINT`` (``host:9000``) with ``AWS_HTTPS=NO``; each is turned into the other's form.

An object is identified by its key, size and ETag (``Item.content_hash`` is ``etag:<ETag>``): resume
redoes an object whose ETag or size changed. A failed read, after the retries, is that image's
failure (``RemoteReadError``, status ``error``), never the run's. Imported only for an S3 input.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Container, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .discover import Discovery, _compile, _drop_collisions, _Found, _is_image_name, _matches
from .errors import ConfigError
from .records import Item
from .values import PathValue, Text

__all__ = [
    "ETAG_PREFIX",
    "InputPath",
    "RemoteReadError",
    "VSI_PREFIX",
    "check_input",
    "discover_objects",
    "endpoint_url",
    "gdal_options",
    "is_remote",
    "localize",
    "remove_orphans",
    "stat_item",
    "url_of",
    "vsi_path",
]

VSI_PREFIX = "/vsis3/"
ETAG_PREFIX = "etag:"
_TIFF_SUFFIXES = (".tif", ".tiff")
#: Downloads a worker keeps (a plain image cut into tiles is read once per tile; an engine's reader
#: threads may hold several at once).
_CACHED = 16
_MAX_ATTEMPTS = 5
_EXTRA_HINT = "reading s3:// inputs needs the s3 extra: pip install 'batchseg[s3]'"


class RemoteReadError(OSError):
    """An object could not be read after every retry: that image's failure."""


def is_remote(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an object-storage input (``s3://...`` or ``/vsis3/...``)."""
    text = os.fspath(path).replace("\\", "/")
    return text.startswith(("s3://", VSI_PREFIX))


def vsi_path(text: str) -> str:
    """``s3://bucket/prefix`` -> ``/vsis3/bucket/prefix`` (a ``/vsis3/`` path stays as it is)."""
    if text.startswith("s3://"):
        text = VSI_PREFIX + text[len("s3://") :]
    return text.rstrip("/")


def _split(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(bucket, key or prefix) of an S3 path."""
    text = vsi_path(os.fspath(path).replace("\\", "/"))
    bucket, _, key = text[len(VSI_PREFIX) :].partition("/")
    return bucket, key


def url_of(path: str | os.PathLike[str]) -> str:
    """``s3://bucket/key`` of an S3 path, for messages."""
    bucket, key = _split(path)
    return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"


class InputPath(PathValue):
    """The input: a folder, or an S3 prefix (``s3://BUCKET/PREFIX``, kept as GDAL's
    ``/vsis3/BUCKET/PREFIX``, which joins with an image's path like a folder)."""

    metavar = "FOLDER|s3://BUCKET/PREFIX"

    def read(self, value: object, toml: bool) -> Path:
        text = Text().read(value, toml)
        return Path(vsi_path(text)) if is_remote(text) else Path(text)

    def from_toml(self, value: object, base: Path) -> Path:
        text = Text().read(value, toml=True)
        return Path(vsi_path(text)) if is_remote(text) else super().from_toml(value, base)


# ---- where the store is --------------------------------------------------------------------------


def endpoint_url() -> str | None:
    """The S3-compatible endpoint, from boto3's variables or GDAL's; None: AWS itself."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return os.environ[name]
    host = os.environ.get("AWS_S3_ENDPOINT")
    if host:
        if "://" in host:
            return host
        secure = os.environ.get("AWS_HTTPS", "YES").upper() not in ("NO", "FALSE", "OFF", "0")
        return f"{'https' if secure else 'http'}://{host}"
    return None


def gdal_options() -> dict[str, str]:
    """GDAL's settings for /vsis3/: the endpoint in its form, retries with back-off, no listing of
    the object's 'folder' on open (a sidecar lookup would list the whole prefix)."""
    options = {
        "GDAL_HTTP_MAX_RETRY": str(_MAX_ATTEMPTS),
        "GDAL_HTTP_RETRY_DELAY": "0.5",  # doubled at each retry
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
        "CPL_VSIL_CURL_USE_HEAD": "NO",
    }
    url = endpoint_url()
    if url is not None and not os.environ.get("AWS_S3_ENDPOINT"):
        parts = urlsplit(url)
        options["AWS_S3_ENDPOINT"] = parts.netloc
        options["AWS_HTTPS"] = "YES" if parts.scheme == "https" else "NO"
        options["AWS_VIRTUAL_HOSTING"] = "FALSE"  # MinIO and most compatible stores: path style
    if not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
        options["AWS_REGION"] = "us-east-1"
    return options


_local = threading.local()


def _client() -> Any:
    """A boto3 S3 client (one per thread: clients are thread-safe, sessions are not)."""
    client = getattr(_local, "client", None)
    if client is None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:
            raise ConfigError(_EXTRA_HINT) from exc
        retries: dict[str, Any] = {"mode": os.environ.get("AWS_RETRY_MODE", "standard")}
        if not os.environ.get("AWS_MAX_ATTEMPTS"):  # set, boto3 reads it itself
            retries["max_attempts"] = _MAX_ATTEMPTS
        config = Config(retries=retries, connect_timeout=10)
        session = boto3.session.Session()
        client = session.client("s3", endpoint_url=endpoint_url(), config=config)
        _local.client = client
    return client


# ---- the parent: checks and listing ---------------------------------------------------------------


def check_input(path: str | os.PathLike[str]) -> None:
    """ConfigError (exit 1) with a sentence when the bucket is missing, the credentials are refused
    or the store cannot be reached; nothing is written before."""
    bucket, _ = _split(path)
    try:
        _client().head_bucket(Bucket=bucket)
    except Exception as exc:  # noqa: BLE001 - botocore's errors become one sentence each
        raise _config_error(exc, bucket) from exc


def _config_error(exc: BaseException, bucket: str) -> ConfigError:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = endpoint_url() or "AWS S3"
    if isinstance(exc, NoCredentialsError):
        return ConfigError(
            f"No credentials for s3://{bucket}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
            "AWS_PROFILE with ~/.aws/credentials."
        )
    if isinstance(exc, EndpointConnectionError):
        return ConfigError(f"Cannot reach {where} for s3://{bucket}: {exc}. Check AWS_ENDPOINT_URL.")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            return ConfigError(
                f"The bucket s3://{bucket} does not exist at {where}; check its name (and "
                "AWS_ENDPOINT_URL for an S3-compatible store)."
            )
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
            return ConfigError(
                f"{where} refused access to s3://{bucket} ({code}): check the credentials "
                "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and their rights on the bucket."
            )
        return ConfigError(f"s3://{bucket} cannot be listed at {where} ({code}): {exc}")
    return ConfigError(f"s3://{bucket} cannot be listed at {where}: {type(exc).__name__}: {exc}")


def discover_objects(
    root: str | os.PathLike[str],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    with_hash: bool = False,
    skip: Iterable[str | os.PathLike[str]] = (),
    keep: Container[str] = (),
) -> Discovery:
    """``discover`` for an S3 prefix, by the folder rules that apply to keys: image extensions, no
    hidden component, include/exclude, sorted, name clashes. ``Item.mtime_ns`` is the object's
    time, ``content_hash`` its ETag (``with_hash`` and ``skip`` have nothing to do: an ETag is the
    store's digest, and the output folder is never in a bucket)."""
    bucket, prefix = _split(root)
    if prefix:
        prefix += "/"
    found: list[_Found] = []
    etags: dict[str, str] = {}
    try:
        pages = _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", ()):
                rel = obj["Key"][len(prefix) :]
                parts = rel.split("/")
                if not rel or any(p.startswith(".") or not p for p in parts) or not _is_image_name(parts[-1]):
                    continue
                mtime = int(obj["LastModified"].timestamp() * 1e9)
                found.append((rel, int(obj["Size"]), mtime, None))
                etags[rel] = obj["ETag"].strip('"')
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _config_error(exc, bucket) from exc
    found.sort(key=lambda f: f[0])
    included, excluded_rx = _compile(include), _compile(exclude)
    excluded = [
        f[0] for f in found if (included and not _matches(included, f[0])) or _matches(excluded_rx, f[0])
    ]
    left_out = set(excluded)
    found, collisions = _drop_collisions([f for f in found if f[0] not in left_out], keep)
    items = [Item(rel, size, mtime, ETAG_PREFIX + etags[rel]) for rel, size, mtime, _ in found]
    return Discovery(items, collisions, excluded, [])


def stat_item(root: str | os.PathLike[str], rel: str) -> Item:
    """The Item of one object (as ``discover_objects`` makes it)."""
    bucket, prefix = _split(root)
    key = f"{prefix}/{rel}" if prefix else rel
    try:
        head = _client().head_object(Bucket=bucket, Key=key)
    except Exception as exc:  # noqa: BLE001
        raise _config_error(exc, bucket) from exc
    mtime = int(head["LastModified"].timestamp() * 1e9)
    return Item(rel, int(head["ContentLength"]), mtime, ETAG_PREFIX + head["ETag"].strip('"'))


# ---- the worker: reading ------------------------------------------------------------------------


class _Downloads:
    """The last few objects a worker fetched whole, in its own temp folder (gone when it exits).
    Downloads run outside the lock: an engine's reader threads fetch their images side by side."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.files: OrderedDict[str, Path] = OrderedDict()
        self.lock = threading.Lock()
        self.numbers = itertools.count()

    def get(self, path: str) -> Path:
        with self.lock:
            known = self.files.get(path)
            if known is not None and known.is_file():
                self.files.move_to_end(path)
                return known
            if self.folder is None:
                remove_orphans()
                self.folder = Path(tempfile.mkdtemp(prefix=f"{_FOLDER_PREFIX}{os.getpid()}-"))
                atexit.register(shutil.rmtree, self.folder, True)
            target = self.folder / f"{next(self.numbers)}-{Path(path).name}"
        _download(path, target)
        with self.lock:
            self.files[path] = target
            while len(self.files) > _CACHED:
                _, old = self.files.popitem(last=False)
                if old != target:
                    old.unlink(missing_ok=True)
        return target


_downloads = _Downloads()
_FOLDER_PREFIX = "batchseg-s3-"


def remove_orphans() -> None:
    """Remove the download folders of workers that are gone (a worker stopped by a signal runs no
    atexit): when a worker first downloads, and in the parent when a run's pool is done."""

    for folder in Path(tempfile.gettempdir()).glob(f"{_FOLDER_PREFIX}*-*"):
        pid = folder.name[len(_FOLDER_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _download(path: str, target: Path) -> None:
    bucket, key = _split(path)
    try:
        _client().download_file(bucket, key, str(target))
    except Exception as exc:  # noqa: BLE001 - after boto3's retries, the image's failure
        target.unlink(missing_ok=True)
        raise RemoteReadError(f"cannot read s3://{bucket}/{key}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        return f"{error.get('Code', '')} {error.get('Message', '')}".strip() or str(exc)
    return f"{type(exc).__name__}: {exc}"


def localize(path: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """What the readers open for ``path``: itself when local; for an object, its /vsis3/ path when it
    is a georeferenced TIFF (read by window through GDAL), else a local copy of its bytes."""
    if not is_remote(path):
        return path
    text = vsi_path(os.fspath(path).replace("\\", "/"))
    for name, value in gdal_options().items():
        os.environ.setdefault(name, value)  # GDAL reads its options from the environment too
    if text.lower().endswith(_TIFF_SUFFIXES) and _has_georeference(text):
        return text
    return _downloads.get(text)


def _has_georeference(path: str) -> bool:
    """Whether GDAL finds the object's own georeference (a few range requests: the header)."""
    try:
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
    except ImportError:
        return False  # without the geo extra, a TIFF is read as an image
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                return src.crs is not None or not src.transform.is_identity
    except RasterioIOError as exc:
        raise RemoteReadError(f"cannot read {url_of(path)}: {exc}") from exc
