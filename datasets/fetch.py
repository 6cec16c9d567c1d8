"""Gets a dataset's raw files onto disk, verified against their published checksums.

A raw file comes from `--source DIR` when given (a mirror, a shared drive, a Debian package), else
from `<data_dir>/<dataset>/raw/` when an earlier run downloaded it, else from the dataset's
mirrors. Downloads go to a temporary name and are renamed only when complete and verified, so an
interrupted or corrupt download is never converted and is fetched again on the next run.
"""
import errno
import gzip
import hashlib
import os
import urllib.error
import urllib.request
import zlib

from tqdm import tqdm

from util import UsageError, atomic_path, log

_BLOCK = 1 << 20
_TIMEOUT_S = 60


def obtain(raw_files, mirrors, raw_dir, source=None, verify=True):
    """Returns ({file name: local path}, provenance {"<algorithm>:<verified name>": hex digest})
    for `raw_files`; UsageError when one is missing, unreachable or does not match."""
    paths, provenance = {}, {}
    for raw_file in raw_files:
        if source:
            path = _from_source(raw_file, source)
            digest = _verified_digest(path, raw_file, verify, what=path)
        else:
            path, digest = _from_cache_or_download(raw_file, mirrors, raw_dir, verify)
        paths[raw_file.name] = path
        provenance[raw_file.provenance_key] = digest
    if not verify:
        log.warning("WARNING: --no_verify: %s used WITHOUT checking their published checksums; "
                    "use this only for files you made or trust", ", ".join(paths))
    return paths, provenance


def expected_provenance(raw_files):
    """The provenance `obtain` records when every file matches its published checksum."""
    return {f.provenance_key: f.digest for f in raw_files}


def file_digest(path, raw_file):
    """Hex digest of the file, or of its decompressed payload when the checksum covers that."""
    return hex_digest(path, raw_file.algorithm, raw_file.gzip_payload)


def hex_digest(path, algorithm="sha256", gzip_payload=False):
    """Hex digest of the file at `path`, or of its gzip-decompressed content."""
    digest = hashlib.new(algorithm)
    opener = gzip.open if gzip_payload else open
    try:
        with opener(path, "rb") as f:
            for block in iter(lambda: f.read(_BLOCK), b""):
                digest.update(block)
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise UsageError(f"{path} is not complete gzip data ({error}); delete it and fetch it "
                         "again") from None
    return digest.hexdigest()


def _from_source(raw_file, source):
    path = os.path.join(source, raw_file.name)
    if not os.path.isfile(path):
        raise UsageError(f"{raw_file.name} not found in --source {source}: put the published "
                         "file there or drop --source to download it")
    return path


def _from_cache_or_download(raw_file, mirrors, raw_dir, verify):
    """Returns (path, digest): the earlier download when it still matches, else a new one."""
    path = os.path.join(raw_dir, raw_file.name)
    if os.path.isfile(path):
        digest = file_digest(path, raw_file)
        if not verify or digest == raw_file.digest:
            return path, digest
        log.warning("%s does not match its published checksum; downloading it again", path)
    with atomic_path(path) as tmp:
        _download_from_mirrors(raw_file.name, mirrors, tmp)
        digest = _verified_digest(tmp, raw_file, verify, what=f"the download of {raw_file.name}")
    return path, digest


def _verified_digest(path, raw_file, verify, what):
    digest = file_digest(path, raw_file)
    if verify and digest != raw_file.digest:
        raise UsageError(_mismatch(what, raw_file, digest))
    return digest


def _download_from_mirrors(name, mirrors, out_path):
    failures = []
    for mirror in mirrors:
        url = mirror + name
        try:
            _download(url, out_path)
            return
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            reason = getattr(error, "reason", error)
            failures.append(f"{url} ({reason})")
            log.warning("cannot download %s: %s", url, reason)
    raise UsageError(f"cannot download {name} from {'; '.join(failures) or 'any mirror'} — fetch "
                     "the file elsewhere and pass its folder with --source DIR")


def _download(url, out_path):
    """Streams `url` into `out_path` with a progress bar; raises ConnectionError when the server
    sends fewer bytes than it announced."""
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response, open(out_path, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(url)) as bar:
            for block in iter(lambda: response.read(_BLOCK), b""):
                try:
                    out.write(block)
                except OSError as error:
                    raise disk_error(error, out_path) from None
                received += len(block)
                bar.update(len(block))
    if total is not None and received != total:
        raise ConnectionError(f"connection closed after {received} of {total} bytes")


def disk_error(error, path):
    """A UsageError for a full disk or file-size limit, else the error itself."""
    if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return UsageError(f"no space left while writing {path} ({error.strerror}); free space "
                          f"under {os.path.dirname(os.path.abspath(path))} and run again")
    return error


def _mismatch(what, raw_file, digest):
    covered = "decompressed content" if raw_file.gzip_payload else "file"
    return (f"{what}: {raw_file.algorithm} of its {covered} is {digest}, not the published "
            f"{raw_file.digest} — the file is corrupt or not the published one; fetch it again "
            "(or pass --no_verify if you made it yourself or trust it)")
